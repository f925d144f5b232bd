"""A stand-in device for ingest tests: it uploads well-formed telemetry batches and re-sends what is unacked.

Not the agent (that is ``edge_agent.telemetry``, tested on its own): a few records with known
contents, published QoS 1 with ``edge_agent.wire.telemetry.encode_batch``, following the same
ack rule (delete up to the retained ack, re-send from the first unacked record after a timeout),
so the ingest tests know exactly which rows the store must end up holding.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds

from edge_agent.mqtt.link import MqttLink
from edge_agent.wire.telemetry import TelemetryBatch, TelemetryRecord, decode_ack, encode_batch
from edge_agent.wire.topics import telemetry_ack_topic, telemetry_topic

T0 = 1_764_590_400.0  # 2025-12-01T12:00:00Z


def record(seq: int, device_id: str) -> TelemetryRecord:
    """Record ``seq``: every 10th a feedback label for the prediction before it, every 5th prediction sampled."""
    if seq % 10 == 0:
        body: dict[str, Any] = {"model": "digits", "request_id": f"{device_id}-r{seq - 1}", "label": seq % 7}
        return TelemetryRecord(seq, "feedback", T0 + seq, body)
    body = {
        "model": "digits",
        "version": "1",
        "request_id": f"{device_id}-r{seq}",
        "latency_ms": 0.2,
        "outputs": {"probs": {"top_k": [[seq % 10, 0.9]]}},
    }
    if seq % 5 == 4:
        body["inputs"] = {"pixels": {"shape": [1, 2], "datatype": "FP32", "data": [float(seq), 1.5]}}
    return TelemetryRecord(seq, "prediction", T0 + seq, body)


def payload(fleet: str, device_id: str, first: int, last: int, dropped: dict[str, int] | None = None) -> bytes:
    """The encoded batch of records ``first..last``."""
    records = tuple(record(s, device_id) for s in range(first, last + 1))
    return encode_batch(TelemetryBatch(device_id, fleet, first, last, records, dropped or {}))


class StandInDevice:
    """Holds records 1..``total``; ``upload`` publishes the unacked ones in batches of ``per_batch``."""

    def __init__(self, url: str, fleet: str, device_id: str, total: int, per_batch: int = 10) -> None:
        self.fleet, self.device_id, self.total, self.per_batch = fleet, device_id, total, per_batch
        self.acked = 0
        self._changed = threading.Event()
        self.link = MqttLink(url, client_id=f"standin-{device_id}")
        self.link.start()
        if not self.link.wait_connected(10):
            raise RuntimeError("stand-in device cannot connect")
        self.link.subscribe(telemetry_ack_topic(fleet, device_id), self._on_ack)

    def _on_ack(self, topic: str, data: bytes, retained: bool) -> None:
        self.acked = max(self.acked, decode_ack(data, self.device_id))
        self._changed.set()

    def upload(self) -> int:
        """Publish every unacked record once (QoS 1, broker-acknowledged); returns the batches sent."""
        sent = 0
        for first in range(self.acked + 1, self.total + 1, self.per_batch):
            last = min(first + self.per_batch - 1, self.total)
            self.link.publish(
                telemetry_topic(self.fleet, self.device_id), payload(self.fleet, self.device_id, first, last), wait_s=10
            )
            sent += 1
        return sent

    def sync(self, timeout_s: float = 60.0, resend_s: float = 1.0) -> int:
        """Re-send the unacked records every ``resend_s`` until all are acked; returns the re-send rounds."""
        deadline, rounds = time.monotonic() + timeout_s, 0
        while self.acked < self.total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.device_id}: acked {self.acked} of {self.total}")
            self._changed.clear()
            if not self._changed.wait(resend_s) and self.acked < self.total:
                self.upload()
                rounds += 1
        return rounds

    def close(self) -> None:
        self.link.stop()


def stored(store: Path) -> list[tuple[str, int]]:
    """Every (device_id, seq) in the visible Parquet dataset, read as pyarrow/DuckDB/Spark would read it."""
    t = ds.dataset(store, format="parquet", partitioning="hive").to_table(columns=["device_id", "seq"])
    return list(zip(t.column("device_id").to_pylist(), t.column("seq").to_pylist(), strict=True))
