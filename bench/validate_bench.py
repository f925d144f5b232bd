"""Isolated validation: a fresh ``python -m`` child vs a forkserver child, beside the model's own work (issue #15).

    .venv/bin/python bench/validate_bench.py [--rounds 5]

For digits (models/digits/1) and the int8 MobileNetV2 (bench/out/mobilenet_v2_int8.tflite, built
by bench/make_mobilenet.py), one run measures, alternating, ``--rounds`` times each:

- ``in-process``: ``validate.check`` in this process (manifest + sha256, load, golden samples,
  30 timed calls): the model's own work, with no isolation;
- ``subprocess``: ``validate_candidate(isolation="subprocess")``, a fresh interpreter per candidate
  (the agent's behaviour before #15);
- ``forkserver``: ``validate_candidate(isolation="forkserver")``, a child forked from a server
  that imported numpy and the TFLite runtime once (the server's own start is reported apart).

Overhead = isolated median − in-process median. Prints a markdown table and the command.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from make_mobilenet import bench_models  # noqa: E402  (bench/ is on sys.path: run as a script)

from edge_agent.update.validate import DEFAULT_RUNS, check, options_from_json, options_to_json, validate_candidate  # noqa: E402


def timed(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="validate-bench-"))
    models = bench_models(work / "registry")
    options = options_from_json(options_to_json(None))
    first_fork = timed(lambda: validate_candidate(models["digits"], max_latency_ms=None, isolation="forkserver"))
    rows = {}
    try:
        for name, vdir in models.items():
            t: dict[str, list[float]] = {"in-process": [], "subprocess": [], "forkserver": []}
            for _ in range(args.rounds):
                t["in-process"].append(timed(lambda v=vdir: check(v, options, DEFAULT_RUNS)))
                for mode in ("subprocess", "forkserver"):
                    t[mode].append(
                        timed(lambda v=vdir, m=mode: validate_candidate(v, max_latency_ms=None, isolation=m))
                    )
            rows[name] = {k: statistics.median(v) * 1e3 for k, v in t.items()}
            print(name, {k: [round(x * 1e3, 1) for x in v] for k, v in t.items()}, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| model | in-process ms | subprocess ms | overhead | forkserver ms | overhead |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        base = r["in-process"]
        print(
            f"| {name} | {base:.1f} | {r['subprocess']:.1f} | {r['subprocess'] - base:+.1f} | "
            f"{r['forkserver']:.1f} | {r['forkserver'] - base:+.1f} |"
        )
    print(f"\nforkserver start + first digits validation: {first_fork * 1e3:.0f} ms (once per agent process)")
    print(f"medians of {args.rounds}; reproduce: `.venv/bin/python bench/validate_bench.py --rounds {args.rounds}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
