"""The pipeline on the softmax model (digits), real TensorFlow: folding, dry run, then the real run.

* Folding a temperature into a Keras model divides its logits exactly: outputs become
  ``softmax(z / T)``.
* ``--dry-run`` goes through the gate and the report but registers and releases nothing, and
  marks neither as done: the next real run for the same date does them (and resumes the rest).
* A run killed right after ``register`` registered (before its marker) reuses its claimed version.
* The registered version's manifest records the temperature and ECE the run fitted.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cloud_batch.cli import main as cli
from cloud_batch.pipeline.config import load_config
from cloud_batch.pipeline.context import KILL_ENV, Run
from cloud_batch.pipeline.runner import run_pipeline
from cloud_batch.pipeline.status import list_runs
from cloud_batch.registry.models import Registry
from cloud_batch.train import calibrate
from cloud_batch.train.digits import load_split
from cloud_batch.train.tf_env import tensorflow
from tests.support.env import MODELS
from tests.support.nightly import seed_store, write_config

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_folding_a_temperature_divides_the_logits(activation: str) -> None:
    tensorflow()
    import keras

    inp = keras.Input((6,), name="x")
    out = keras.layers.Dense(3 if activation == "softmax" else 1, activation=activation)(keras.layers.Dense(8)(inp))
    model = keras.Model(inp, out)
    x = np.random.default_rng(0).normal(size=(32, 6)).astype(np.float32)
    z = calibrate.logits(model, x)
    assert calibrate.output_kind(model) == activation
    calibrate.fold_temperature(model, 2.5)
    folded = model.predict(x, verbose=0)
    np.testing.assert_allclose(folded, calibrate.probabilities(z, activation, 2.5), atol=1e-5)


def test_digits_dry_run_then_real_run_registers_the_calibrated_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(MODELS / "digits" / "1", tmp_path / "registry" / "digits" / "1")
    _, x_te, _, y_te = load_split(seed=3)  # another split's held-out images stand in for field traffic
    seed_store(tmp_path / "store", "tfleet", "dev-a", "digits", {"pixels": x_te[:200]}, y_te[:200])
    path = write_config(
        tmp_path / "p.toml",
        pipeline={"model": "digits"},
        train={"epochs": 6},
        gates={"max_regression": 0.1, "max_ece": 0.2, "max_ece_regression": 0.05},
    )
    config = load_config(path)
    dry_argv = ["pipeline", "run", "--config", str(path), "--as-of", "2026-12-01", "--dry-run", "--no-progress"]
    assert cli.main(dry_argv) == 0  # the flag through the command line, in-process
    summary = capsys.readouterr().out
    assert "register   skipped  skipped: --dry-run" in summary and "release    skipped  skipped: --dry-run" in summary
    assert Registry(config.registry).versions("digits") == ["1"]

    # A real run killed (SIGKILL) right after registering, before the step's marker: the rerun
    # finds the claimed version registered with the same bytes and does not make a version 3.
    cmd = [str(BIN / "cloud-batch"), "pipeline", "run", "--config", str(path), "--as-of", "2026-12-01", "--no-progress"]
    env = {**os.environ, KILL_ENV: "register.registered"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert Registry(config.registry).versions("digits") == ["1", "2"]
    assert Run(config, "2026-12-01").marker("register")["dry_run"]  # still the dry run's "skipped" marker
    real = run_pipeline(Run(config, "2026-12-01"))
    states = {s["step"]: s["state"] for s in real.steps}
    assert [states[s] for s in ("dataset", "train", "quantize", "calibrate", "gate")] == ["done"] * 5
    assert states["register"] == "ran" and states["release"] == "skipped"  # no broker in this config
    assert Registry(config.registry).versions("digits") == ["1", "2"]
    cal = Run(config, "2026-12-01").data("calibrate")
    metrics = Registry(config.registry).manifest("digits", "2").metrics
    assert metrics["pipeline"]["report"] == str(real.report) and real.report.is_file()  # the report linked
    recorded = metrics["calibration"]
    assert recorded["temperature"] == cal["temperature"] and recorded["ece"] == cal["after"]["ece"]
    assert cal["kind"] == "softmax" and cal["temperature"] != 1.0
    (status,) = list_runs(config.runs_dir, "digits")
    assert status["registered"] == "2" and status["gates_passed"] is True
