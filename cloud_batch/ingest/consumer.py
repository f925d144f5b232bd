"""``cloud-batch ingest``: the broker session that feeds the store, acked only once rows are durable.

* A persistent MQTT 5 session: a fixed client id per fleet (``edgefleet-ingest-<fleet>``),
  ``clean_start=False`` and a session expiry (7 days), so while ingest is down the broker keeps
  its subscription and queues batches (up to its ``max_queued_messages``; beyond that the devices'
  re-sends fill the hole: the broker is a buffer, never the record of truth).
* paho 2 ``manual_ack``: a PUBACK goes out only after ``TelemetryStore.commit`` returned, i.e.
  after the rows and the ledger are on disk. A crash before that makes the broker redeliver,
  and the ledger drops what it already holds.
* Messages are committed in groups (when none arrived for ``commit_idle_s``, or at
  ``max_group`` messages), which makes one fsync cover many batches.
* After each commit it publishes, per device in the group, the highest contiguous stored seq,
  retained, QoS 1, on ``telemetry_ack_topic``: the device deletes up to it.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_batch.errors import BrokerUnreachableError, InputError, input_errors
from cloud_batch.ingest.store import CommitResult, TelemetryStore, crash_point
from edge_agent.mqtt.link import TlsConfig, parse_broker_url
from edge_agent.wire.names import check_segment
from edge_agent.wire.telemetry import encode_ack
from edge_agent.wire.topics import telemetry_ack_topic, telemetry_filter

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600
RECEIVE_MAXIMUM = 1000  # unacked messages the broker may have in flight to us (one group at most)


def client_id(fleet: str) -> str:
    """The fixed client id of a fleet's ingest: the broker's session (and its queue) is keyed by it."""
    return f"edgefleet-ingest-{fleet}"


@dataclass(frozen=True)
class IngestOptions:
    """``cloud-batch ingest`` flags. Without ``follow`` it stops after ``idle_exit_s`` without a message."""

    fleet: str
    broker_url: str
    store: Path
    follow: bool = False
    idle_exit_s: float | None = None  # default: 2 s, or never with ``follow``
    commit_idle_s: float = 0.05
    max_group: int = 500
    connect_timeout_s: float = 10.0
    tls: TlsConfig | None = None  # CA / client certificate (``fleetops.broker.tls_config``); mqtts:// alone: system CAs


@dataclass
class IngestStats:
    """Running totals of one ``run_ingest``."""

    messages: int = 0
    rows: int = 0
    duplicates: int = 0
    rejected: int = 0
    commits: int = 0
    devices: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)

    def add(self, n_messages: int, result: CommitResult) -> None:
        self.messages += n_messages
        self.rows += result.rows
        self.duplicates += result.duplicates
        self.rejected += result.rejected
        self.commits += 1
        self.devices.update(d for _, d in result.acks)

    def summary(self) -> str:
        took = time.monotonic() - self.started
        return (
            f"{self.rows} rows stored from {self.messages} messages of {len(self.devices)} devices "
            f"({self.duplicates} duplicates skipped, {self.rejected} rejected) in {self.commits} commits, {took:.1f}s"
        )


class _Session:
    """The paho client: persistent session, manual acks, messages handed to a queue."""

    def __init__(self, options: IngestOptions) -> None:
        self.host, self.port, tls = parse_broker_url(options.broker_url)
        self.fleet = options.fleet
        self.inbox: queue.Queue[tuple[str, bytes, int, int]] = queue.Queue()
        self.connected = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id(self.fleet), protocol=mqtt.MQTTv5, manual_ack=True
        )
        if tls or options.tls is not None:
            t = options.tls or TlsConfig()
            try:
                self.client.tls_set(ca_certs=t.ca_file, certfile=t.cert_file, keyfile=t.key_file)
            except (OSError, ValueError) as exc:
                raise InputError(f"ingest TLS setup failed: {exc}") from exc
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.max_queued_messages_set(0)

    def start(self, timeout_s: float) -> None:
        try:
            socket.create_connection((self.host, self.port), timeout=timeout_s).close()
        except OSError as exc:
            raise BrokerUnreachableError(f"cannot reach the MQTT broker at {self.host}:{self.port}: {exc}") from exc
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        self.client.connect_async(self.host, self.port, keepalive=30, clean_start=False, properties=props)
        self.client.loop_start()
        if not self.connected.wait(timeout_s):
            self.stop()
            raise BrokerUnreachableError(f"no MQTT session with {self.host}:{self.port} within {timeout_s:g}s")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the ingest session: %s", reason_code)
            return
        client.subscribe(telemetry_filter(self.fleet), qos=1)
        log.info("ingest session for fleet %s (session present: %s)", self.fleet, flags.session_present)
        self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.inbox.put((msg.topic, bytes(msg.payload), msg.mid, msg.qos))

    def ack(self, group: list[tuple[str, bytes, int, int]], acks: dict[tuple[str, str], int]) -> None:
        """PUBACK the group's messages, then publish each device's ack (retained; a lost one is re-sent next time)."""
        for _, _, mid, qos in group:
            if qos > 0:
                self.client.ack(mid, qos)
        crash_point("after_mqtt_ack")
        for (fleet, device), seq in acks.items():
            self.client.publish(telemetry_ack_topic(fleet, device), encode_ack(device, seq), qos=1, retain=True)


def run_ingest(
    options: IngestOptions,
    *,
    stop: threading.Event | None = None,
    on_commit: Callable[[IngestStats, CommitResult], None] | None = None,
) -> IngestStats:
    """Consume the fleet's telemetry into ``options.store`` until idle (or ``stop`` with ``follow``)."""
    with input_errors():
        check_segment(options.fleet, "fleet")
    stop = stop or threading.Event()
    idle_exit = options.idle_exit_s if options.idle_exit_s is not None else (None if options.follow else 2.0)
    stats = IngestStats()
    with TelemetryStore(options.store, options.fleet) as store:
        with input_errors():
            session = _Session(options)
        session.start(options.connect_timeout_s)
        try:
            _loop(session, store, options, stats, stop, idle_exit, on_commit)
        finally:
            session.stop()
    return stats


def _loop(
    session: _Session,
    store: TelemetryStore,
    options: IngestOptions,
    stats: IngestStats,
    stop: threading.Event,
    idle_exit: float | None,
    on_commit: Callable[[IngestStats, CommitResult], None] | None,
) -> None:
    group: list[tuple[str, bytes, int, int]] = []
    last_message = time.monotonic()
    while not stop.is_set():
        try:
            group.append(session.inbox.get(timeout=options.commit_idle_s))
            last_message = time.monotonic()
            if len(group) < options.max_group:
                continue
        except queue.Empty:
            if not group:
                if idle_exit is not None and time.monotonic() - last_message >= idle_exit:
                    return
                continue
        result = store.commit((t, p) for t, p, _, _ in group)
        session.ack(group, result.acks)
        stats.add(len(group), result)
        log.info(
            "commit %d: %d rows, %d duplicates, %d rejected",
            result.commit_no,
            result.rows,
            result.duplicates,
            result.rejected,
        )
        for why in result.reasons:
            log.warning("commit %d rejected: %s", result.commit_no, why)
        if on_commit is not None:
            on_commit(stats, result)
        group = []
