"""``max_bps`` measured where it matters: bytes per second arriving at a subscriber of the real broker."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from edge_agent.mqtt.link import MqttLink
from edge_agent.telemetry import ModelPolicy, Telemetry
from edge_agent.telemetry.outbox import Row
from edge_agent.wire.telemetry import decode_batch
from edge_agent.wire.topics import telemetry_filter
from tests.broker import Broker

MAX_BPS = 20_000


def test_upload_rate_stays_within_ten_percent_of_max_bps(tmp_path: Path, broker: Broker) -> None:
    rng = np.random.default_rng(0)
    tel = Telemetry(
        tmp_path, registry=CollectorRegistry(), policy=lambda m: ModelPolicy(), flush_interval_s=0.05,
        max_rows=None, max_bytes=None,
    )  # fmt: skip
    rows = [
        Row("prediction", time.time(), json.dumps({"model": "m", "request_id": f"r{i}", "x": rng.random(32).tolist()}))
        for i in range(3000)
    ]
    tel.outbox.append(rows)  # a backlog far above what 6 s at MAX_BPS can carry

    arrivals: list[tuple[float, int, int]] = []  # (time, payload bytes, last seq)
    lock = threading.Lock()

    def on_batch(topic: str, payload: bytes, retained: bool) -> None:
        with lock:
            arrivals.append((time.monotonic(), len(payload), decode_batch(payload).last_seq))

    watcher = MqttLink(broker.url)
    watcher.subscribe(telemetry_filter("f"), on_batch)
    watcher.start()
    assert watcher.wait_connected(10)
    device = MqttLink(broker.url)
    device.start()
    tel.attach(device, "f", "dev-1", max_bps=MAX_BPS, resend_timeout_s=60)
    assert tel.uploader is not None
    tel.uploader.window = 1000  # no ingest acks here: let the pace, not the window, bound the upload
    tel.start()
    try:
        time.sleep(7.0)
    finally:
        tel.stop()
        device.stop()
        watcher.stop()
    with lock:
        got = list(arrivals)
    assert len(got) >= 5, got
    # Bytes that arrived before the last message, over the time they took: the sustained rate.
    span = got[-1][0] - got[0][0]
    rate = sum(n for _, n, _ in got[:-1]) / span
    assert abs(rate - MAX_BPS) <= 0.10 * MAX_BPS, f"{rate:.0f} B/s against max_bps {MAX_BPS}"
    assert [s for _, _, s in got] == sorted(s for _, _, s in got)
