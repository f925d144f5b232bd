"""Training jobs end to end: real TensorFlow training and conversion, real TFLite evaluation.

Training runs in subprocesses (the CLI, or ``python -c``): TensorFlow must never be loaded
into the pytest process, which tests the edge agent as it runs on a device (and importing
TensorFlow before tflite_runtime breaks the latter). Checks on the results use the edge
runtime only. About 40 s in total on 2 CPU cores.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cloud_batch.errors import QualityGateError
from cloud_batch.registry.models import Registry
from cloud_batch.train.gate import Gate
from edge_agent.inference.modelpack import verify_version_dir
from edge_agent.inference.runtime import LoadedModel, RuntimeOptions
from edge_agent.wire.model.manifest import GOLDEN_FILE, MANIFEST_FILE, MODEL_FILE

CLI = Path(sys.executable).parent / "cloud-batch"


def python(code: str, *args: str | Path, timeout: int = 300) -> dict:
    """Run ``code`` in a fresh interpreter; it must print one JSON line last."""
    argv = [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """digits trained with the job's default epochs, through the CLI, into an empty registry."""
    reg = tmp_path_factory.mktemp("registry")
    argv = [str(CLI), "train", "digits", "--registry", str(reg), "--no-progress"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return reg, proc


def test_digits_training_registers_a_verified_version(trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    reg, proc = trained
    assert proc.stdout.startswith(f"registered digits version 1 -> {reg / 'digits' / '1'}")
    assert proc.stderr == ""  # no TensorFlow log spam, no progress with --no-progress
    d = Registry(reg).path("digits", "1")
    assert sorted(p.name for p in d.iterdir()) == sorted([MODEL_FILE, MANIFEST_FILE, GOLDEN_FILE])
    m = verify_version_dir(d)  # sha256, specs, golden samples reproduce on this runtime
    assert [(s.name, s.dtype, s.datatype, s.shape) for s in m.inputs] == [("pixels", "int8", "FP32", (-1, 8, 8, 1))]
    assert [(s.name, s.dtype, s.datatype, s.shape) for s in m.outputs] == [("probs", "int8", "FP32", (-1, 10))]
    assert m.labels == [str(i) for i in range(10)]
    assert m.preprocessing == {
        "kind": "image",
        "height": 8,
        "width": 8,
        "channels": 1,
        "range": [0, 16],
        "invert": True,
    }
    assert {"float_accuracy", "int8_accuracy", "n_train", "n_test"} <= set(m.metrics)
    assert m.metrics["n_train"] + m.metrics["n_test"] == 1797
    assert m.metrics["int8_accuracy"] >= 0.95
    assert m.metrics["float_accuracy"] - m.metrics["int8_accuracy"] <= 0.01
    with np.load(d / GOLDEN_FILE) as g:
        assert g["in:pixels"].shape == (10, 8, 8, 1) and g["out:probs"].shape == (10, 10)


def test_digits_accuracy_reproduces_through_the_edge_runtime(
    trained: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    from cloud_batch.train.digits import load_split

    d = Registry(trained[0]).path("digits", "1")
    m = verify_version_dir(d, run_golden=False)
    _, x_test, _, y_test = load_split(m.metrics["seed"])
    # One call over the whole split: in-process callers may raise the per-call batch bound.
    model = LoadedModel(d / MODEL_FILE, m, RuntimeOptions(max_batch=len(x_test)))
    probs = model.predict({"pixels": x_test})["probs"]
    assert float((probs.argmax(axis=1) == y_test).mean()) == pytest.approx(m.metrics["int8_accuracy"], abs=1e-4)


def test_digits_report_is_beside_the_version_dir(trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    reg = trained[0]
    report = Registry(reg).eval_dir("digits", "1")
    assert sorted(p.name for p in report.iterdir()) == ["eval.json", "eval.png"]
    assert (report / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((report / "eval.json").read_text())
    manifest = json.loads((reg / "digits" / "1" / MANIFEST_FILE).read_text())
    assert data["metrics"] == manifest["metrics"]
    cm = np.array(data["confusion_matrix_int8"])
    assert cm.shape == (10, 10) and cm.sum() == manifest["metrics"]["n_test"]
    assert np.trace(cm) / cm.sum() == pytest.approx(manifest["metrics"]["int8_accuracy"], abs=1e-4)


def test_digits_default_version_determinism_and_gate_refusal(
    trained: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    reg = tmp_path / "registry"
    shutil.copytree(trained[0], reg)
    out = python(
        """
        import json, sys
        from cloud_batch.train.digits import train_digits
        from cloud_batch.errors import QualityGateError
        reg = sys.argv[1]
        again = train_digits(reg, progress=False)           # no version given: the next one
        out = {"version": again.manifest.version, "sha256": again.manifest.sha256}
        try:                                                 # a floor no model can meet
            train_digits(reg, epochs=1, progress=False, min_accuracy=1.01)
        except QualityGateError as exc:
            out["refused"] = str(exc)
            out["before_refusal"] = sorted(str(p) for p in __import__("pathlib").Path(reg).rglob("*"))
        print(json.dumps(out))
        """,
        reg,
    )
    first = json.loads((trained[0] / "digits" / "1" / MANIFEST_FILE).read_text())
    assert out["version"] == "2"
    assert out["sha256"] == first["sha256"]  # same seed, same model, byte for byte
    assert out["refused"].startswith("model refused, nothing registered: quantized accuracy")
    assert "below the floor 1.0100" in out["refused"]
    assert Registry(reg).versions("digits") == ["1", "2"]
    assert not (reg / "digits" / "3").exists() and not (reg / "digits" / "3.eval").exists()
    assert sorted(str(p) for p in reg.rglob("*")) == out["before_refusal"]


def test_maintenance_trains_with_two_named_inputs_and_int8_is_refused(tmp_path: Path) -> None:
    out = python(
        """
        import json, sys
        from cloud_batch.train.maintenance.job import train_maintenance
        from cloud_batch.errors import QualityGateError
        ok = train_maintenance(sys.argv[1], progress=False)
        out = {"path": str(ok.path), "metrics": ok.metrics}
        try:
            # int8's refusal is structural (auc drop ~0.17 at 3 or 20 epochs): 3 epochs suffice to show it.
            train_maintenance(sys.argv[2], progress=False, quantization="int8", epochs=3)
        except QualityGateError as exc:
            out["refused"], out["refused_metrics"] = str(exc), exc.metrics
        print(json.dumps(out))
        """,
        tmp_path / "ok",
        tmp_path / "int8",
    )
    from edge_agent.inference.runtime import inspect_model

    m = verify_version_dir(out["path"])
    ins, _ = inspect_model(Path(out["path"]) / MODEL_FILE)
    assert sorted(s.name for s in ins) == ["asset_features", "live"]  # named by the Keras inputs, no renaming
    assert [s.name for s in m.outputs] == ["failure_prob"]
    assert m.metrics["quantized_auc"] >= 0.85 and m.metrics["float_auc"] - m.metrics["quantized_auc"] <= 0.01
    assert m.validation["atol"] > 0  # int16 outputs: golden tolerance in probability, not one 3e-5 step
    assert (tmp_path / "ok" / "maintenance" / "1.eval" / "eval.png").is_file()
    # At int8 the raw inputs' single scale per tensor rounds small features away: the gate says no.
    assert out["refused"].startswith("model refused, nothing registered: quantized auc")
    assert out["refused_metrics"]["quantization"] == "int8"
    assert out["refused_metrics"]["auc_drop"] > 0.01
    assert Registry(tmp_path / "int8").versions("maintenance") == []
    assert files(tmp_path / "int8") == {}


@pytest.mark.parametrize(
    ("float_value", "quant_value", "refused", "reason"),
    [
        (0.98, 0.975, False, ""),
        (0.98, 0.96, True, "0.0200 below float"),
        (0.96, 0.94, True, "below the floor 0.9500"),
        (0.94, 0.945, True, "below the floor"),
    ],
)
def test_gate(float_value: float, quant_value: float, refused: bool, reason: str) -> None:
    gate = Gate("accuracy", 0.95, 0.01)
    if not refused:
        gate.check(float_value, quant_value)
        return
    with pytest.raises(QualityGateError, match=reason) as info:
        gate.check(float_value, quant_value, {"n": 1})
    assert info.value.metrics == {"n": 1}
