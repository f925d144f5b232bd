"""tflite-runtime 2.14 against ai-edge-litert, one venv per Python, side by side in one run (issue #16).

    bash tools/setup_venv.sh                                         # .venv: 3.11, tflite-runtime
    VENV=.venv-3.12 PYTHON=python3.12 bash tools/setup_venv.sh       # ai-edge-litert
    .venv/bin/python bench/runtimes.py .venv .venv-3.12 [--rounds 3] [--quick]

Each round starts one fresh child process per venv (this script with ``--child``), in alternating
order, and each child runs ``edge_agent.inference.bench.bench_in_process`` (raw interpreter invoke
interleaved with the agent's ``predict``, batch 1, default threads) on the shipped digits model and
on MobileNetV2-int8 (``bench/out/mobilenet_v2_int8.tflite``, from ``bench/make_mobilenet.py``).
A row reports the median over rounds of each child's p50, so the venvs share the machine's noise.
The markdown table goes to stdout; paste it into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MOBILENET = REPO / "bench" / "out" / "mobilenet_v2_int8.tflite"
ITERATIONS = {"digits": 8000, "mobilenet_v2": 120}


def child(quick: bool) -> dict[str, Any]:
    """One venv's measurement: runtime versions and the raw/agent p50 of each model."""
    import importlib.metadata as md

    import numpy as np

    sys.path.insert(0, str(REPO))
    from edge_agent.inference.bench import bench_in_process
    from edge_agent.inference.runtime import RuntimeOptions
    from edge_agent.models.serving import ModelServer
    from edge_agent.models.store import ModelStore

    with tempfile.TemporaryDirectory(prefix="edgefleet-runtimes-") as work:
        store = ModelStore(Path(work) / "data")
        store.install_dir(REPO / "models" / "digits" / "1")
        store.install_file(MOBILENET, "mobilenet_v2")
        server = ModelServer(store, RuntimeOptions(pool_size=2))
        server.sync()
        backend = server.get("digits").backend.name
        rows = {}
        for name, iters in ITERATIONS.items():
            res = bench_in_process(server.get(name), iterations=max(40, iters // (10 if quick else 1)), rounds=4)
            rows[name] = {"raw_p50_ms": res["raw"]["p50_ms"], "agent_p50_ms": res["agent"]["p50_ms"]}
    return {
        "python": platform.python_version(),
        "runtime": f"{backend} {md.version(backend)}",
        "numpy": np.__version__,
        "models": rows,
    }


def run_child(venv: Path, quick: bool) -> dict[str, Any]:
    cmd = [str(venv / "bin" / "python"), str(Path(__file__).resolve()), "--child", *(["--quick"] if quick else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"runtimes: {venv} failed (exit {proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """One row per (model, venv): the median over rounds of raw and agent p50."""
    lines = [
        "| model | Python | runtime | numpy | raw invoke p50 ms | agent predict p50 ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for model in ITERATIONS:
        for runs in results.values():
            first = runs[0]
            raw = statistics.median(r["models"][model]["raw_p50_ms"] for r in runs)
            agent = statistics.median(r["models"][model]["agent_p50_ms"] for r in runs)
            lines.append(
                f"| {model} | {first['python']} | {first['runtime']} | {first['numpy']} | {raw:.3f} | {agent:.3f} |"
            )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("venvs", nargs="*", type=Path, help="venv directories (default: .venv and every .venv-3.X)")
    ap.add_argument("--rounds", type=int, default=3, help="fresh child processes per venv, alternating order")
    ap.add_argument("--quick", action="store_true", help="a tenth of the iterations (smoke run)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.quick)))
        return 0
    if not MOBILENET.is_file():
        raise SystemExit(f"runtimes: {MOBILENET} missing: run `.venv/bin/python bench/make_mobilenet.py` first")
    venvs = args.venvs or [REPO / ".venv", *sorted(REPO.glob(".venv-3.*"))]
    results: dict[str, list[dict[str, Any]]] = {str(v): [] for v in venvs}
    for r in range(args.rounds):
        for venv in venvs if r % 2 == 0 else venvs[::-1]:
            res = run_child(venv, args.quick)
            results[str(venv)].append(res)
            print(f"round {r + 1}: {venv.name}: {res['runtime']}: {json.dumps(res['models'])}", file=sys.stderr)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
