"""GIL hand-offs of the telemetry writer, and telemetry on vs off at c=8 as paired rounds (issue #8).

    .venv/bin/python bench/gil_bench.py [--rounds 30] [--requests 1500]

1. ``inference.arrays.concat`` against ``np.stack`` / ``np.concatenate`` for 1,500 arrays of 10
   floats (one telemetry flush's outputs at ~6,000 requests/s);
2. two real ``edge-agent run`` processes on digits, telemetry off and on (``sample_inputs`` 0.1,
   the default writer), 20,000 requests at c=8 each (tritonclient, this process): each thread's
   voluntary context switches per request (a background thread that waits for the GIL switches
   once per wait) and CPU;
3. the same two agents, ``--rounds`` alternating rounds of ``--requests`` at c=8: the median of the
   per-round ratios on/off (adjacent rounds share the machine's state, so the paired ratio moves
   less than the ratio of medians) for throughput, p50 and the agent's CPU per request.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench.procstat import cpu_s, switches  # noqa: E402
from edge_agent.inference.arrays import concat  # noqa: E402
from edge_agent.models.store import ModelStore  # noqa: E402

DIGITS = REPO / "models" / "digits" / "1"
ENV = {
    "off": {"EDGEFLEET_TELEMETRY__ENABLED": "false"},
    "on": {"EDGEFLEET_TELEMETRY__ENABLED": "true", "EDGEFLEET_TELEMETRY__SAMPLE_INPUTS": "0.1"},
}


def joins() -> dict[str, float]:
    arrays = [np.random.default_rng(i).random((1, 10)).astype(np.float32) for i in range(1500)]
    ways = {
        "np.stack": lambda: np.stack(arrays),
        "np.concatenate+reshape": lambda: np.concatenate(arrays).reshape(len(arrays), 1, 10),
        "arrays.concat": lambda: concat(arrays, stack=True),
    }
    out = {}
    for name, fn in ways.items():
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        out[name] = (time.perf_counter() - t0) / 200 * 1e6
    return out


def _threads(pid: int) -> dict[int, tuple[int, int, float]]:
    out = {}
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        try:
            out[tid] = (*switches(pid, tid), cpu_s(pid, tid))
        except OSError:
            continue
    return out


def main() -> int:
    from run import free_port, http_bench, start_agent

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--requests", type=int, default=1500)
    args = ap.parse_args()
    print("joining 1,500 arrays of 10 floats, µs:", {k: round(v, 1) for k, v in joins().items()})
    x = np.random.default_rng(1).random((1, 8, 8, 1)).astype(np.float32) * 16
    with tempfile.TemporaryDirectory() as d:
        ports = {k: free_port() for k in ENV}
        procs = {}
        for k, env in ENV.items():
            ModelStore(Path(d) / k).install_dir(DIGITS)
            procs[k] = start_agent(Path(d) / k, ports[k], env)
        try:
            n = 20_000
            for k, proc in procs.items():
                http_bench(ports[k], "digits", x, False, 2000, 8)
                before = _threads(proc.pid)
                http_bench(ports[k], "digits", x, False, n, 8)
                after = _threads(proc.pid)
                for tid, (v, nv, c) in sorted(after.items()):
                    v0, nv0, c0 = before.get(tid, (0, 0, 0.0))
                    if (v - v0) + (nv - nv0) > n // 100:
                        role = "event loop" if tid == proc.pid else "other thread"
                        print(f"{k:>3} {role:>12} {tid}: voluntary {(v - v0) / n:.3f}/request, "
                              f"involuntary {(nv - nv0) / n:.3f}/request, CPU {(c - c0) / n * 1e6:.1f} µs/request")  # fmt: skip
            rps: dict[str, list[float]] = {k: [] for k in ENV}
            cpu: dict[str, list[float]] = {k: [] for k in ENV}
            p50: dict[str, list[float]] = {k: [] for k in ENV}
            for r in range(args.rounds):
                for k in ENV if r % 2 == 0 else list(ENV)[::-1]:
                    c0 = cpu_s(procs[k].pid)
                    res = http_bench(ports[k], "digits", x, False, args.requests, 8)
                    cpu[k].append((cpu_s(procs[k].pid) - c0) / (args.requests + 800))
                    rps[k].append(res["throughput_per_s"])
                    p50[k].append(res["p50_ms"])
        finally:
            for p in procs.values():
                p.terminate()
                p.wait(timeout=30)
    ratio = statistics.median(b / a for a, b in zip(rps["off"], rps["on"], strict=True))
    cpu_ratio = statistics.median(b / a for a, b in zip(cpu["off"], cpu["on"], strict=True))
    p50_ratio = statistics.median(b / a for a, b in zip(p50["off"], p50["on"], strict=True))
    print(f"c=8, {args.rounds} paired rounds of {args.requests}: throughput on/off {ratio:.3f} "
          f"({(ratio - 1) * 100:+.1f}%; goal >= -5%: {'met' if ratio >= 0.95 else 'MISSED'}), "
          f"p50 on/off {p50_ratio:.3f} ({'met' if p50_ratio <= 1.05 else 'MISSED'}), "
          f"agent CPU per request on/off {cpu_ratio:.3f}; medians off {statistics.median(rps['off']):.0f}, "
          f"on {statistics.median(rps['on']):.0f} req/s, p50 off {statistics.median(p50['off']):.3f}, "
          f"on {statistics.median(p50['on']):.3f} ms")  # fmt: skip
    print(f"reproduce: `.venv/bin/python bench/gil_bench.py --rounds {args.rounds} --requests {args.requests}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
