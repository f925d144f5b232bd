"""The pure rules of shadow releases: policy fields, ``--promote-if``, the verdict, the comparison, the wire.

Fast and in-process; the device and the cloud apply these same functions (``tests/test_shadow.py``
proves them end to end).
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest

from cloud_batch.cli.main import main as cloud_batch
from edge_agent.errors import ManifestError
from edge_agent.inference.golden import load_golden
from edge_agent.inference.runtime import LoadedModel, RuntimeOptions
from edge_agent.models.shadow import ShadowModel, ShadowRunner, compare
from edge_agent.wire.model.manifest import MANIFEST_FILE, Manifest
from edge_agent.wire.policy import Policy
from edge_agent.wire.protocol import DeviceState, Release
from edge_agent.wire.shadow import ShadowFigures, check_policy, describe, parse_promote_if, verdict


def test_promote_if_sets_the_policy_fields() -> None:
    assert parse_promote_if("agreement>=0.98,latency<=1.2") == {
        "promote_min_agreement": 0.98,
        "promote_max_latency_ratio": 1.2,
    }
    assert parse_promote_if(" errors <= 0.01 ") == {"promote_max_error_rate": 0.01}


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ("agreement<=0.9", "agreement takes >=, not <="),
        ("speed>=2", "unknown key 'speed'"),
        ("latency<=fast", "latency: 'fast' is not a number"),
        ("agreement>=0.9,agreement>=0.8", "agreement is given twice"),
        ("agreement>=1.5", "promote_min_agreement: 1.5 must be between 0 and 1"),
        ("agreement", "'agreement' is not KEY>=VALUE or KEY<=VALUE"),
        (",", "no rule given"),
    ],
)
def test_promote_if_errors_are_clear(rules: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_promote_if(rules)


def test_the_release_command_refuses_bad_shadow_options_before_anything_else(tmp_path: Path) -> None:
    base = ["release", "digits", "--version", "2", "--fleet", "f", "--registry", str(tmp_path / "none")]
    base += ["--key", str(tmp_path / "none.key"), "--broker", "mqtt://127.0.0.1:9"]
    for extra, message in (
        (["--shadow", "--promote-if", "agreement<=0.9"], "error: --promote-if: agreement takes >=, not <="),
        (["--shadow-rate", "0.5"], "error: --shadow-rate only apply to a shadow release (add --shadow)"),
        (["--shadow", "--shadow-rate", "0"], "error: release.policy.shadow_rate: a shadow release needs a rate"),
    ):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert cloud_batch([*base, *extra]) == 2
        assert err.getvalue().startswith(message), err.getvalue()


def test_a_release_with_a_bad_shadow_field_is_malformed() -> None:
    doc = {
        "type": "release",
        "schema_version": 1,
        "release_id": "r",
        "fleet": "f",
        "name": "digits",
        "version": "2",
        "artifact": {"sha256": "a" * 64, "size": 1, "chunk_size": 10, "chunks": ["b" * 64]},
    }
    assert Release.from_dict({**doc, "policy": {"mode": "shadow", "shadow_rate": 1}}).policy.mode == "shadow"
    for policy, field in (
        ({"mode": "canary"}, "mode"),
        ({"shadow_rate": "all"}, "shadow_rate"),
        ({"shadow_min_samples": 0}, "shadow_min_samples"),
        ({"max_output_psi": -1}, "max_output_psi"),
        ({"breaking": "yes"}, "breaking"),
    ):
        with pytest.raises(ManifestError, match=f"release.policy.{field}"):
            Release.from_dict({**doc, "policy": policy})


def test_the_verdict_names_every_failed_rule_with_the_figures() -> None:
    policy = check_policy(Policy(mode="shadow", promote_max_error_rate=0.01))
    good = ShadowFigures(samples=500, agreement=0.99, latency_ratio=1.1, errors=0)
    assert verdict(good, policy) == (
        True,
        "shadow passed: 500 samples, agreement 0.990, latency ratio 1.10, 0 errors, 0 dropped",
    )
    ok, reason = verdict(ShadowFigures(samples=100, agreement=0.5, latency_ratio=2.0, errors=10, dropped=3), policy)
    assert not ok
    assert reason.startswith("shadow rejected: agreement 0.500 < 0.98; p50 latency ratio 2.00 > 1.2; error rate 0.091")
    assert verdict(ShadowFigures(dropped=7), policy)[1] == "shadow: no request was compared (0 errors, 7 dropped)"
    assert describe(good.to_dict()) == "500 samples, agreement 0.990, latency ratio 1.10, 0 errors, 0 dropped"
    starved = {**good.to_dict(), "priority": "nice"}
    assert describe(starved) == "500 samples, agreement 0.990, latency ratio 1.10, 0 errors, 0 dropped, priority nice"


def test_compare_classes_regression_and_shape_mismatch() -> None:
    a = {"probs": np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])}
    b = {"probs": np.array([[0.7, 0.3], [0.6, 0.4], [0.55, 0.45]])}
    rows, agree, mad = compare(a, b)
    assert (rows, agree) == (3, 2) and mad == pytest.approx(np.abs(a["probs"] - b["probs"]).mean())
    reg_a, reg_b = {"y": np.array([[10.0], [20.0]])}, {"y": np.array([[10.4], [23.0]])}
    assert compare(reg_a, reg_b)[:2] == (2, 1)  # 4% agrees, 15% does not
    assert compare(a, {"probs": np.zeros((3, 3))})[1] == 0


def test_device_state_carries_the_shadow_figures_and_checks_them() -> None:
    figures = ShadowFigures(samples=3, agreement=1.0, verdict="promote").to_dict()
    report = {"release_id": "r", "name": "digits", "version": "2", "state": "shadowing", "shadow": figures}
    raw = {"type": "device_state", "device_id": "d", "fleet": "f", "updates": {"digits": report}}
    assert DeviceState.from_dict(raw).updates["digits"].shadow == figures
    with pytest.raises(ManifestError, match="shadow"):
        DeviceState.from_dict({**raw, "updates": {"digits": {**report, "shadow": {"samples": 1, "evil": 2}}}})
    with pytest.raises(ManifestError, match=r"shadow\.samples"):
        DeviceState.from_dict({**raw, "updates": {"digits": {**report, "shadow": {"samples": "many"}}}})
    idle = {**report, "shadow": {**figures, "priority": "idle"}}
    assert DeviceState.from_dict({**raw, "updates": {"digits": idle}}).updates["digits"].shadow == idle["shadow"]
    with pytest.raises(ManifestError, match=r"shadow\.priority: unexpected value 'realtime'"):
        DeviceState.from_dict({**raw, "updates": {"digits": {**report, "shadow": {"priority": "realtime"}}}})


def test_the_runner_compares_every_copy_whatever_its_batch(digits_dir: Path) -> None:
    """Copies of 1, 3 and 6 rows, shipped to the shadow process and run in padded batches: each is compared."""
    manifest = Manifest.load(digits_dir / MANIFEST_FILE)
    active = LoadedModel(digits_dir / manifest.file, manifest, RuntimeOptions(num_threads=1, pool_size=1))
    version = ShadowModel("digits", manifest.version, digits_dir)
    runner = ShadowRunner(version, manifest.version, 1.0, reference=version)
    x = load_golden(digits_dir / "golden.npz")["in:pixels"]
    try:
        assert runner.ready.wait(60), runner.failure  # copies are sampled once both versions are loaded
        for rows in (1, 3, 6, 1, 1, 2):
            inputs = {"pixels": x[:rows]}
            runner.offer(manifest.version, inputs, active.predict(inputs), 0.001)
        runner.offer("other", {"pixels": x[:1]}, active.predict({"pixels": x[:1]}), 0.001)  # not the primary
        deadline = time.monotonic() + 60
        while runner.figures().samples < 6:
            assert time.monotonic() < deadline and runner.failure is None, (runner.figures(), runner.failure)
            time.sleep(0.02)
        assert runner.child_pid is not None and runner.child_pid != os.getpid()  # not in this process
    finally:
        runner.stop()
    figures = runner.figures()
    assert (figures.samples, figures.errors, figures.dropped) == (6, 0, 0)
    assert figures.agreement == 1.0 and figures.mean_abs_diff == 0.0 and figures.latency_ratio is not None
