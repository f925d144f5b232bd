"""A new version keeps its clients working: `cloud-batch register` and the device refuse signature changes.

Registering the shipped digits ``.tflite`` again takes the trained version's names for its
generic tensors; a real change of names is refused unless ``--breaking``. A device (real
mosquitto, store, runtime, OtaAgent) refuses to activate a release whose signature differs
from the active version's unless the signed release says ``breaking: true``.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud_batch.cli.main import main as cloud_batch
from cloud_batch.registry.models import Registry
from edge_agent.inference.interpreter import inspect_model
from edge_agent.wire.model.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from edge_agent.wire.model.signature import differences, is_generic, positional_names
from tests.support.ota import Cloud, Device, relabel
from tests.support.shadow import renamed


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cloud_batch(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def registry(tmp_path: Path, digits_dir: Path) -> Path:
    reg = tmp_path / "registry"
    relabel(digits_dir, reg / "digits" / "1", "1")
    return reg


def test_register_takes_the_previous_names_for_generic_tensors(registry: Path, digits_dir: Path) -> None:
    _, outs = inspect_model(digits_dir / MODEL_FILE)
    assert [is_generic(s.name) for s in outs] == [True], outs  # what the converter called it
    code, out, err = run(
        ["register", str(digits_dir / MODEL_FILE), "--name", "digits", "--version", "2", "--registry", str(registry)]
    )
    assert code == 0, err
    assert f"named {outs[0].name!r} 'probs', as in the previous version" in out
    manifest = Registry(registry).manifest("digits", "2")
    assert [s.name for s in manifest.outputs] == ["probs"] and [s.name for s in manifest.inputs] == ["pixels"]
    assert differences(Registry(registry).manifest("digits", "1"), manifest) == []


def test_register_refuses_a_signature_change_unless_breaking(registry: Path, digits_dir: Path, tmp_path: Path) -> None:
    _, outs = inspect_model(digits_dir / MODEL_FILE)
    fields = tmp_path / "fields.json"
    fields.write_text(json.dumps({"outputs": {outs[0].name: "scores"}}))
    argv = ["register", str(digits_dir / MODEL_FILE), "--name", "digits", "--version", "2"]
    argv += ["--registry", str(registry), "--manifest", str(fields)]
    code, _, err = run(argv)
    assert code == 2 and err.startswith("error: digits 2 changes the signature of digits 1"), err
    assert "output 'probs' is gone" in err and "new output 'scores'" in err and "--breaking" in err
    assert "Traceback" not in err and Registry(registry).versions("digits") == ["1"]
    code, out, err = run([*argv, "--breaking"])
    assert code == 0, err
    assert "breaking: output 'probs' is gone" in out
    assert [s.name for s in Registry(registry).manifest("digits", "2").outputs] == ["scores"]


def test_signature_rules(digits_dir: Path) -> None:
    digits = Manifest.load(digits_dir / MANIFEST_FILE)
    wider = Manifest.from_dict({**digits.to_dict(), "outputs": [{**digits.outputs[0].to_dict(), "shape": [-1, 11]}]})
    assert differences(digits, wider) == ["output 'probs' shape [batch, 10] -> [batch, 11]"]
    assert differences(digits, digits) == []
    assert positional_names(wider.outputs, digits.outputs) == {}  # 'probs' is no generic name
    assert not is_generic("probs") and is_generic("output_0") and is_generic("StatefulPartitionedCall:0")


def test_a_device_refuses_to_activate_a_signature_change_unless_the_release_says_breaking(
    cloud: Cloud, make_device: Callable[..., Device], digits_dir: Path, tmp_path: Path
) -> None:
    device = make_device()
    candidate = renamed(digits_dir, tmp_path / "v2", "2")
    doc = cloud.release(candidate)
    report = cloud.wait_result(device.device_id, doc["release_id"])
    assert report.result == "failed", report
    reason = report.reason or ""
    assert "digits 2 changes the signature of digits 1" in reason and "output 'probs' is gone" in reason, reason
    assert "the release does not say policy.breaking = true" in reason
    device.nothing_installed()
    doc = cloud.release(renamed(digits_dir, tmp_path / "v3", "3"), breaking=True)
    report = cloud.wait_result(device.device_id, doc["release_id"])
    assert report.result == "success", report
    assert device.server.get("digits").version == "3"
    assert [s.name for s in device.server.get("digits").manifest.outputs] == ["output_0"]
