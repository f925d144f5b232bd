"""Candidate validation runs in a child process: good models pass, bad ones fail with a reason, crashes are contained."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import FailedError, IncompatibleModelError, ValidationError
from edge_agent.inference.runtime import RuntimeOptions
from edge_agent.update.validate import Isolation, validate_candidate
from edge_agent.wire.model.manifest import GOLDEN_FILE, MODEL_FILE
from tests.modelzoo import CUSTOM_OP, Zoo
from tests.support.models import BROKEN_MODEL_REASONS, crashing_model, replace_model


def copy_version(src: Path, out: Path) -> Path:
    shutil.copytree(src, out)
    return out


def test_a_good_candidate_passes_with_its_latency(digits_dir: Path) -> None:
    t0 = time.perf_counter()
    report = validate_candidate(digits_dir, max_latency_ms=None, runtime_options=RuntimeOptions(num_threads=1))
    wall_ms = (time.perf_counter() - t0) * 1e3
    assert report["ok"] is True
    assert (report["name"], report["version"]) == ("digits", "1")
    assert report["p50_ms"] > 0 and report["runs"] > 0
    # The child's own work, the part of the wall time that is not isolation (bench/validate_bench.py).
    assert report["runs"] * report["p50_ms"] * 0.5 < report["check_ms"] < wall_ms
    assert set(report["golden"]) == {"probs"}
    # A budget it meets is fine too.
    assert validate_candidate(digits_dir, max_latency_ms=10_000)["ok"]


def test_golden_mismatch_fails_with_the_output_named(digits_dir: Path, tmp_path: Path) -> None:
    cand = copy_version(digits_dir, tmp_path / "cand")
    with np.load(cand / GOLDEN_FILE) as data:
        samples = {k: data[k] for k in data.files}
    samples["out:probs"] = samples["out:probs"] + np.float32(0.25)  # what the cloud "saw" is not what this computes
    with open(cand / GOLDEN_FILE, "wb") as fh:
        np.savez(fh, **samples)
    with pytest.raises(ValidationError, match=r"golden output 'probs' differs"):
        validate_candidate(cand, max_latency_ms=None)


def test_a_model_needing_a_custom_op_is_incompatible_and_the_op_is_named(
    digits_dir: Path, tmp_path: Path, zoo: Zoo
) -> None:
    cand = replace_model(copy_version(digits_dir, tmp_path / "cand"), zoo.path("custom_op").read_bytes())
    with pytest.raises(IncompatibleModelError, match=CUSTOM_OP):
        validate_candidate(cand, max_latency_ms=None)


def test_over_the_latency_budget_fails(digits_dir: Path) -> None:
    with pytest.raises(ValidationError, match=r"p50 [0-9.]+ ms over the release's budget 1e-06 ms"):
        validate_candidate(digits_dir, max_latency_ms=0.000001)


def test_a_model_that_segfaults_the_runtime_is_reported_and_the_agent_survives(
    digits_dir: Path, tmp_path: Path
) -> None:
    cand = replace_model(
        copy_version(digits_dir, tmp_path / "cand"), crashing_model((digits_dir / MODEL_FILE).read_bytes())
    )
    with pytest.raises((ValidationError, IncompatibleModelError)) as refused:  # crashed, or refused cleanly
        validate_candidate(cand, max_latency_ms=None)
    assert str(refused.value) in BROKEN_MODEL_REASONS
    # This process never loaded the file and goes on validating.
    assert validate_candidate(digits_dir, max_latency_ms=None)["ok"]


@pytest.mark.parametrize("isolation", ["forkserver", "subprocess"])
def test_both_isolations_contain_a_segfault_and_pass_a_good_model(
    digits_dir: Path, tmp_path: Path, isolation: Isolation
) -> None:
    """The forkserver child (default) and the frozen agent's `python -m` child give the same verdicts."""
    cand = replace_model(
        copy_version(digits_dir, tmp_path / "cand"), crashing_model((digits_dir / MODEL_FILE).read_bytes())
    )
    with pytest.raises((ValidationError, IncompatibleModelError)) as refused:  # crashed, or refused cleanly
        validate_candidate(cand, max_latency_ms=None, isolation=isolation)
    assert str(refused.value) in BROKEN_MODEL_REASONS
    report = validate_candidate(digits_dir, max_latency_ms=None, isolation=isolation)
    assert report["ok"] is True and report["name"] == "digits" and report["p50_ms"] > 0


def test_forked_children_are_fresh_processes(digits_dir: Path) -> None:
    """Each candidate gets its own process: nothing a model did survives into the next validation."""
    pids = {validate_candidate(digits_dir, max_latency_ms=None, runs=1)["pid"] for _ in range(2)}
    assert len(pids) == 2 and os.getpid() not in pids


def test_a_validation_that_hangs_is_killed(digits_dir: Path) -> None:
    """A child that cannot finish in time (10^8 latency runs: ~30 min of digits) is killed at the timeout.

    Not a 10 ms timeout on a normal validation: a warm forkserver child finished digits within it (CI, Python 3.10).
    """
    t0 = time.monotonic()
    with pytest.raises(ValidationError, match="did not finish within"):
        validate_candidate(digits_dir, max_latency_ms=None, timeout_s=0.5, runs=10**8)
    assert time.monotonic() - t0 < 60  # killed, not waited for


def test_a_stop_request_kills_the_child(digits_dir: Path) -> None:
    """Shutdown or an abort must not wait for a validation to finish."""
    stop = threading.Event()
    stop.set()
    with pytest.raises(FailedError, match="stopped"):
        validate_candidate(digits_dir, max_latency_ms=None, stop=stop)


def test_a_tampered_model_file_fails_before_loading(digits_dir: Path, tmp_path: Path) -> None:
    cand = copy_version(digits_dir, tmp_path / "cand")
    data = bytearray((cand / MODEL_FILE).read_bytes())
    data[-1] ^= 0xFF
    (cand / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ValidationError, match="sha256 mismatch"):
        validate_candidate(cand, max_latency_ms=None)


def test_the_child_entry_point_prints_one_json_report(digits_dir: Path, tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "edge_agent.update.validate", str(digits_dir), "--runs", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.strip().splitlines()[-1])["ok"] is True
    missing = subprocess.run(
        [sys.executable, "-m", "edge_agent.update.validate", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(missing.stdout.strip().splitlines()[-1])
    assert missing.returncode == 1 and report["kind"] == "manifest" and "not found" in report["reason"]
    helptext = subprocess.run(
        [sys.executable, "-m", "edge_agent.update.validate", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert "Example:" in helptext
