"""The fleet as the broker sees it: retained device state and presence, read over MQTT.

Devices publish a retained ``DeviceState`` on ``devices/{id}/state`` and a retained
``online``/``offline`` presence (their last will) on ``devices/{id}/presence``; the broker's
retained store is therefore the fleet database, and reading it needs no server of ours.

``FleetView`` subscribes to those topics (and, for rollouts, to a model's release and rollout
topics) and keeps the newest document of each. ``sync`` returns once the broker has sent
every retained message: after the real subscriptions it subscribes to a private probe topic
and publishes one message there; mosquitto queues retained messages in subscription order
on the same connection, so when the probe comes back the retained ones are in. A short
quiet period follows (for brokers that send retained messages later); a broker whose ACL
drops the probe costs the whole ``timeout_s``.

This module also owns the cloud tools' broker access (``open_link``) and its errors::

    CloudError                      (cloud_batch.errors)
    └── BrokerError                 the broker could not be used (connect, publish not acknowledged)
        └── BrokerUnreachableError  no connection within the timeout; retrying later may work
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from cloud_batch.errors import CloudError, InputError
from edge_agent.errors import EdgeError, FailedError
from edge_agent.mqtt.link import MqttLink
from edge_agent.wire.protocol import (
    PRESENCE_OFFLINE,
    PRESENCE_ONLINE,
    ROOT,
    DeviceState,
    Release,
    Rollout,
    UpdateReport,
    check_segment,
    decode,
    encode,
    release_topic,
    rollout_topic,
)

DEFAULT_CONNECT_TIMEOUT_S = 5.0


class BrokerError(CloudError):
    """The broker could not be used: a publish was not acknowledged, a subscription failed."""


class BrokerUnreachableError(BrokerError):
    """No connection to the broker within the timeout (wrong URL, broker down, network)."""


# -- broker access -------------------------------------------------------------------------
@contextmanager
def open_link(
    broker_url: str, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, client_prefix: str = "cloud-batch"
) -> Iterator[MqttLink]:
    """A connected MqttLink for one cloud command; BrokerUnreachableError (with the URL) if none in ``timeout_s``."""
    try:
        link = MqttLink(broker_url, client_id=f"{client_prefix}-{uuid.uuid4().hex[:10]}")
    except EdgeError as exc:  # ConfigError: the URL itself is wrong
        raise InputError(str(exc)) from exc
    # A plain TCP connect first: "connection refused" is known at once, MqttLink would keep retrying.
    try:
        socket.create_connection((link.host, link.port), timeout=timeout_s).close()
    except OSError as exc:
        raise BrokerUnreachableError(f"cannot reach the MQTT broker at {broker_url}: {exc.strerror or exc}") from exc
    link.start()
    try:
        if not link.wait_connected(timeout_s):
            raise BrokerUnreachableError(f"cannot reach the MQTT broker at {broker_url} within {timeout_s:g}s")
        yield link
    finally:
        link.stop()


def publish_doc(link: MqttLink, topic: str, doc: dict[str, Any], *, retain: bool = True, wait_s: float = 10.0) -> None:
    """Publish a JSON document (QoS 1) and wait for the broker's acknowledgement."""
    try:
        link.publish(topic, encode(doc), retain=retain, qos=1, wait_s=wait_s)
    except FailedError as exc:
        raise BrokerError(f"broker {link.host}:{link.port}: {exc}") from exc


def topic_filter(fleet: str, kind: str) -> str:
    """``devices/+/state``-style filters for a fleet (``protocol`` builds single topics only)."""
    check_segment(fleet, "fleet")
    return {
        "state": f"{ROOT}/fleets/{fleet}/devices/+/state",
        "presence": f"{ROOT}/fleets/{fleet}/devices/+/presence",
    }[kind]


# -- the live view ------------------------------------------------------------------------
@dataclass
class Snapshot:
    """What a FleetView knew at one moment (copies; safe to keep)."""

    states: dict[str, DeviceState] = field(default_factory=dict)  # device id -> newest state
    presence: dict[str, str] = field(default_factory=dict)  # device id -> "online" / "offline"
    releases: dict[str, tuple[Release, dict[str, Any]]] = field(default_factory=dict)  # name -> (parsed, raw doc)
    rollouts: dict[str, Rollout] = field(default_factory=dict)  # name -> rollout control
    problems: list[str] = field(default_factory=list)  # unparseable documents, newest last


class FleetView:
    """Newest retained (and live) fleet documents from one MQTT connection. Thread-safe."""

    def __init__(self, link: MqttLink, fleet: str, *, models: Iterable[str] = (), devices: bool = True) -> None:
        self.link = link
        self.fleet = check_segment(fleet, "fleet")
        self.models = [check_segment(m, "name") for m in models]
        self.devices = devices
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._version = 0
        self._snap = Snapshot()
        self._synced = threading.Event()

    # -- subscribing ----------------------------------------------------------------------
    def sync(self, timeout_s: float = 5.0, quiet_s: float = 0.1) -> FleetView:
        """Subscribe and wait until the broker has sent every retained message (see the module docstring)."""
        if self.devices:
            self.link.subscribe(topic_filter(self.fleet, "state"), self._on_state, qos=0)
            self.link.subscribe(topic_filter(self.fleet, "presence"), self._on_presence, qos=0)
        for name in self.models:
            self.link.subscribe(rollout_topic(self.fleet, name), self._on_rollout, qos=0)
            self.link.subscribe(release_topic(self.fleet, name), self._on_release, qos=0)
        probe = f"{ROOT}/_sync/{self.link.client_id}/{uuid.uuid4().hex[:8]}"
        self.link.subscribe(probe, lambda t, p, r: self._synced.set(), qos=0)
        try:
            self.link.publish(probe, b"sync", qos=1, retain=False)
        except FailedError as exc:
            raise BrokerError(f"broker {self.link.host}:{self.link.port}: {exc}") from exc
        deadline = time.monotonic() + timeout_s
        self._synced.wait(timeout_s)
        self.link.unsubscribe(probe)
        # Quiet period: stop once nothing new arrived for quiet_s (or the deadline passed).
        while time.monotonic() < deadline:
            with self._lock:
                seen = self._version
            time.sleep(quiet_s)
            with self._lock:
                if self._version == seen:
                    break
        return self

    def close(self) -> None:
        if self.devices:
            self.link.unsubscribe(topic_filter(self.fleet, "state"))
            self.link.unsubscribe(topic_filter(self.fleet, "presence"))
        for name in self.models:
            self.link.unsubscribe(rollout_topic(self.fleet, name))
            self.link.unsubscribe(release_topic(self.fleet, name))

    # -- reading --------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self._lock:
            s = self._snap
            return Snapshot(dict(s.states), dict(s.presence), dict(s.releases), dict(s.rollouts), list(s.problems))

    @property
    def version(self) -> int:
        """Increments on every document received (for ``wait_change``)."""
        with self._lock:
            return self._version

    def wait_change(self, since: int, timeout_s: float) -> int:
        """Block until a document newer than ``since`` arrives (or the timeout); return the current version."""
        with self._changed:
            self._changed.wait_for(lambda: self._version != since, timeout=timeout_s)
            return self._version

    # -- paho network thread ----------------------------------------------------------------
    def _bump(self) -> None:
        self._version += 1
        self._changed.notify_all()

    def _problem(self, text: str) -> None:
        self._snap.problems = (self._snap.problems + [text])[-50:]

    def _on_state(self, topic: str, payload: bytes, retained: bool) -> None:
        device_id = topic.split("/")[-2]
        with self._lock:
            if not payload:
                self._snap.states.pop(device_id, None)
            else:
                try:
                    self._snap.states[device_id] = DeviceState.from_dict(decode(payload, "device state"))
                except EdgeError as exc:
                    self._problem(f"{topic}: {exc}")
            self._bump()

    def _on_presence(self, topic: str, payload: bytes, retained: bool) -> None:
        device_id = topic.split("/")[-2]
        with self._lock:
            if not payload:
                self._snap.presence.pop(device_id, None)
            else:
                self._snap.presence[device_id] = payload.decode("utf-8", "replace")
            self._bump()

    def _on_release(self, topic: str, payload: bytes, retained: bool) -> None:
        name = topic.rsplit("/", 1)[-1]
        with self._lock:
            if not payload:
                self._snap.releases.pop(name, None)
            else:
                try:
                    doc = decode(payload, "release")
                    self._snap.releases[name] = (Release.from_dict(doc), doc)
                except EdgeError as exc:
                    self._problem(f"{topic}: {exc}")
            self._bump()

    def _on_rollout(self, topic: str, payload: bytes, retained: bool) -> None:
        name = topic.rsplit("/", 1)[-1]
        with self._lock:
            if not payload:
                self._snap.rollouts.pop(name, None)
            else:
                try:
                    self._snap.rollouts[name] = Rollout.from_dict(decode(payload, "rollout"))
                except EdgeError as exc:
                    self._problem(f"{topic}: {exc}")
            self._bump()


# -- fleet status ---------------------------------------------------------------------------
@dataclass
class DeviceRow:
    """One device in ``fleet status``."""

    device_id: str
    presence: str  # online | offline | unknown (no presence message retained)
    models: dict[str, str]  # name -> active version
    last_update: UpdateReport | None  # the most recent update attempt of any model
    updates: dict[str, UpdateReport]  # name -> last attempt
    last_seen: float | None  # when the device last published its state (its clock)
    agent_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rows_from(snap: Snapshot) -> list[DeviceRow]:
    """One row per device that has a retained state or presence, sorted by id."""
    rows = []
    for device_id in sorted(set(snap.states) | set(snap.presence)):
        state = snap.states.get(device_id)
        raw = snap.presence.get(device_id)
        presence = (
            "online"
            if raw == PRESENCE_ONLINE.decode()
            else "offline"
            if raw == PRESENCE_OFFLINE.decode()
            else "unknown"
        )
        updates = dict(state.updates) if state else {}
        last = max(updates.values(), key=lambda u: u.at, default=None)
        rows.append(
            DeviceRow(
                device_id,
                presence,
                dict(state.models) if state else {},
                last,
                updates,
                state.last_seen if state else None,
                state.agent_version if state else "",
            )
        )
    return rows


def fleet_status(
    broker_url: str, fleet: str, timeout_s: float = 2.0, *, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
) -> list[DeviceRow]:
    """Every device of ``fleet`` from the broker's retained state and presence topics."""
    check_fleet(fleet)
    with open_link(broker_url, connect_timeout_s) as link:
        view = FleetView(link, fleet).sync(timeout_s)
        return rows_from(view.snapshot())


def check_fleet(fleet: str) -> str:
    try:
        return check_segment(fleet, "fleet")
    except EdgeError as exc:
        raise InputError(str(exc)) from exc


def rows_json(rows: list[DeviceRow]) -> str:
    return json.dumps([r.to_dict() for r in rows], indent=2, sort_keys=True)


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    s = max(0.0, now - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"


def render_table(rows: list[DeviceRow], fleet: str, console: Any = None) -> None:
    """Print ``rows`` as a rich table (stdout)."""
    from rich.console import Console
    from rich.table import Table

    now = time.time()
    table = Table(title=f"fleet {fleet}: {sum(r.presence == 'online' for r in rows)}/{len(rows)} online")
    for col in ("device", "presence", "models", "last update", "result", "reason", "last seen"):
        table.add_column(col)
    for r in rows:
        u = r.last_update
        colour = {"online": "green", "offline": "red"}.get(r.presence, "yellow")
        table.add_row(
            r.device_id,
            f"[{colour}]{r.presence}[/]",
            " ".join(f"{k}={v}" for k, v in sorted(r.models.items())) or "-",
            f"{u.name} {u.version} ({u.state})" if u else "-",
            (u.result or "in progress") if u else "-",
            (u.reason or "") if u else "",
            _ago(r.last_seen, now),
        )
    (console or Console()).print(table)
