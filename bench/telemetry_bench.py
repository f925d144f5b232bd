"""Telemetry cost and throughput (issue #8), side by side in one run → docs/benchmarks.md.

    .venv/bin/python bench/telemetry_bench.py [--quick] [--process]
    .venv/bin/python bench/telemetry_bench.py --writer-only [--code DIR]   # DIR: another tree's edge_agent

1. in-process inference path on digits (``InferPath.infer_sync``: decode → predict → encode), telemetry
   off vs on (``sample_inputs = 0.1``, the default writer, on the telemetry thread, committing every 250 ms),
   interleaved;
2. HTTP on real ``edge-agent run`` processes (telemetry off / on with the default writer; ``--process`` adds
   a third agent with ``[telemetry] writer = "process"``, the packs built in the writer process): p50 at c=1 and
   throughput at c=8 through tritonclient, alternating rounds, and the CPU each one costs per request
   at c=8: the agent process (``/proc/<pid>/stat``), its event-loop thread, its telemetry thread
   (``writer_cpu_s`` in ``/agent/status``) and the writer process (``writer.cpu_s``): what telemetry
   costs, far less sensitive to a busy machine than req/s, and none of it hidden in another process;
3. outbox write rate (``Recorder.flush`` with the in-process writer: build + one SQLite transaction);
4. upload bytes per prediction (batches as the uploader builds them);
5. drain time of a 100k-record backlog into ``cloud_batch.ingest`` through a real mosquitto.

The last lines print a summary against the goals (c=8 throughput ≤ 5% worse, in-process ≤ +3 µs).
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
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

if "--code" in sys.argv:  # another tree's edge_agent (e.g. `git archive HEAD edge_agent`), for --writer-only
    sys.path.insert(0, sys.argv[sys.argv.index("--code") + 1])

from bench.procstat import cpu_s  # noqa: E402
from edge_agent.http.infer import InferPath  # noqa: E402
from edge_agent.models.serving import ModelServer  # noqa: E402
from edge_agent.models.store import ModelStore  # noqa: E402
from edge_agent.telemetry import ModelPolicy, Telemetry  # noqa: E402
from edge_agent.wire.telemetry import encode_rows  # noqa: E402

DIGITS = REPO / "models" / "digits" / "1"


def _telemetry(data_dir: Path, sample: float, flush_s: float = 0.25, writer: str = "thread") -> Telemetry:
    how = {} if writer == "thread" else {"writer": writer}  # a --code tree from before the writer process
    return Telemetry(
        data_dir, registry=CollectorRegistry(), policy=lambda m: ModelPolicy(True, sample),
        flush_interval_s=flush_s, max_rows=None, max_bytes=None, **how,
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
    tel = _telemetry(tmp / "inproc", 0.1)  # as the agent runs it by default
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


def _agent(data_dir: Path, port: int, kind: str) -> subprocess.Popen:
    from run import start_agent  # bench/run.py imports edge_agent from this tree: not with --code

    ModelStore(data_dir).install_dir(DIGITS)
    env = {
        "EDGEFLEET_TELEMETRY__ENABLED": str(kind != "off").lower(),
        "EDGEFLEET_TELEMETRY__SAMPLE_INPUTS": "0.1",
        "EDGEFLEET_TELEMETRY__WRITER": "process" if kind == "process" else "thread",
    }
    return start_agent(data_dir, port, env)


def _cpu(pid: int, port: int) -> dict[str, float]:
    """CPU seconds so far: the agent process, its event-loop (main) thread, its telemetry thread, the writer process."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/agent/status", timeout=10) as r:
        tel = json.loads(r.read()).get("telemetry") or {}
    return {
        "agent": cpu_s(pid),
        "loop": cpu_s(pid, pid),
        "tel_thread": float(tel.get("writer_cpu_s", 0.0)),
        "writer_proc": float((tel.get("writer") or {}).get("cpu_s", 0.0)),
    }


def http(tmp: Path, n: int, rounds: int, kinds: tuple[str, ...] = ("off", "on")) -> dict:
    from run import free_port, http_bench

    ports = {k: free_port() for k in kinds}
    procs = {k: _agent(tmp / f"http-{k}", p, k) for k, p in ports.items()}
    x = np.random.default_rng(1).random((1, 8, 8, 1)).astype(np.float32) * 16
    res: dict[str, dict[str, list[float]]] = {k: {"p50": [], "rps": [], "p50_c8": []} for k in ports}
    try:
        for r in range(rounds):
            for k in kinds if r % 2 == 0 else kinds[::-1]:
                c1 = http_bench(ports[k], "digits", x, False, n, 1)
                before = _cpu(procs[k].pid, ports[k])
                c8 = http_bench(ports[k], "digits", x, False, n * 2, 8)
                time.sleep(0.6)  # the writer commits what c=8 queued (flush_interval_ms = 250)
                after = _cpu(procs[k].pid, ports[k])
                requests = n * 2 + 800  # + 8 x 100 warm-up
                for part, value in before.items():
                    res[k].setdefault(part, []).append((after[part] - value) / requests * 1e6)
                res[k]["p50"].append(c1["p50_ms"])
                res[k]["rps"].append(c8["throughput_per_s"])
                res[k]["p50_c8"].append(c8["p50_ms"])
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(timeout=30)
    return {k: _http_result(v) for k, v in res.items()}


def _http_result(v: dict[str, list[float]]) -> dict:
    cpu = {
        f"{part}_us": round(statistics.median(v[part]), 1) for part in ("agent", "loop", "tel_thread", "writer_proc")
    }
    both = [a + w for a, w in zip(v["agent"], v["writer_proc"], strict=True)]
    cpu["agent_plus_writer_proc_us"] = round(statistics.median(both), 1)
    return {
        "p50_ms": statistics.median(v["p50"]),
        "rps_c8": statistics.median(v["rps"]),
        "p50_c8_ms": statistics.median(v["p50_c8"]),
        "cpu_per_req_c8": cpu,
        "rounds_rps_c8": [round(x) for x in v["rps"]],
    }


def _digits_samples(where: Path) -> tuple[Any, np.ndarray, list[dict[str, np.ndarray]]]:
    """digits' manifest, 256 random inputs and their outputs (what the hot path hands the recorder)."""
    store = ModelStore(where)
    store.install_dir(DIGITS)
    server = ModelServer(store)
    server.sync()
    model = server.get("digits")
    xs = np.random.default_rng(2).random((256, 1, 8, 8, 1)).astype(np.float32) * 16
    outs = [model.predict({"pixels": x}) for x in xs]
    server.stop()
    return model.manifest, xs, outs


def _fill(tel: Telemetry, n: int, samples: Any = None) -> tuple[float, float]:
    """Queue ``n`` digits predictions as the hot path would; the writer's records/s and CPU µs per record."""
    manifest, xs, outs = samples or _digits_samples(Path(tel.outbox.path).parent / "fill")
    took = cpu = 0.0
    for start in range(0, n, 2500):  # 2,500 per flush: 10k predictions/s at flush_interval_ms = 250
        for i in range(start, min(n, start + 2500)):
            tel.recorder.prediction(manifest, tel.recorder.new_id(), 0.0002, {"pixels": xs[i % 256]}, outs[i % 256])
        t0, c0 = time.perf_counter(), time.thread_time()
        tel.flush()
        took += time.perf_counter() - t0
        cpu += time.thread_time() - c0  # this thread's CPU (SQLite's work included; not its fsync waits)
    return n / took, cpu / n * 1e6


def writer_phases(tmp: Path) -> dict[str, float]:
    """Writer CPU µs per record over the first 100k predictions and the next 100k (recent-id index and
    outbox full: the steady state of a long-running agent); 2,500 per flush, sample 0.1, bound 100k."""
    tel = _telemetry(tmp / "phases", 0.1)
    tel.outbox.max_rows, tel.outbox.max_bytes = 100_000, 64 * 2**20
    samples = _digits_samples(tmp / "phases-models")
    out = {phase: round(_fill(tel, 100_000, samples)[1], 2) for phase in ("first_100k", "next_100k")}
    tel.stop()
    return out


def bytes_per_prediction(tel: Telemetry, n: int) -> float:
    """Compressed batch bytes per prediction over the first ``n`` predictions (rows may be packs of many)."""
    rows, records = [], 0
    for row in tel.outbox.read_after(0, 10**12, limit_rows=n):
        records += json.loads(row[3]).get("n", 1) if row[1] == "predictions" else 1
        rows.append(row)
        if records >= n:
            break
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
    return total / records


def drain(tmp: Path, n: int) -> dict:
    from cloud_batch.ingest.consumer import IngestOptions, run_ingest
    from edge_agent.mqtt.link import MqttLink
    from tests.broker import Broker

    tel = _telemetry(tmp / "drain", 0.1)
    _fill(tel, n)
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


def summary(out: dict) -> list[str]:
    """The goals, met or missed, in a few lines."""
    ip, h = out["in_process"], out["http"]
    off, on = h["off"], h["on"]
    drop = (on["rps_c8"] / off["rps_c8"] - 1) * 100
    lines = [
        f"in-process infer_sync p50 off -> on: {ip['p50_off_us']:.1f} -> {ip['p50_on_us']:.1f} us "
        f"({ip['delta_us']:+.1f} us; goal <= +3 us: {'met' if ip['delta_us'] <= 3 else 'MISSED'})",
        f"HTTP c=8 throughput off -> on: {off['rps_c8']:.0f} -> {on['rps_c8']:.0f} req/s "
        f"({drop:+.1f}%; goal >= -5%: {'met' if drop >= -5 else 'MISSED'})",
        f"HTTP c=8 p50 off -> on: {off['p50_c8_ms']:.3f} -> {on['p50_c8_ms']:.3f} ms "
        f"({(on['p50_c8_ms'] / off['p50_c8_ms'] - 1) * 100:+.1f}%; goal <= +5%: "
        f"{'met' if on['p50_c8_ms'] <= 1.05 * off['p50_c8_ms'] else 'MISSED'})",
        f"HTTP c=1 p50 off -> on: {off['p50_ms']:.3f} -> {on['p50_ms']:.3f} ms",
    ]
    for k, v in h.items():
        c = v["cpu_per_req_c8"]
        lines.append(
            f"CPU us/request at c=8, {k:>6}: agent {c['agent_us']:.1f} (event loop {c['loop_us']:.1f}, "
            f"telemetry thread {c['tel_thread_us']:.1f}) + writer process {c['writer_proc_us']:.1f} "
            f"= {c['agent_plus_writer_proc_us']:.1f}"
        )
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--process", action="store_true", help='add an agent with [telemetry] writer = "process"')
    ap.add_argument("--writer-only", action="store_true", help="only the writer's CPU per record, in 2 phases")
    ap.add_argument("--code", help="import edge_agent from this tree instead (with --writer-only)")
    args = ap.parse_args()
    q = args.quick
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.writer_only:
            import edge_agent

            print(json.dumps({"code": str(Path(edge_agent.__file__).parents[1]), **writer_phases(tmp)}))
            return 0
        out: dict = {"in_process": in_process(tmp, 5000 if q else 20000)}
        tel = _telemetry(tmp / "rate", 0.1)
        out["outbox_rows_per_s"], out["writer_cpu_us_per_record"] = _fill(tel, 20000 if q else 100000)
        out["bytes_per_prediction_sample_0.1"] = bytes_per_prediction(tel, 20000)
        tel.stop()
        tel0 = _telemetry(tmp / "rate0", 0.0)
        _fill(tel0, 20000)
        out["bytes_per_prediction_sample_0"] = bytes_per_prediction(tel0, 20000)
        tel0.stop()
        kinds = ("off", "on", "process") if args.process else ("off", "on")
        out["http"] = http(tmp, 1000 if q else 3000, 4, kinds)
        out["drain"] = drain(tmp, 20000 if q else 100000)
    print(json.dumps(out, indent=2))
    print("\n".join(["", "summary:", *summary(out)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
