"""The nightly pipeline's decisions without TensorFlow: data checks that fail, each gate alone, production, the CLI.

The gates are judged on figures (``gates.evaluate``); the CLI runs stop before training.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cloud_batch.cli import main as cli
from cloud_batch.errors import InputError
from cloud_batch.features.build import FeatureRegistry
from cloud_batch.pipeline import dataset, gates, steps_data
from cloud_batch.pipeline.config import GatesSection, load_config
from cloud_batch.pipeline.context import DONE, FAILED, Run
from cloud_batch.pipeline.models import Rows, spec_for
from cloud_batch.pipeline.runner import run_pipeline
from cloud_batch.registry.signed import SignedLog
from edge_agent.fsutil import atomic_write_json
from tests.support.env import MODELS
from tests.support.nightly import seed_store, shifted_field, write_config

AS_OF = "2026-12-01"
SMALL = {"n_assets": 10, "days": 12}


@functools.cache
def _field() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return shifted_field(120)


def field_rows() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """120 rows of the shifted asset type (made once per process; copies)."""
    live, feats, label = _field()
    return live.copy(), feats.copy(), label.copy()


def field_run(tmp_path: Path, live: np.ndarray, feats: np.ndarray, label: np.ndarray, **sections: Any) -> Run:
    """A maintenance run whose store holds these labeled field rows; small base data."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    seed_store(tmp_path / "store", "tfleet", "dev-a", "maintenance", {"live": live, "asset_features": feats}, label)
    return Run(load_config(write_config(tmp_path / "p.toml", train=SMALL, **sections)), AS_OF)


# -- data checks that fail -------------------------------------------------------------------------
def test_nan_or_inf_in_any_input_fails_the_nan_check() -> None:
    rng = np.random.default_rng(0)
    live, feats, label = rng.normal(size=(20, 4)), rng.normal(size=(20, 18)), rng.integers(0, 2, 20)
    assert dataset.nan_check(Rows({"live": live, "asset_features": feats}, label, label * 0.0)).passed
    live[[3, 5], 1], feats[7, 0] = np.nan, -np.inf
    check = dataset.nan_check(Rows({"live": live, "asset_features": feats}, label, label * 0.0))
    assert (check.name, check.passed) == ("nan", False)
    assert check.detail == "rows with NaN/inf: {'live': 2, 'asset_features': 1}"


def test_one_class_or_skewed_field_labels_stop_the_dataset_step(tmp_path: Path) -> None:
    live, feats, label = field_rows()
    for case, labels, floor in (("one", label * 0, 0.05), ("skewed", label, 0.5)):  # skewed: ~35% positive
        run = field_run(tmp_path / case, live, feats, labels, dataset={"min_minority_fraction": floor})
        with pytest.raises(
            InputError, match=rf"label_balance: rarest class 1 is 0\.\d+ of the field rows \(floor {floor:.3f}\)"
        ):
            steps_data.build_dataset(run, tmp_path / case)
        checks = {c["name"]: c["passed"] for c in json.loads((tmp_path / case / "checks.json").read_text())}
        assert checks["label_balance"] is False and checks["nan"] and checks["schema"]
        assert checks["field_slice"] is (case == "skewed")  # one class: the field slice cannot be scored either


# -- each gate alone ---------------------------------------------------------------------------------
PASSING: dict[str, Any] = {
    "quant": {"drop": 0.005, "float": {"holdout": 0.9}, "quantized": {"holdout": 0.895}},
    "candidate": {"scores": {"holdout": 0.9, "field": 0.8}, "ece": 0.03, "latency_p50_ms": 0.5},
    "production": {"scores": {"holdout": 0.9, "field": 0.5}, "ece": 0.04},
}
ONE_FAILS = [
    ("quantization", "quant", {"drop": 0.02}, "drop \\+0.0200 \\(allowed 0.0100\\)"),
    (
        "holdout_vs_production",
        "candidate",
        {"scores": {"holdout": 0.88, "field": 0.8}},
        "candidate 0.8800 vs production 0.9000",
    ),
    (
        "field_vs_production",
        "production",
        {"scores": {"holdout": 0.9, "field": 0.85}},
        "candidate 0.8000 vs production 0.8500",
    ),
    ("ece", "candidate", {"ece": 0.06}, "calibrated ECE 0.0600 \\(maximum 0.0500; production 0.0400"),
    ("ece", "production", {"ece": 0.02}, "ECE 0.0300 .*production 0.0200, allowed 0.0000 above it"),
    ("latency", "candidate", {"latency_p50_ms": 6.0}, "p50 6.000 ms for one row \\(budget 5.0 ms\\)"),
]


@pytest.mark.parametrize(("name", "part", "change", "detail"), ONE_FAILS)
def test_each_gate_fails_on_its_own(name: str, part: str, change: dict[str, Any], detail: str) -> None:
    spec, cfg = spec_for("maintenance"), GatesSection()
    assert all(g["passed"] for g in gates.evaluate(cfg, spec, **PASSING))
    figures = {**PASSING, part: {**PASSING[part], **change}}
    failed = [g for g in gates.evaluate(cfg, spec, **figures) if not g["passed"]]
    assert [g["name"] for g in failed] == [name]
    assert re.search(detail, failed[0]["detail"]), failed[0]["detail"]


def test_without_production_only_the_candidates_own_gates_apply() -> None:
    spec, cfg = spec_for("maintenance"), GatesSection()
    result = gates.evaluate(cfg, spec, PASSING["quant"], PASSING["candidate"], {"version": None})
    assert all(g["passed"] for g in result)
    assert "no production score" in result[1]["detail"] and "no production)" in result[3]["detail"]


def test_production_is_the_released_version_not_the_newest_registered(tmp_path: Path) -> None:
    for version in ("1", "2"):
        shutil.copytree(MODELS / "maintenance" / "1", tmp_path / "registry" / "maintenance" / version)
    run = Run(load_config(write_config(tmp_path / "p.toml")), AS_OF)
    assert gates.production_version(run) == ("2", "no release recorded: the newest registered version")
    log = SignedLog(run.config.registry)
    log.issue("tfleet", "model", "maintenance", lambda seq: {"seq": seq, "version": "1", "release_id": "r-1"})
    log.issue("otherfleet", "model", "maintenance", lambda seq: {"seq": seq, "version": "2", "release_id": "r-2"})
    assert gates.production_version(run) == ("1", "released to fleet tfleet (r-1)")


# -- features: the joined sets by default, --from ----------------------------------------------------
def features_of(tmp_path: Path, **features: Any) -> dict[str, Any]:
    cfg = load_config(write_config(tmp_path / "p.toml", train={"n_assets": 5, "days": 9}, features=features))
    run = Run(cfg, AS_OF)
    run.step_dir("features").mkdir(parents=True)
    result = steps_data.features(run, run.step_dir("features"))
    return {"line": result.line, **result.data, "registry": FeatureRegistry(cfg.registry)}


def test_without_build_entries_the_features_step_rebuilds_the_sets_the_model_joins(tmp_path: Path) -> None:
    out = features_of(tmp_path)
    assert [(b["set"], b["version"]) for b in out["built"]] == [("asset_features", "1")]
    assert out["not_rebuilt"] == [] and len(out["registry"].read("asset_features", "1").entities) == 5


def test_a_file_source_builds_a_set_and_a_missed_joined_set_is_named(tmp_path: Path) -> None:
    frame = pd.DataFrame({"asset_id": ["a-1", "a-2", "a-3"], "x": [1.0, 2.0, 3.0], "y": [0.5, 0.25, 0.0]})
    frame.to_parquet(tmp_path / "extra.parquet")
    out = features_of(tmp_path, build=[{"set": "extra", "source": "extra.parquet", "entity_key": "asset_id"}])
    assert [(b["set"], b["version"]) for b in out["built"]] == [("extra", "1")]
    assert out["not_rebuilt"] == ["asset_features"] and "['asset_features'] not rebuilt" in out["line"]
    assert sorted(out["registry"].read("extra", "1").entities) == ["a-1", "a-2", "a-3"]


# -- the CLI: a step's crash is exit 2, --dry-run, status --model and release ids ------------------------
def test_a_crash_in_a_step_is_exit_2_naming_the_step_and_dry_run_reaches_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live, feats, label = field_rows()
    bad = [{"set": "asset_features", "recipe": "maintenance", "n_assets": "5", "days": 9}]  # a string: TypeError
    run = field_run(tmp_path, live, feats, label, features={"build": bad})
    argv = ["pipeline", "run", "--config", str(tmp_path / "p.toml"), "--as-of", AS_OF, "--dry-run", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: step features failed: TypeError: ") and "Traceback" not in err
    assert run.marker("dataset")["dry_run"] is True and run.marker("features") is None
    assert json.loads((run.step_dir("features") / FAILED).read_text())["error"].startswith("TypeError")
    assert (
        cli.main(["pipeline", "status", "--config", str(tmp_path / "p.toml"), "--model", "maintenance", "--json"]) == 0
    )
    (status,) = json.loads(capsys.readouterr().out)
    assert status["steps"]["features"]["state"] == "failed" and status["release_id"] is None


def test_status_through_the_cli_filters_by_model_and_shows_release_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    for model, release in (("maintenance", "rel-42"), ("digits", None)):
        step = runs / model / AS_OF
        gate = {"passed": True, "gates": [{"name": "latency", "passed": True, "detail": ""}]}
        atomic_write_json(step / "gate" / DONE, {"line": "all gates passed", "data": gate})
        atomic_write_json(step / "register" / DONE, {"line": "v2", "data": {"version": "2"}})
        atomic_write_json(step / "release" / DONE, {"line": "released", "data": {"release_id": release}})
    base = ["pipeline", "status", "--runs-dir", str(runs), "--model", "maintenance"]
    assert cli.main([*base, "--json"]) == 0
    (status,) = json.loads(capsys.readouterr().out)
    assert (status["model"], status["registered"], status["release_id"]) == ("maintenance", "2", "rel-42")
    assert cli.main(base) == 0
    out = capsys.readouterr().out
    assert "maintenance 2026-12-01: gates passed; registered v2; release rel-42" in out and "digits" not in out
    assert cli.main([*base[:-1], "cats"]) == 2
    assert "no runs of model 'cats'" in capsys.readouterr().err


def test_a_step_resumed_under_another_config_says_so(tmp_path: Path) -> None:
    run = Run(load_config(write_config(tmp_path / "p.toml")), AS_OF)
    (first,) = run_pipeline(run, stop_after="ingest").steps
    assert first["state"] == "skipped" and "WARNING" not in first["line"]
    (same,) = run_pipeline(run, stop_after="ingest").steps
    assert "WARNING" not in same["line"]
    changed = Run(load_config(write_config(tmp_path / "p.toml", train={"epochs": 3})), AS_OF)
    (resumed,) = run_pipeline(changed, stop_after="ingest").steps
    assert f"WARNING: done under another config ({run.config.fingerprint()})" in resumed["line"]
