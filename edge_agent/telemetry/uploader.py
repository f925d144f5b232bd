"""Uploading the outbox: QoS 1 batches out, the ingest's retained ack back, rows deleted only then.

The broker is a buffer, never the record of truth (a PUBACK means the broker has the batch, and a
broker drops what it queues for an offline subscriber beyond its limits). So:

* batches (``wire.telemetry.encode_rows``, at most 128 KiB compressed) are published QoS 1 on
  ``telemetry_topic``; each covers ``[first_seq, last_seq]`` from the previous batch's end;
* the ingest retains the highest contiguous seq it stored on ``telemetry_ack_topic``; only then are
  rows up to it deleted (:meth:`Outbox.ack`), and the ack is persisted with the deletion;
* at most ``window`` batches are unacked at once; when the ack does not move for ``resend_timeout_s``
  the uploader re-sends from the first unacked record, and after every (re)connect or restart it
  starts again from the ack (after ``connect_grace_s``, so the retained ack arrives first). The
  ingest deduplicates by ``(device_id, seq)``;
* ``max_bps`` paces publishes: after ``n`` bytes the next batch waits ``n / max_bps`` seconds, and
  a batch is kept to about one second's worth of bytes so the pace stays smooth.

The uploader never blocks serving: it runs on the telemetry thread, and with the broker down it
only waits (rows stay in the outbox, bounded).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from edge_agent.errors import EdgeError, TelemetryRejected
from edge_agent.telemetry.writer.remote import Store
from edge_agent.wire.telemetry import MAX_BATCH_BYTES, decode_ack, encode_rows
from edge_agent.wire.topics import telemetry_ack_topic, telemetry_topic

log = logging.getLogger(__name__)

MQTT_OVERHEAD = 10  # fixed header, packet id and properties of a QoS 1 PUBLISH, besides the topic


class Link(Protocol):
    """The part of ``mqtt.link.MqttLink`` the uploader uses (the transport seam)."""

    @property
    def connected(self) -> bool: ...

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, wait_s: float | None = None
    ) -> None: ...

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes, bool], None], qos: int = 1) -> None: ...


class Uploader:
    """One device's upload state; :meth:`step` is called by the telemetry thread and says when to call again.

    ``max_bps`` and ``resend_timeout_s`` have no defaults here: ``TelemetryConfig`` is their one home.
    """

    def __init__(
        self,
        outbox: Store,
        link: Link,
        fleet: str,
        device_id: str,
        *,
        max_bps: float | None,
        resend_timeout_s: float,
        window: int = 8,
        connect_grace_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.outbox, self.link = outbox, link
        self.fleet, self.device_id = fleet, device_id
        self.topic = telemetry_topic(fleet, device_id)
        self.ack_topic = telemetry_ack_topic(fleet, device_id)
        self.max_bps, self.resend_timeout_s = max_bps, resend_timeout_s
        self.window, self.connect_grace_s = window, connect_grace_s
        self.clock = clock
        self.wake = threading.Event()
        self._acked = outbox.acked_seq()
        self._ack_target = self._acked
        self._sent = self._acked  # last seq published in this connection
        self._inflight: deque[int] = deque()  # last_seq of unacked batches, oldest first
        self._connected_at: float | None = None
        self._progress_at = clock()
        self._next_send = 0.0
        self._raw_per_byte = 4.0  # raw JSON bytes per compressed byte, learnt from each batch
        self.batches = self.bytes_sent = self.resends = 0

    def start(self) -> None:
        """Subscribe to this device's ack (retained: it arrives on every connect)."""
        self.link.subscribe(self.ack_topic, self._on_ack, qos=1)

    def _on_ack(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            seq = decode_ack(payload, self.device_id)
        except TelemetryRejected as exc:
            log.warning("ignoring a telemetry ack: %s", exc)
            return
        if seq > self._ack_target:
            self._ack_target = seq
            self.wake.set()

    # -- the loop body ----------------------------------------------------------------------
    def step(self) -> float:
        """Apply a new ack, publish at most one batch; the seconds until the next step is useful."""
        now = self.clock()
        self._apply_ack(now)
        if not self.link.connected:
            self._connected_at = None
            return 0.5
        if self._connected_at is None:
            self._connected_at = now
            self._restart(now)
        if now - self._connected_at < self.connect_grace_s:
            return self._connected_at + self.connect_grace_s - now
        if self._inflight and now - self._progress_at > self.resend_timeout_s:
            log.info("telemetry ack stuck at %d for %.0fs; re-sending", self._acked, now - self._progress_at)
            self.resends += 1
            self._restart(now)
        if len(self._inflight) >= self.window:
            return max(0.05, self._progress_at + self.resend_timeout_s - now)
        if now < self._next_send:
            return self._next_send - now
        return self._send(now)

    def _restart(self, now: float) -> None:
        self._sent = self._acked
        self._inflight.clear()
        self._progress_at = now

    def _apply_ack(self, now: float) -> None:
        target = self._ack_target
        if target <= self._acked:
            return
        last = self.outbox.stats().last_seq
        if target > last:
            log.warning("telemetry ack %d is beyond this outbox's last seq %d; ignored", target, last)
            self._ack_target = self._acked
            return
        self.outbox.ack(target)
        self._acked = target
        self._progress_at = now
        while self._inflight and self._inflight[0] <= target:
            self._inflight.popleft()
        self._sent = max(self._sent, target)

    def _send(self, now: float) -> float:
        budget = MAX_BATCH_BYTES * 0.85
        if self.max_bps:
            budget = min(budget, max(1024.0, self.max_bps))
        rows = self.outbox.read_after(self._sent, int(budget * self._raw_per_byte))
        if not rows:
            return 1.0
        dropped = self.outbox.dropped()
        while True:
            try:
                payload = encode_rows(self.device_id, self.fleet, self._sent + 1, rows, dropped)
                break
            except TelemetryRejected:
                if len(rows) == 1:
                    seq, kind = rows[0][0], rows[0][1]
                    log.error("telemetry record %d (%s) is larger than a batch; dropped", seq, kind)
                    self.outbox.delete(seq, kind)
                    return 0.0
                rows = rows[: len(rows) // 2]
        raw = sum(len(r[3]) for r in rows) + 60 * len(rows)
        self._raw_per_byte = max(1.0, raw / max(1, len(payload)))
        try:
            self.link.publish(self.topic, payload, qos=1)
        except EdgeError as exc:
            log.warning("telemetry publish failed: %s", exc)
            return 1.0
        self._sent = rows[-1][0]
        self._inflight.append(self._sent)
        self.batches += 1
        self.bytes_sent += len(payload)
        if self.max_bps:
            self._next_send = (
                max(now, self._next_send) + (len(payload) + len(self.topic) + MQTT_OVERHEAD) / self.max_bps
            )
        if len(self._inflight) == 1:
            self._progress_at = now
        return 0.0

    def status(self) -> dict[str, int | float | None]:
        return {
            "acked_seq": self._acked,
            "sent_seq": self._sent,
            "inflight_batches": len(self._inflight),
            "batches": self.batches,
            "bytes": self.bytes_sent,
            "resends": self.resends,
            "max_bps": self.max_bps,
        }
