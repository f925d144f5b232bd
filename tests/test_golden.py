"""Golden samples and version directories: build, verify, and every way a version can be bad.

Runs on real zoo models (tests/modelzoo.py) with the real tflite-runtime.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import ManifestError, RejectedError, ValidationError
from edge_agent.inference.golden import IN, OUT, check_golden, golden_bytes, load_golden, make_golden
from edge_agent.inference.modelpack import build_version_dir, sha256_file, verify_version_dir
from edge_agent.inference.runtime import LoadedModel, RuntimeOptions
from edge_agent.wire.model.manifest import GOLDEN_FILE, MANIFEST_FILE, MODEL_FILE, Manifest
from tests.modelzoo import Zoo


def built(zoo: Zoo, tmp_path: Path, model: str = "int8", **kw: Any) -> tuple[Path, Manifest]:
    out = tmp_path / f"{model}-v1"
    manifest = build_version_dir(zoo.path(model), out, name=f"tiny-{model}".replace("_", "-"), version="1", **kw)
    return out, manifest


def loaded(vdir: Path) -> LoadedModel:
    manifest = Manifest.load(vdir / MANIFEST_FILE)
    return LoadedModel(vdir / manifest.file, manifest, RuntimeOptions(num_threads=1, pool_size=1))


# -- make_golden / check_golden ----------------------------------------------------------------


@pytest.mark.parametrize("model", ("int8", "uint8", "float16", "float32", "multi_io", "fixed_batch"))
def test_make_then_check_golden_roundtrip(zoo: Zoo, tmp_path: Path, model: str) -> None:
    vdir, _ = built(zoo, tmp_path, model)
    m = loaded(vdir)
    samples = make_golden(m, n=4)
    assert {k for k in samples if k.startswith(IN)} == {IN + s.name for s in m.manifest.inputs}
    assert {k for k in samples if k.startswith(OUT)} == {OUT + s.name for s in m.manifest.outputs}
    assert all(v.shape[0] == 4 for v in samples.values())
    worst = check_golden(m, samples)
    assert set(worst) == {s.name for s in m.manifest.outputs}
    assert all(err == 0.0 for err in worst.values())  # same runtime, same inputs: bit-identical
    # Through the file format too.
    path = tmp_path / "g.npz"
    path.write_bytes(golden_bytes(samples))
    again = load_golden(path)
    assert set(again) == set(samples)
    for k in samples:
        np.testing.assert_array_equal(again[k], samples[k])
    assert check_golden(m, again) == worst


def test_golden_from_tensorflow_reference_passes(zoo: Zoo, tmp_path: Path) -> None:
    """Outputs computed by TF's own interpreter at build time pass the device check (1-step tolerance)."""
    vdir, _ = built(zoo, tmp_path)
    samples = {IN + k: v for k, v in zoo.part("int8", "in:").items()}
    samples.update({OUT + k: v for k, v in zoo.part("int8", "out:").items()})
    check_golden(loaded(vdir), samples)


def _samples(zoo: Zoo, tmp_path: Path, model: str = "int8") -> tuple[LoadedModel, dict[str, np.ndarray]]:
    vdir, _ = built(zoo, tmp_path, model)
    m = loaded(vdir)
    return m, make_golden(m, {k: v for k, v in zoo.part(model, "in:").items()})


def test_tampered_quantized_output_fails(zoo: Zoo, tmp_path: Path) -> None:
    m, samples = _samples(zoo, tmp_path)
    scale = m.manifest.output("logits").quantization.scale
    within = dict(samples)
    within[OUT + "logits"] = samples[OUT + "logits"] + np.float32(0.9 * scale)  # inside one quantization step
    check_golden(m, within)
    beyond = dict(samples)
    out = samples[OUT + "logits"].copy()
    out[3, 1] += np.float32(2.5 * scale)
    beyond[OUT + "logits"] = out
    with pytest.raises(ValidationError, match="golden output 'logits' differs"):
        check_golden(m, beyond)


def test_tampered_float_output_fails(zoo: Zoo, tmp_path: Path) -> None:
    m, samples = _samples(zoo, tmp_path, "float32")
    bad = dict(samples)
    bad[OUT + "logits"] = samples[OUT + "logits"] + np.float32(1e-3)
    with pytest.raises(ValidationError, match="logits"):
        check_golden(m, bad)


@pytest.mark.parametrize("rtol", [0.0, 0.1])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_expected_output_fails(zoo: Zoo, tmp_path: Path, value: float, rtol: float) -> None:
    """A NaN or inf where the model gives a finite value is a mismatch (NaN compares False everywhere)."""
    m, samples = _samples(zoo, tmp_path, "float32")
    m.manifest.validation = {"atol": 0.0, "rtol": rtol, "quant_steps": 1}
    out = samples[OUT + "logits"].copy()
    out[0, 0] = value
    with pytest.raises(ValidationError, match="logits"):
        check_golden(m, {**samples, OUT + "logits": out})


def test_nan_output_matches_a_nan_expectation(zoo: Zoo, tmp_path: Path) -> None:
    """A float model fed NaN gives NaN; recorded as golden, that reproduces (and a finite value would not)."""
    m, _ = _samples(zoo, tmp_path, "float32")
    x = zoo.part("float32", "in:")["pixels"].copy()
    x[0, 0, 0, 0] = np.nan
    samples = make_golden(m, {"pixels": x})
    assert np.isnan(samples[OUT + "logits"][0]).any() and np.isfinite(samples[OUT + "logits"][1:]).all()
    check_golden(m, samples)
    finite = samples[OUT + "logits"].copy()
    finite[np.isnan(finite)] = 0.0
    with pytest.raises(ValidationError, match="logits"):
        check_golden(m, {IN + "pixels": x, OUT + "logits": finite})


def test_golden_tolerances_come_from_the_manifest(zoo: Zoo, tmp_path: Path) -> None:
    m, samples = _samples(zoo, tmp_path, "float32")
    bad = {**samples, OUT + "logits": samples[OUT + "logits"] + np.float32(1e-3)}
    m.manifest.validation = {"atol": 2e-3, "rtol": 0.0, "quant_steps": 1}
    assert check_golden(m, bad)["logits"] == pytest.approx(1e-3, rel=1e-3)


def test_golden_shape_and_name_mismatches_fail(zoo: Zoo, tmp_path: Path) -> None:
    m, samples = _samples(zoo, tmp_path)
    with pytest.raises(ValidationError, match="shape"):
        check_golden(m, {**samples, OUT + "logits": samples[OUT + "logits"][:, :2]})
    with pytest.raises(ValidationError, match="'nope' is not an output"):
        check_golden(m, {**samples, OUT + "nope": samples[OUT + "logits"]})


@pytest.mark.parametrize(
    "content", [b"", b"not an npz at all", "truncated", "no-outputs"], ids=["empty", "junk", "truncated", "no-outputs"]
)
def test_unreadable_golden_file_is_a_manifest_error(tmp_path: Path, content: Any) -> None:
    good = golden_bytes({IN + "x": np.zeros((2, 3), np.float32), OUT + "y": np.ones((2, 1), np.float32)})
    if content == "truncated":
        content = good[: len(good) // 2]
    elif content == "no-outputs":
        content = golden_bytes({IN + "x": np.zeros((2, 3), np.float32)})
    path = tmp_path / GOLDEN_FILE
    path.write_bytes(content)
    with pytest.raises(ManifestError, match=GOLDEN_FILE):
        load_golden(path)


def test_golden_file_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / GOLDEN_FILE
    np.savez(path, **{IN + "x": np.array([{"evil": 1}], dtype=object), OUT + "y": np.ones(1)})
    with pytest.raises(ManifestError, match="unreadable"):
        load_golden(path)


# -- build_version_dir / verify_version_dir ------------------------------------------------------


def test_build_then_verify_roundtrip(zoo: Zoo, tmp_path: Path) -> None:
    labels = ["cat", "dog", "bird"]
    vdir, manifest = built(zoo, tmp_path, labels=labels, metrics={"accuracy": 0.5}, extra={"owner": "tests"})
    assert sorted(p.name for p in vdir.iterdir()) == sorted([MODEL_FILE, MANIFEST_FILE, GOLDEN_FILE])
    assert (vdir / MODEL_FILE).read_bytes() == zoo.path("int8").read_bytes()
    assert manifest.sha256 == sha256_file(vdir / MODEL_FILE)
    assert manifest.size == (vdir / MODEL_FILE).stat().st_size
    assert [s.name for s in manifest.inputs] == ["pixels"] and [s.name for s in manifest.outputs] == ["logits"]
    assert manifest.inputs[0].shape == (-1, 8, 8, 1) and manifest.inputs[0].quantization is not None
    verified = verify_version_dir(vdir)
    assert verified.to_dict() == manifest.to_dict()
    assert verified.labels == labels and verified.extra == {"owner": "tests"}
    assert json.loads((vdir / MANIFEST_FILE).read_text())["owner"] == "tests"  # unknown keys kept
    golden = load_golden(vdir / GOLDEN_FILE)
    assert set(golden) == {IN + "pixels", OUT + "logits"}


def test_build_with_renamed_tensors_serves_under_the_new_names(zoo: Zoo, tmp_path: Path) -> None:
    vdir, manifest = built(zoo, tmp_path, "multi_io", rename_inputs={"a": "left"}, rename_outputs={"gate": "p"})
    assert {s.name for s in manifest.inputs} == {"left", "b"}
    assert {s.name for s in manifest.outputs} == {"mix", "p"}
    verify_version_dir(vdir)
    out = loaded(vdir).predict({"left": zoo.part("multi_io", "in:")["a"], "b": zoo.part("multi_io", "in:")["b"]})
    assert set(out) == {"mix", "p"}
    with pytest.raises(ManifestError, match="unknown tensors"):
        built(zoo, tmp_path / "x", "multi_io", rename_inputs={"zzz": "q"})


def test_build_with_given_golden_is_checked(zoo: Zoo, tmp_path: Path) -> None:
    samples = {IN + k: v for k, v in zoo.part("int8", "in:").items()}
    samples.update({OUT + k: v for k, v in zoo.part("int8", "out:").items()})
    vdir, _ = built(zoo, tmp_path, golden=samples)
    verify_version_dir(vdir)
    samples[OUT + "logits"] = samples[OUT + "logits"] + 1.0
    with pytest.raises(ValidationError):
        built(zoo, tmp_path / "bad", golden=samples)


def test_build_refuses_bad_names_and_missing_files(zoo: Zoo, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="invalid model name"):
        build_version_dir(zoo.path("int8"), tmp_path / "a", name="../x", version="1")
    with pytest.raises(ManifestError, match="invalid version"):
        build_version_dir(zoo.path("int8"), tmp_path / "b", name="x", version="v1")
    with pytest.raises(ManifestError, match="not found"):
        build_version_dir(tmp_path / "missing.tflite", tmp_path / "c", name="x", version="1")


def test_sha256_mismatch_with_same_size_is_rejected(zoo: Zoo, tmp_path: Path) -> None:
    vdir, manifest = built(zoo, tmp_path)
    data = bytearray((vdir / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (vdir / MODEL_FILE).write_bytes(bytes(data))
    assert (vdir / MODEL_FILE).stat().st_size == manifest.size
    with pytest.raises(RejectedError, match="sha256 mismatch"):
        verify_version_dir(vdir)


@pytest.mark.parametrize("change", ["append", "truncate"])
def test_size_mismatch_is_rejected(zoo: Zoo, tmp_path: Path, change: str) -> None:
    vdir, manifest = built(zoo, tmp_path)
    data = (vdir / MODEL_FILE).read_bytes()
    (vdir / MODEL_FILE).write_bytes(data + b"\0" if change == "append" else data[:-1])
    with pytest.raises(
        RejectedError, match=f"size {manifest.size + (1 if change == 'append' else -1)} != manifest size"
    ):
        verify_version_dir(vdir)


def test_missing_model_or_manifest_is_a_manifest_error(zoo: Zoo, tmp_path: Path) -> None:
    vdir, _ = built(zoo, tmp_path)
    (vdir / MODEL_FILE).unlink()
    with pytest.raises(ManifestError, match=r"model file model\.tflite missing"):
        verify_version_dir(vdir)
    (vdir / MANIFEST_FILE).unlink()
    with pytest.raises(ManifestError, match="manifest not found"):
        verify_version_dir(vdir)


def test_tampered_golden_fails_verification(zoo: Zoo, tmp_path: Path) -> None:
    vdir, _ = built(zoo, tmp_path)
    samples = load_golden(vdir / GOLDEN_FILE)
    samples[OUT + "logits"] = samples[OUT + "logits"] + 1.0
    (vdir / GOLDEN_FILE).write_bytes(golden_bytes(samples))
    with pytest.raises(ValidationError, match="logits"):
        verify_version_dir(vdir)
    verify_version_dir(vdir, run_golden=False)  # sha256 and size still fine
    (vdir / GOLDEN_FILE).write_bytes((vdir / GOLDEN_FILE).read_bytes()[:100])
    with pytest.raises(ManifestError, match="golden samples"):
        verify_version_dir(vdir)


# -- malformed manifests ------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], Any]


def _set(key: str, value: Any) -> Mutation:
    return lambda m: m.__setitem__(key, value)


def _del(key: str) -> Mutation:
    return lambda m: m.pop(key)


MALFORMED: list[tuple[str, Mutation, str]] = [
    ("missing-sha256", _del("sha256"), "missing field 'sha256'"),
    ("missing-inputs", _del("inputs"), "missing field 'inputs'"),
    ("missing-name", _del("name"), "missing field 'name'"),
    ("bad-version", _set("version", "1.x"), "invalid version '1.x'"),
    ("version-not-string", _set("version", 3), "invalid version 3"),
    ("traversal-name", _set("name", "../x"), "invalid model name '../x'"),
    ("slash-name", _set("name", "a/b"), "invalid model name 'a/b'"),
    ("hidden-name", _set("name", ".x"), "invalid model name '.x'"),
    ("traversal-file", _set("file", "../model.tflite"), "manifest.file: expected a plain file name"),
    ("traversal-golden", _set("golden", "../golden.npz"), "manifest.golden: expected a plain file name"),
    ("bad-sha", _set("sha256", "ABC"), "manifest.sha256"),
    ("zero-size", _set("size", 0), "manifest.size"),
    ("schema", _set("schema_version", 99), "unsupported schema_version 99"),
    ("empty-inputs", _set("inputs", []), "manifest.inputs: expected a non-empty list"),
    ("input-no-dtype", lambda m: m["inputs"][0].pop("dtype"), r"manifest.inputs\[0\]: missing field 'dtype'"),
    ("input-bad-dtype", lambda m: m["inputs"][0].update(dtype="string"), "unsupported dtype 'string'"),
    ("input-bad-shape", lambda m: m["inputs"][0].update(shape=[-2, 8]), r"manifest.inputs\[0\].shape"),
    (
        "bad-scale",
        lambda m: m["outputs"][0]["quantization"].update(scale=0),
        r"manifest.outputs\[0\].quantization.scale",
    ),
    ("dup-outputs", lambda m: m["outputs"].append(dict(m["outputs"][0])), "duplicate tensor names"),
    ("labels", _set("labels", [1, 2]), "manifest.labels"),
    ("not-object", lambda m: "replace:[1, 2]", "expected a JSON object"),
    ("bad-json", lambda m: 'replace:{"name": ', "is not valid JSON"),
    ("not-utf8", lambda m: "replace-bytes", "is not valid JSON"),
]


@pytest.mark.parametrize("mutate, message", [(m, msg) for _, m, msg in MALFORMED], ids=[i for i, _, _ in MALFORMED])
def test_malformed_manifest_is_a_manifest_error(zoo: Zoo, tmp_path: Path, mutate: Mutation, message: str) -> None:
    vdir, _ = built(zoo, tmp_path)
    raw = json.loads((vdir / MANIFEST_FILE).read_text())
    result = mutate(raw)
    if result == "replace-bytes":
        (vdir / MANIFEST_FILE).write_bytes(b"\xff\xfe{ not utf-8")
    elif isinstance(result, str) and result.startswith("replace:"):
        (vdir / MANIFEST_FILE).write_text(result[len("replace:") :])
    else:
        (vdir / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=message):
        verify_version_dir(vdir)


MISMATCHED: list[tuple[str, Mutation, str]] = [
    (
        "dtype",
        lambda m: m["inputs"][0].update(dtype="float32", quantization=None),
        "is float32 .* model's tensor is int8",
    ),
    ("scale", lambda m: m["inputs"][0]["quantization"].update(scale=0.5), "quantization"),
    ("zero-point", lambda m: m["outputs"][0]["quantization"].update(zero_point=3), "quantization"),
    ("shape", lambda m: m["inputs"][0].update(shape=[-1, 4, 4, 4]), r"\[-1, 4, 4, 4\]"),
    ("tensor", lambda m: m["inputs"][0].update(name="other", tensor="nope:0"), "'other' is not in the model"),
    ("extra-output", lambda m: m["outputs"].append({**m["outputs"][0], "name": "more"}), "2 outputs, the model has 1"),
]


@pytest.mark.parametrize("mutate, message", [(m, msg) for _, m, msg in MISMATCHED], ids=[i for i, _, _ in MISMATCHED])
def test_manifest_disagreeing_with_the_model_is_a_manifest_error(
    zoo: Zoo, tmp_path: Path, mutate: Mutation, message: str
) -> None:
    """The sha256 covers only the model file: a manifest whose tensors lie about it is refused with a clear reason."""
    vdir, _ = built(zoo, tmp_path)
    raw = json.loads((vdir / MANIFEST_FILE).read_text())
    mutate(raw)
    (vdir / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=message):
        verify_version_dir(vdir)


def test_verify_does_not_modify_the_directory(zoo: Zoo, tmp_path: Path) -> None:
    vdir, _ = built(zoo, tmp_path)
    before = {p.name: p.read_bytes() for p in vdir.iterdir()}
    verify_version_dir(vdir)
    copy = tmp_path / "copy"
    shutil.copytree(vdir, copy)
    verify_version_dir(copy)
    assert {p.name: p.read_bytes() for p in vdir.iterdir()} == before
