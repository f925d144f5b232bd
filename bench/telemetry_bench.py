"""Telemetry cost and throughput (issue #8), side by side in one run → docs/benchmarks.md.

    .venv/bin/python bench/telemetry_bench.py [--quick]

1. in-process inference path on digits (``InferPath.infer_sync``: decode → predict → encode), telemetry
   off vs on (``sample_inputs = 0.1``, the writer thread committing every 250 ms), interleaved;
2. HTTP on two real ``edge-agent run`` processes (telemetry off / on, sample 0.1): p50 at c=1 and
   throughput at c=8 through tritonclient, alternating rounds;
3. outbox write rate (``Recorder.flush``: build + one SQLite transaction per flush);
4. upload bytes per prediction (batches as the uploader builds them);
5. drain time of a 100k-record backlog into ``cloud_batch.ingest`` through a real mosquitto.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from run import free_port, http_bench, start_agent  # noqa: E402

from edge_agent.http.infer import InferPath  # noqa: E402
from edge_agent.models.serving import ModelServer  # noqa: E402
from edge_agent.models.store import ModelStore  # noqa: E402
from edge_agent.telemetry import ModelPolicy, Telemetry  # noqa: E402
from edge_agent.wire.telemetry import encode_rows  # noqa: E402

DIGITS = REPO / "models" / "digits" / "1"


def _telemetry(data_dir: Path, sample: float, flush_s: float = 0.25) -> Telemetry:
    return Telemetry(
        data_dir, registry=CollectorRegistry(), policy=lambda m: ModelPolicy(True, sample),
        flush_interval_s=flush_s, max_rows=None, max_bytes=None,
    )  # fmt: skip


def _body(x: np.ndarray) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    ).encode()


def in_process(tmp: Path, n: int) -> dict:
    store = ModelStore(tmp / "inproc")
    store.install_dir(DIGITS)
    server = ModelServer(store)
    server.sync()
    model = server.get("digits")
    tel = _telemetry(tmp / "inproc", 0.1)
    tel.start()
    off = InferPath(None, CollectorRegistry())
    on = InferPath(None, CollectorRegistry(), recorder=tel.recorder)
    xs = np.random.default_rng(0).random((256, 1, 8, 8, 1)).astype(np.float32) * 16
    bodies = [_body(x) for x in xs]
    for i in range(500):  # warm-up
        off.infer_sync(model, bodies[i % 256], None)
        on.infer_sync(model, bodies[i % 256], None)
    t_off, t_on = [], []
    clock = time.perf_counter
    for i in range(n):
        b = bodies[i % 256]
        first, second = (on, off) if i % 2 else (off, on)
        t0 = clock()
        first.infer_sync(model, b, None)
        t1 = clock()
        second.infer_sync(model, b, None)
        t2 = clock()
        (t_on if first is on else t_off).append(t1 - t0)
        (t_off if first is on else t_on).append(t2 - t1)
    tel.stop()
    server.stop()
    p50_off, p50_on = statistics.median(t_off) * 1e6, statistics.median(t_on) * 1e6
    return {"n": n, "p50_off_us": p50_off, "p50_on_us": p50_on, "delta_us": p50_on - p50_off}


def _agent(data_dir: Path, port: int, telemetry: bool) -> subprocess.Popen:
    ModelStore(data_dir).install_dir(DIGITS)
    env = {"EDGEFLEET_TELEMETRY__ENABLED": str(telemetry).lower(), "EDGEFLEET_TELEMETRY__SAMPLE_INPUTS": "0.1"}
    return start_agent(data_dir, port, env)


def http(tmp: Path, n: int, rounds: int) -> dict:
    ports = {"off": free_port(), "on": free_port()}
    procs = {k: _agent(tmp / f"http-{k}", p, k == "on") for k, p in ports.items()}
    x = np.random.default_rng(1).random((1, 8, 8, 1)).astype(np.float32) * 16
    res: dict[str, dict[str, list[float]]] = {k: {"p50": [], "rps": []} for k in ports}
    try:
        for r in range(rounds):
            for k in ("off", "on") if r % 2 == 0 else ("on", "off"):
                c1 = http_bench(ports[k], "digits", x, False, n, 1)
                c8 = http_bench(ports[k], "digits", x, False, n * 2, 8)
                res[k]["p50"].append(c1["p50_ms"])
                res[k]["rps"].append(c8["throughput_per_s"])
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(timeout=30)
    return {k: {"p50_ms": statistics.median(v["p50"]), "rps_c8": statistics.median(v["rps"])} for k, v in res.items()}


def _fill(tel: Telemetry, n: int, sample: float) -> float:
    """Queue ``n`` digits predictions as the hot path would and time the writer's flushes."""
    store = ModelStore(Path(tel.outbox.path).parent / "fill")
    store.install_dir(DIGITS)
    server = ModelServer(store)
    server.sync()
    model = server.get("digits")
    xs = np.random.default_rng(2).random((256, 1, 8, 8, 1)).astype(np.float32) * 16
    outs = [model.predict({"pixels": x}) for x in xs]
    server.stop()
    took = 0.0
    for start in range(0, n, 2500):  # 2,500 per flush: 10k predictions/s at flush_interval_ms = 250
        for i in range(start, min(n, start + 2500)):
            tel.recorder.prediction(model.manifest, f"r{i}", 0.0002, {"pixels": xs[i % 256]}, outs[i % 256])
        t0 = time.perf_counter()
        tel.flush()
        took += time.perf_counter() - t0
    return n / took


def bytes_per_prediction(tel: Telemetry, n: int) -> float:
    rows = tel.outbox.read_after(0, 10**12, limit_rows=n)
    total, i = 0, 0
    while i < len(rows):
        part = rows[i : i + 2000]
        while True:
            try:
                total += len(encode_rows("dev-1", "f", part[0][0], part, {}))
                break
            except Exception:
                part = part[: len(part) // 2]
        i += len(part)
    return total / len(rows)


def drain(tmp: Path, n: int) -> dict:
    from cloud_batch.ingest.consumer import IngestOptions, run_ingest
    from edge_agent.mqtt.link import MqttLink
    from tests.broker import Broker

    tel = _telemetry(tmp / "drain", 0.1)
    _fill(tel, n, 0.1)
    broker = Broker(tmp / "mosquitto").start()
    stop = threading.Event()
    opts = IngestOptions(fleet="bench", broker_url=broker.url, store=tmp / "store", follow=True)
    ingest = threading.Thread(target=run_ingest, args=(opts,), kwargs={"stop": stop}, daemon=True)
    ingest.start()
    time.sleep(1.0)
    link = MqttLink(broker.url)
    link.start()
    tel.attach(link, "bench", "dev-1", max_bps=None, resend_timeout_s=30)
    t0 = time.perf_counter()
    tel.start()
    while tel.outbox.stats().rows:
        time.sleep(0.1)
    took = time.perf_counter() - t0
    sent = tel.uploader.status() if tel.uploader else {}
    tel.stop()
    link.stop()
    stop.set()
    ingest.join(timeout=30)
    broker.stop()
    return {"records": n, "seconds": took, "bytes": sent.get("bytes"), "batches": sent.get("batches")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    q = args.quick
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        out: dict = {"in_process": in_process(tmp, 5000 if q else 20000)}
        tel = _telemetry(tmp / "rate", 0.1)
        out["outbox_rows_per_s"] = _fill(tel, 20000 if q else 100000, 0.1)
        out["bytes_per_prediction_sample_0.1"] = bytes_per_prediction(tel, 20000)
        tel.stop()
        tel0 = _telemetry(tmp / "rate0", 0.0)
        _fill(tel0, 20000, 0.0)
        out["bytes_per_prediction_sample_0"] = bytes_per_prediction(tel0, 20000)
        tel0.stop()
        out["http"] = http(tmp, 1000 if q else 3000, 2 if q else 4)
        out["drain"] = drain(tmp, 20000 if q else 100000)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
