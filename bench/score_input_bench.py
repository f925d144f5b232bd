"""``cloud-batch score`` over inputs it must convert: the driver's peak memory and CPU, today's tree against a git ref.

    .venv/bin/python bench/score_input_bench.py                      # today's tree only
    .venv/bin/python bench/score_input_bench.py --compare 6c26eb1    # and the tree of that commit, alternating

Four inputs, written once per run into a temp dir:

- ``digits-wide.parquet``: digits' 64 pixels as 64 float64 columns (``--map``), keyed by row number,
  in row groups of ``--row-group`` rows;
- ``maintenance.parquet``: the maintenance model's 4 live columns, an ``asset_id`` for the
  ``asset_features`` join, and 20 columns the model does not use (a wide table, as a warehouse
  export is), same row groups;
- ``maintenance.csv``: the same table as CSV;
- ``digits-f64.npy``: digits' rows as float64, as NumPy saves them by default (converted to float32).

Each ``score`` runs in a fresh Python process (one worker), which reports its own peak RSS
(``VmHWM``: the driver, not the workers), its CPU (``process_time``), the workers' CPU and the
wall time. Rounds alternate between the trees. Prints a markdown table of medians.
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gitcode import tree_at, tree_env  # noqa: E402

CHILD = """
import json, sys, time
from cloud_batch.score.job import score
def hwm_kb():  # this process's peak RSS (ru_maxrss would include the bench's own, inherited through fork)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
args = json.loads(sys.argv[1])
t0, c0 = time.perf_counter(), time.process_time()
r = score(args["reg"], args["model"], "1", args["input"], args["out"], workers=1, progress=False, overwrite=True,
          entity_key=args.get("key"), mapping=args.get("map"), features=args.get("features"))
print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "workers": r.worker_cpu_s,
                  "rss_mb": hwm_kb() / 1024, "rows": r.rows}))
"""


def tables(work: Path, rows: int, digits_rows: int, row_group: int) -> dict[str, dict[str, Any]]:
    """Write the four inputs; the score arguments of each."""
    import numpy as np
    import pandas as pd

    from tests.support.score import N_ASSETS, live_frame, score_registry

    reg = score_registry(work / "registry")
    rng = np.random.default_rng(3)
    pixels = {f"c{i}": rng.uniform(0, 16, digits_rows) for i in range(64)}
    pd.DataFrame(pixels).to_parquet(work / "digits-wide.parquet", row_group_size=row_group)
    live = live_frame(rows, assets=N_ASSETS)
    extra = {f"unused_{i}": rng.normal(0, 1, rows) for i in range(20)}
    live = pd.concat([live, pd.DataFrame(extra)], axis=1)
    live.to_parquet(work / "maintenance.parquet", row_group_size=row_group)
    live.to_csv(work / "maintenance.csv", index=False)
    np.save(work / "digits-f64.npy", np.stack(list(pixels.values()), axis=1).reshape(digits_rows, 8, 8, 1))
    joined = {"model": "maintenance", "key": "asset_id", "features": "asset_features"}
    return {
        "digits-wide.parquet": {"model": "digits", "map": {"pixels": list(pixels)}},
        "maintenance.parquet": joined,
        "maintenance.csv": joined,
        "digits-f64.npy": {"model": "digits"},
    } | {"_reg": {"path": str(reg)}}


def run_one(work: Path, name: str, args: dict[str, Any], env: dict[str, str]) -> dict[str, float]:
    out = work / "out.parquet"
    out.unlink(missing_ok=True)  # a finished output of the same arguments would make the run a no-op
    spec = {**args, "reg": str(work / "registry"), "input": str(work / name), "out": str(out)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)], cwd=work, env={**os.environ, **env},
        capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"score of {name} failed:\n{proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="maintenance rows (default 1,000,000)")
    ap.add_argument("--digits-rows", type=int, default=300_000, help="digits rows (default 300,000)")
    ap.add_argument("--row-group", type=int, default=100_000, help="Parquet row group size (default 100,000)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compare", metavar="REF", help="also run the tree of this git commit")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="table-bench-"))
    try:
        inputs = tables(work, args.rows, args.digits_rows, args.row_group)
        inputs.pop("_reg")
        trees: dict[str, dict[str, str]] = {"today": {}}
        if args.compare:
            tree, sha = tree_at(args.compare, work, packages=("edge_agent", "cloud_batch"))
            trees[sha] = tree_env(tree)
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for name, spec in inputs.items():
                for label, env in trees.items():
                    results.setdefault((name, label), []).append(run_one(work, name, spec, env))
        size = {name: (work / name).stat().st_size / 1e6 for name in inputs}
        print("| input | rows | file MB | tree | driver peak RSS MB | driver CPU s | workers' CPU s | wall s |")
        print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
        for (name, label), runs in results.items():
            med = {k: statistics.median(r[k] for r in runs) for k in ("rss_mb", "cpu", "workers", "wall")}
            print(
                f"| {name} | {int(runs[0]['rows']):,} | {size[name]:.0f} | {label} | {med['rss_mb']:.0f} | "
                f"{med['cpu']:.2f} | {med['workers']:.2f} | {med['wall']:.2f} |"
            )
        print(f"\nmedian of {args.rounds} rounds; row groups of {args.row_group:,} rows")
        print("command: .venv/bin/python bench/score_input_bench.py " + " ".join(sys.argv[1:]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
