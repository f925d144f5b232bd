"""The nightly pipeline's parts that need no TensorFlow: calibration maths, config, checks, lock, status, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_batch.cli import main as cli
from cloud_batch.errors import InputError, PipelineError
from cloud_batch.features.build import FeatureRegistry
from cloud_batch.pipeline import steps_data
from cloud_batch.pipeline.config import PipelineConfig, load_config, parse_config
from cloud_batch.pipeline.context import DONE, FAILED, Run, StepResult, check_as_of
from cloud_batch.pipeline.runner import run_lock, run_pipeline
from cloud_batch.pipeline.status import format_runs, list_runs
from cloud_batch.train import calibrate
from cloud_batch.train.maintenance.data import generate
from cloud_batch.train.maintenance.features import live_readings
from edge_agent.wire.model.calibration import calibration_of, describe
from tests.support.env import MODELS
from tests.support.nightly import seed_store, shifted_field, write_config


# -- calibration maths ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_with(kind: str) -> None:
    rng = np.random.default_rng(0)
    n, true_t = 20_000, 2.5
    z = rng.normal(0, 4, (n, 5)) if kind == "softmax" else rng.normal(0, 4, (n, 1))
    p = calibrate.probabilities(z, kind, true_t)
    u = rng.random((n, 1))
    y = (u > p.cumsum(axis=1)).sum(axis=1) if kind == "softmax" else (u[:, 0] < p[:, 0]).astype(int)
    t = calibrate.fit_temperature(z, y, kind)
    assert t == pytest.approx(true_t, rel=0.1)
    raw, fitted = calibrate.measures(calibrate.probabilities(z, kind), y, kind), calibrate.measures(p, y, kind)
    assert fitted["ece"] < 0.02 < raw["ece"]  # overconfident logits: T fixes them
    assert fitted["nll"] < raw["nll"] and fitted["brier"] < raw["brier"]


def test_ece_brier_nll_on_known_values() -> None:
    p = np.array([[0.9], [0.9], [0.1], [0.1]])
    y = np.array([1, 0, 0, 0])
    # Two bins: 0.9 predicted, half happened (gap 0.4); 0.1 predicted, none happened (gap 0.1).
    assert calibrate.ece(p, y, "sigmoid") == pytest.approx(0.25)
    assert calibrate.brier(p, y, "sigmoid") == pytest.approx((0.01 + 0.81 + 0.01 + 0.01) / 4)
    assert calibrate.nll(p, y, "sigmoid") == pytest.approx(-(np.log(0.9) + np.log(0.1) + 2 * np.log(0.9)) / 4)
    soft = np.array([[0.8, 0.2], [0.3, 0.7]])
    assert calibrate.ece(soft, np.array([0, 0]), "softmax") == pytest.approx((0.2 + 0.7) / 2)
    with pytest.raises(InputError, match="unknown output kind"):
        calibrate.ece(p, y, "relu")
    with pytest.raises(InputError, match="positive"):
        calibrate.fold_temperature(object(), 0.0)


def test_manifest_calibration_is_read_defensively() -> None:
    good = {"calibration": {"temperature": 1.5, "ece": 0.02, "ece_before": 0.09, "bins": 15, "junk": [1]}}
    assert calibration_of(good) == {"temperature": 1.5, "ece": 0.02, "ece_before": 0.09, "bins": 15}
    assert describe(calibration_of(good)) == "T=1.500, ECE 0.020 (was 0.090)"
    for bad in ({}, {"calibration": "x"}, {"calibration": {"temperature": float("nan")}}, {"calibration": {"ece": 1}}):
        assert calibration_of(bad) is None
    assert describe(None) == "not calibrated"


# -- config ----------------------------------------------------------------------------------------
def test_config_resolves_paths_against_its_file_and_keeps_defaults(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "p.toml", release={"stages": [5, 50, 100], "window": "02:00-04:00"}))
    assert cfg.model == "maintenance" and cfg.runs_dir == tmp_path / "runs" and cfg.store == tmp_path / "store"
    assert (
        cfg.release.stages == [5, 50, 100]
        and cfg.gates.max_ece == 0.05
        and cfg.key_path() == tmp_path / "keys/signing.key"
    )
    assert cfg.run_dir("2026-12-01") == tmp_path / "runs" / "maintenance" / "2026-12-01"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "missing \\[pipeline\\]"),
        ({"pipeline": {"model": "cats", "fleet": "f"}}, "model must be one of"),
        ({"pipeline": {"model": "digits", "fleet": "a/b"}}, "fleet"),
        ({"pipeline": {"model": "digits", "fleet": "f", "colour": "x"}}, "unknown key"),
        ({"pipeline": {"model": "digits", "fleet": "f"}, "trian": {}}, "unknown section"),
        ({"pipeline": {"model": "digits", "fleet": "f"}, "train": {"epochs": "5"}}, "epochs must be an int"),
        ({"pipeline": {"model": "digits", "fleet": "f"}, "train": {"epochs": 0}}, "epochs must be positive"),
        ({"pipeline": {"model": "digits", "fleet": "f"}, "gates": {"max_ece": 2}}, "between 0 and 1"),
        ({"pipeline": {"model": "digits", "fleet": "f"}, "release": {"stages": [50, 10]}}, "\\[release\\].*increasing"),
        ({"pipeline": {"model": "digits", "fleet": "f"}, "release": {"stages": ["a"]}}, "list of int"),
        (
            {"pipeline": {"model": "digits", "fleet": "f"}, "release": {"window": "25:00-26:00"}},
            "\\[release\\].*02:00-04:00",
        ),
        ({"pipeline": {"model": "digits", "fleet": "f"}, "gates": {"latency_budget_ms": True}}, "a number"),
        (
            {"pipeline": {"model": "maintenance", "fleet": "f"}, "features": {"build": [{"set": "s", "n_asset": 5}]}},
            "\\[features\\] build\\[0\\] has unknown key\\(s\\) \\['n_asset'\\]; known: .*'n_assets'",
        ),
        (
            {"pipeline": {"model": "maintenance", "fleet": "f"}, "features": {"build": [{"recipe": "maintenance"}]}},
            "\\[features\\] build\\[0\\] needs 'set'",
        ),
        (
            {
                "pipeline": {"model": "maintenance", "fleet": "f"},
                "features": {"score": [{"model": "m", "version": "1"}]},
            },
            "\\[features\\] score\\[0\\] needs .*missing \\['input'\\]",
        ),
        (
            {
                "pipeline": {"model": "maintenance", "fleet": "f"},
                "features": {"score": [{"model": "m", "version": "1", "input": "x", "publish_feature": "s"}]},
            },
            "score\\[0\\] has unknown key\\(s\\) \\['publish_feature'\\]",
        ),
    ],
)
def test_bad_configs_are_refused_naming_the_key(raw: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_config(raw)


def test_as_of_must_be_a_date() -> None:
    assert check_as_of("2026-12-01") == "2026-12-01"
    for bad in ("2026-13-01", "yesterday", "2026-1-1"):
        with pytest.raises(InputError, match="YYYY-MM-DD"):
            check_as_of(bad)


# -- runner: data checks stop the run, lock, status ------------------------------------------------
def test_a_failed_data_check_stops_the_run_naming_the_step_and_keeps_earlier_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live, feats, label = shifted_field(30)
    seed_store(tmp_path / "store", "tfleet", "dev-a", "maintenance", {"live": live, "asset_features": feats}, label)
    cfg = load_config(write_config(tmp_path / "p.toml", train={"n_assets": 10, "days": 12}))
    run = Run(cfg, "2026-12-01")
    with pytest.raises(PipelineError, match="step dataset failed: data checks failed: min_labeled_rows: 30 labeled"):
        run_pipeline(run)
    assert run.marker("ingest") is not None and run.marker("dataset") is None
    checks = json.loads((run.step_dir("dataset") / "checks.json").read_text())
    assert {c["name"]: c["passed"] for c in checks} == {
        "min_labeled_rows": False,
        "schema": True,
        "nan": True,
        "label_balance": True,
        "field_slice": True,
    }
    assert json.loads((run.step_dir("dataset") / FAILED).read_text())["error"].startswith("data checks failed")
    (status,) = list_runs(cfg.runs_dir)
    assert status["steps"]["ingest"]["state"] == "skipped" and status["steps"]["dataset"]["state"] == "failed"
    assert status["steps"]["train"]["state"] == "pending" and status["gates_passed"] is None
    assert "dataset    failed" in format_runs([status])
    assert cli.main(["pipeline", "status", "--config", str(tmp_path / "p.toml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["steps"]["dataset"]["state"] == "failed"


def features_step(tmp_path: Path, **features: Any) -> tuple[PipelineConfig, StepResult]:
    """The ``features`` step alone on a config with ``[features]`` = ``features``."""
    cfg = load_config(write_config(tmp_path / "p.toml", features=features))
    run = Run(cfg, "2026-12-01")
    run.step_dir("features").mkdir(parents=True)
    return cfg, steps_data.features(run, run.step_dir("features"))


def test_the_features_step_rebuilds_each_configured_set_as_its_next_version(tmp_path: Path) -> None:
    build = [{"set": "asset_features", "recipe": "maintenance", "n_assets": 5, "days": 9}]
    cfg, result = features_step(tmp_path, build=build * 2)
    assert [(b["set"], b["version"]) for b in result.data["built"]] == [
        ("asset_features", "1"),
        ("asset_features", "2"),
    ]
    assert FeatureRegistry(cfg.registry).versions("asset_features") == ["1", "2"]


def test_the_features_step_scores_and_publishes_a_precomputed_set(tmp_path: Path) -> None:
    shutil.copytree(MODELS / "maintenance" / "1", tmp_path / "registry" / "maintenance" / "1")
    history = generate(n_assets=5, days=9, seed=0)
    live_readings(history, history["timestamp"].max()).reset_index().to_parquet(tmp_path / "live.parquet")
    build = [{"set": "asset_features", "recipe": "maintenance", "n_assets": 5, "days": 9}]
    job = {"model": "maintenance", "version": "1", "input": "live.parquet", "entity_key": "asset_id"}
    job |= {"features": "asset_features@1", "workers": 1, "publish_features": "maintenance_scores"}
    cfg, result = features_step(tmp_path, build=build, score=[job])
    out = Run(cfg, "2026-12-01").step_dir("features")
    assert [(b["set"], b["version"]) for b in result.data["built"]] == [
        ("asset_features", "1"),
        ("maintenance_scores", "1"),
    ]
    assert result.data["scored"][0]["rows"] == 5 and (out / "maintenance-1.parquet").is_file()
    assert FeatureRegistry(cfg.registry).versions("maintenance_scores") == ["1"]


def test_field_rows_of_the_wrong_shape_fail_the_schema_check(tmp_path: Path) -> None:
    live, feats, label = shifted_field(120)
    seed_store(
        tmp_path / "store", "tfleet", "dev-a", "maintenance", {"live": live[:, :3], "asset_features": feats}, label
    )
    cfg = load_config(write_config(tmp_path / "p.toml", train={"n_assets": 10, "days": 12}))
    with pytest.raises(PipelineError, match="schema: 120 field row\\(s\\) have no 'live' or not 4 values"):
        run_pipeline(Run(cfg, "2026-12-01"))


def test_a_second_run_of_the_same_model_is_refused_while_the_lock_is_held(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "p.toml"))
    with (
        run_lock(cfg.runs_dir / "maintenance" / ".lock"),
        pytest.raises(PipelineError, match="another pipeline run holds"),
    ):
        run_pipeline(Run(cfg, "2026-12-01"))
    assert not (cfg.run_dir("2026-12-01") / "ingest" / DONE).exists()


def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["pipeline", "run", "--config", str(tmp_path / "missing.toml")], "cannot read pipeline config"),
        (["pipeline", "run", "--config", str(tmp_path / "p.toml"), "--as-of", "2026-02-30"], "YYYY-MM-DD"),
        (["pipeline", "status", "--runs-dir", str(tmp_path / "none")], "no runs directory"),
    ]
    (tmp_path / "p.toml").write_text("[pipeline]\nmodel = 'digits'\nfleet = 'f'\n")
    for argv, message in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    (tmp_path / "bad.toml").write_text("[pipeline\n")
    assert cli.main(["pipeline", "run", "--config", str(tmp_path / "bad.toml")]) == 2
    assert "not valid TOML" in capsys.readouterr().err
