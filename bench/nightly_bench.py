"""Wall time of each step of one nightly run (``cloud-batch pipeline``), on the demo's data and on 1M field rows.

Scenarios, side by side in one process (TensorFlow is imported once, before the first run, and
reported on its own line: a scheduled run pays it once per run):

* ``demo``: digits, the demo's field data (40 predictions of load_digits images, 25% sampled with
  inputs, all labeled: ~10 field rows), the demo's pipeline settings (8 epochs);
* ``1m``: maintenance, 1,000,000 labeled field rows (the shifted asset type of the e2e test) on
  the default simulated base (200 assets x 60 days); 2 epochs at batch 1024 (the default 20 x 64
  would train for hours on 2 cores).

The telemetry store is seeded with ``TelemetryStore.commit`` (the ingest's commit path, timed and
shown apart); ``ingest`` itself is skipped (no broker: ``docs/benchmarks.md`` "Ingest" measures it),
and ``release`` is skipped (no broker; a release is measured in the OTA sections).

    .venv/bin/python bench/nightly_bench.py                 # both, ~10 min on 2 busy cores
    .venv/bin/python bench/nightly_bench.py --scenario demo
    .venv/bin/python bench/nightly_bench.py --scenario dataset --rows 50000   # the dataset step's parts
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cloud_batch.pipeline.config import load_config  # noqa: E402
from cloud_batch.pipeline.context import Run  # noqa: E402
from cloud_batch.pipeline.runner import run_pipeline  # noqa: E402
from cloud_batch.train.tf_env import tensorflow  # noqa: E402
from tests.support.env import MODELS  # noqa: E402
from tests.support.nightly import seed_store, shifted_field, write_config  # noqa: E402


def demo_data(work: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    idx = np.random.default_rng(1).choice(len(digits.images), size=40, replace=False)[::4]  # 25% sampled
    x = digits.images[idx].astype(np.float32)[..., None]
    seed_store(work / "store", "demo", "demo-1", "digits", {"pixels": x}, digits.target[idx])
    shutil.copytree(MODELS / "digits" / "1", work / "registry" / "digits" / "1")
    return write_config(
        work / "pipeline.toml",
        pipeline={"model": "digits", "fleet": "demo"},
        dataset={"min_labeled_rows": 5, "min_minority_fraction": 0.0},
        train={"epochs": 8},
        gates={"max_regression": 0.05, "max_ece_regression": 0.02},
    )


def million(work: Path, rows: int) -> Path:
    live, feats, label = shifted_field(rows, seed=3)
    seed_store(work / "store", "tfleet", "dev-a", "maintenance", {"live": live, "asset_features": feats}, label)
    shutil.copytree(MODELS / "maintenance" / "1", work / "registry" / "maintenance" / "1")
    return write_config(
        work / "pipeline.toml",
        dataset={"min_labeled_rows": 1000},
        train={"epochs": 2, "batch_size": 1024, "n_assets": 200, "days": 60},
    )


def dataset_parts(work: Path, rows: int) -> None:
    """The dataset step's parts alone: the labeled join, the reshape to NumPy, the store summary (CPU s)."""
    from cloud_batch.ingest.labeled import labeled_rows
    from cloud_batch.ingest.summary import summarize
    from cloud_batch.pipeline.dataset import field_rows
    from cloud_batch.pipeline.models import spec_for

    live, feats, label = shifted_field(rows, seed=3)
    store = work / "store"
    seed_store(store, "tfleet", "dev-a", "maintenance", {"live": live, "asset_features": feats}, label)
    parts = {
        "labeled_rows": lambda: labeled_rows(store, "maintenance"),
        "field_rows (labeled_rows + reshape)": lambda: field_rows(store, spec_for("maintenance")),
        "summarize": lambda: summarize(store),
    }
    print(f"\n### dataset parts, {rows:,} field rows")
    for name, fn in parts.items():
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        print(f"{name}: {time.perf_counter() - t0:.2f} s wall, {time.process_time() - c0:.2f} s CPU")


def run(name: str, make: object, work: Path) -> None:
    t0 = time.perf_counter()
    config_path = make(work)  # type: ignore[operator]
    seeded = time.perf_counter() - t0
    t0 = time.perf_counter()
    outcome = run_pipeline(Run(load_config(config_path), "2026-12-01"))
    total = time.perf_counter() - t0
    print(f"\n### {name}: store seeded in {seeded:.1f} s; run {total:.1f} s; gates passed: {outcome.gates_passed}")
    print("| step | seconds | summary |\n| --- | ---: | --- |")
    worst = max(outcome.steps, key=lambda s: s["seconds"] or 0)
    for s in outcome.steps:
        print(f"| {s['step']} | {s['seconds'] or 0:.2f} | {s['line'][:140]} |")
    print(f"bottleneck: {worst['step']} ({worst['seconds']:.1f} s of {total:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("demo", "1m", "both", "dataset"), default="both")
    parser.add_argument("--rows", type=int, default=1_000_000, help="field rows of the 1m scenario")
    args = parser.parse_args()
    if args.scenario == "dataset":
        with tempfile.TemporaryDirectory(prefix="nightly-bench-dataset-") as tmp:
            dataset_parts(Path(tmp), args.rows)
        return
    t0 = time.perf_counter()
    tensorflow()
    print(f"TensorFlow import: {time.perf_counter() - t0:.1f} s")
    scenarios = {"demo": demo_data, "1m": lambda w: million(w, args.rows)}
    for name, make in scenarios.items():
        if args.scenario in (name, "both"):
            with tempfile.TemporaryDirectory(prefix=f"nightly-bench-{name}-") as tmp:
                run(name, make, Path(tmp))


if __name__ == "__main__":
    main()
