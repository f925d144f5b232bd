"""Isolated validation: a fresh child vs a forkserver child, beside the model's own work (issue #15).

    .venv/bin/python bench/validate_bench.py [--rounds 5]
    .venv/bin/python bench/validate_bench.py --frozen build/frozen/<digest>/dist/edge-agent [--rounds 5]

For digits (models/digits/1) and the int8 MobileNetV2 (bench/out/mobilenet_v2_int8.tflite, built
by bench/make_mobilenet.py), one run measures, alternating, ``--rounds`` times each:

- ``in-process``: ``validate.check`` in this process (manifest + sha256, load, golden samples,
  30 timed calls): the model's own work, with no isolation;
- ``subprocess``: ``validate_candidate(isolation="subprocess")``, a fresh interpreter per candidate
  (``python -m``, or the frozen binary re-run as ``__validate__``: the agent's behaviour before #15);
- ``forkserver``: ``validate_candidate(isolation="forkserver")``, a child forked from a server
  that imported numpy and the TFLite runtime once (the server's own start is reported apart).

``--frozen DIR`` runs the same measurement inside the frozen binary ``DIR/edge-agent`` (its
interpreter, its runtime, its forkserver: ``tests.support.frozen.run_in_frozen``).
Overhead = an isolated call's wall time − the child's own ``check`` time (``check_ms`` in its
report), median per mode. Prints a markdown table and the command.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(models: dict[str, str], rounds: int) -> dict[str, Any]:
    """Per model and mode: medians (ms) of the wall time and of the overhead; self-contained (runs frozen too).

    A child reports ``check_ms``, the time of its own ``check``: the overhead of one isolated
    validation is its wall time minus that, so the model's own run-to-run noise (±20% for
    MobileNetV2's 30 timed calls on this box) does not enter the figure.
    """
    import statistics
    import time
    from pathlib import Path

    from edge_agent.update.validate import DEFAULT_RUNS, check, options_from_json, options_to_json, validate_candidate

    def isolated(vdir: str, mode: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        report = validate_candidate(vdir, max_latency_ms=None, isolation=mode)
        wall = (time.perf_counter() - t0) * 1e3
        return wall, wall - float(report["check_ms"])

    options = options_from_json(options_to_json(None))
    first = isolated(models["digits"], "forkserver")[0]
    rows, raw = {}, {}
    for name, vdir in models.items():
        t: dict[str, list[float]] = {}
        for _ in range(rounds):
            t.setdefault("in-process", []).append(float(check(Path(vdir), options, DEFAULT_RUNS)["check_ms"]))
            for mode in ("subprocess", "forkserver"):
                wall, over = isolated(vdir, mode)
                t.setdefault(mode, []).append(wall)
                t.setdefault(f"{mode} overhead", []).append(over)
        rows[name] = {k: statistics.median(v) for k, v in t.items()}
        raw[name] = {k: [round(x, 1) for x in v] for k, v in t.items()}
    return {"rows": rows, "raw": raw, "first_fork_ms": first}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--frozen", type=Path, help="a frozen build's folder (dist/edge-agent): measure inside it")
    args = ap.parse_args(argv)
    from make_mobilenet import bench_models  # bench/ is on sys.path when run as a script

    work = Path(tempfile.mkdtemp(prefix="validate-bench-"))
    try:
        models = {k: str(v) for k, v in bench_models(work / "registry").items()}
        if args.frozen is not None:
            from tests.support.frozen import run_in_frozen

            out = run_in_frozen(args.frozen / "edge-agent", measure, models, args.rounds, timeout_s=1800)
        else:
            out = measure(models, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, t in out["raw"].items():
        print(name, t, flush=True)
    where = f"frozen {args.frozen}" if args.frozen else sys.executable
    print(f"\n{where}\n\n| model | in-process ms | subprocess ms | overhead | forkserver ms | overhead |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in out["rows"].items():
        print(
            f"| {name} | {r['in-process']:.1f} | {r['subprocess']:.1f} | {r['subprocess overhead']:+.1f} | "
            f"{r['forkserver']:.1f} | {r['forkserver overhead']:+.1f} |"
        )
    print(f"\nforkserver start + first digits validation: {out['first_fork_ms']:.0f} ms (once per agent process)")
    frozen = f" --frozen {args.frozen}" if args.frozen else ""
    print(
        f"medians of {args.rounds}; reproduce: `.venv/bin/python bench/validate_bench.py --rounds {args.rounds}{frozen}`"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
