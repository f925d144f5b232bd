"""The frozen agent (#11): build time, folder size by library, cold start to first prediction, idle RSS.

    .venv/bin/python bench/ship_bench.py [--runs 5] [--out bench/out/ship.json] [--folder DIR] [--writer process]

Builds ``tools/package.py`` into a temp dir (a fresh PyInstaller run, its own work dir), then
starts the frozen ``edge-agent run`` and, side by side, the source install's ``edge-agent run``
(the same data dir layout, shipped models installed on the first start): time from ``exec`` to
the first 200 of a digits ``infer``, and two seconds after that prediction (idle): VmRSS of the
agent process, and of the agent with its children (a telemetry writer process with `--writer process`)
both as summed VmRSS and as summed PSS (``smaps_rollup``: shared library pages counted once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import package  # noqa: E402

from bench.procstat import children, cpu_s, pss_mb, rss_mb  # noqa: E402
from tests.support.frozen import FrozenAgent, digits_body  # noqa: E402


def memory(pid: int) -> dict[str, float]:
    """The agent's VmRSS, and with its children: summed VmRSS and summed PSS (MB)."""
    tree = [pid, *children(pid)]
    return {"rss_mb": rss_mb(pid), "tree_rss_mb": sum(map(rss_mb, tree)), "tree_pss_mb": sum(map(pss_mb, tree)),
            "processes": len(tree)}  # fmt: skip


WRITER: dict[str, str] = {}  # --writer: the [telemetry] writer setting given to the agents


def first_prediction(binary: Path, data: Path, log: Path) -> tuple[float, float, dict[str, float]]:
    """Seconds from start to the first 200 of an infer, the CPU seconds used by then, and the idle memory 2 s later."""
    agent = FrozenAgent(binary, data, log=log, EDGEFLEET_MODELS_DIR=str(REPO / "models"), **WRITER)
    t0 = time.monotonic()
    agent.start()
    try:
        while True:
            assert agent.proc is not None and agent.proc.poll() is None, log.read_text()[-2000:]
            try:
                if agent.request("POST", "/v2/models/digits/infer", digits_body())[0] == 200:
                    break
            except OSError:
                time.sleep(0.005)
        took, cpu = time.monotonic() - t0, cpu_s(agent.proc.pid)
        time.sleep(2)
        return took, cpu, memory(agent.proc.pid)
    finally:
        agent.terminate()


def measure(binary: Path, tmp: Path, runs: int, label: str) -> dict[str, Any]:
    data = tmp / f"data-{label}"
    first, _, _ = first_prediction(binary, data, tmp / f"{label}.log")  # first start: installs the shipped models
    starts, cpus, rss = [], [], []
    for _ in range(runs):
        s, c, r = first_prediction(binary, data, tmp / f"{label}.log")
        starts.append(s)
        cpus.append(c)
        rss.append(r)
    t0 = time.monotonic()
    subprocess.run([str(binary), "--help"], capture_output=True, check=True)
    return {"first_start_s": round(first, 3), "start_p50_s": round(statistics.median(starts), 3),
            "start_max_s": round(max(starts), 3), "start_cpu_p50_s": round(statistics.median(cpus), 3),
            "load_avg_1m": os.getloadavg()[0], "processes": rss[0]["processes"],
            **{f"idle_{k}": round(statistics.median(r[k] for r in rss), 1) for k in ("rss_mb", "tree_rss_mb", "tree_pss_mb")},
            "help_s": round(time.monotonic() - t0, 3)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "ship.json")
    parser.add_argument("--folder", type=Path, help="measure this existing build (no build, no .deb)")
    parser.add_argument("--writer", choices=("process", "thread"), help="[telemetry] writer (default: the agent's)")
    args = parser.parse_args()
    if args.writer:
        WRITER["EDGEFLEET_TELEMETRY__WRITER"] = args.writer
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if args.folder is not None:
            result = {"frozen": measure(args.folder / "edge-agent", tmp, args.runs, "frozen")}
            print(json.dumps(result, indent=2))
            return 0
        t0 = time.monotonic()
        folder = package.build(tmp / "dist", tmp / "work")
        build_s = time.monotonic() - t0
        sizes = package.sizes(folder)
        frozen = measure(folder / "edge-agent", tmp, args.runs, "frozen")
        source = measure(Path(sys.executable).parent / "edge-agent", tmp, args.runs, "source")
        deb = subprocess.run([sys.executable, str(REPO / "tools" / "deb.py"), "--folder", str(folder), "--out",
                              str(tmp / "deb")], capture_output=True, text=True, check=True)  # fmt: skip
        deb_mb = Path(deb.stdout.strip().splitlines()[-1]).stat().st_size / 1e6
        shutil.rmtree(tmp / "work", ignore_errors=True)
    result = {"build_s": round(build_s, 1), "folder_mb": round(sum(n for _, n in sizes) / 1e6, 1),
              "deb_mb": round(deb_mb, 1), "sizes_mb": {k: round(n / 1e6, 1) for k, n in sizes if n >= 1e6},
              "frozen": frozen, "source": source}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
