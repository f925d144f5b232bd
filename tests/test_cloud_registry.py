"""The cloud registry: version directories on disk, immutable, published atomically.

Uses the shipped model files as "bring your own" models, so no TensorFlow is needed.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest

from cloud_batch.errors import RegistryError
from cloud_batch.registry.models import Registry
from edge_agent.inference.golden import load_golden
from edge_agent.inference.modelpack import verify_version_dir
from edge_agent.wire.model.manifest import GOLDEN_FILE, MANIFEST_FILE, MODEL_FILE

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "models" / "digits" / "1"
MAINTENANCE = REPO / "models" / "maintenance" / "1"


def test_register_writes_exactly_the_modelpack_layout(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    m = reg.register(
        DIGITS / MODEL_FILE, "digits", "3", labels=[str(i) for i in range(10)], rename_outputs={"output_0": "probs"}
    )
    d = reg.path("digits", "3")
    assert d == tmp_path / "reg" / "digits" / "3"
    assert sorted(p.name for p in d.iterdir()) == sorted([MODEL_FILE, MANIFEST_FILE, GOLDEN_FILE])
    assert verify_version_dir(d).sha256 == m.sha256
    assert [o.name for o in m.outputs] == ["probs"] and m.labels == [str(i) for i in range(10)]
    # No temp dirs left behind, and the files are readable by others (registries get served).
    assert [p.name for p in (tmp_path / "reg" / "digits").iterdir()] == ["3"]
    assert stat.S_IMODE((d / MANIFEST_FILE).stat().st_mode) & 0o044 == 0o044


def test_versions_sort_numerically_and_ignore_reports_and_junk(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    assert reg.versions("digits") == [] and reg.latest("digits") is None and reg.next_version("digits") == "1"
    for v in ("9", "10", "2"):
        reg.register(DIGITS / MODEL_FILE, "digits", v)
    (tmp_path / "digits" / "10.eval").mkdir()
    (tmp_path / "digits" / ".tmp-crashed").mkdir()
    (tmp_path / "digits" / "notes").mkdir()
    assert reg.versions("digits") == ["2", "9", "10"]
    assert reg.latest("digits") == "10" and reg.next_version("digits") == "11"
    assert reg.names() == ["digits"]
    assert reg.eval_dir("digits", "10") == tmp_path / "digits" / "10.eval"


def test_same_version_same_content_is_a_no_op(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    rename = {"output_0": "probs"}  # the shipped golden samples use the served output name
    first = reg.register(DIGITS / MODEL_FILE, "digits", "1", golden=DIGITS / GOLDEN_FILE, rename_outputs=rename)
    before = {p.name: p.read_bytes() for p in reg.path("digits", "1").iterdir()}
    again = reg.register(DIGITS / MODEL_FILE, "digits", "1", golden=DIGITS / GOLDEN_FILE, rename_outputs=rename)
    assert again.sha256 == first.sha256 and again.created_at == first.created_at
    assert {p.name: p.read_bytes() for p in reg.path("digits", "1").iterdir()} == before


def test_same_version_different_content_is_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    reg.register(DIGITS / MODEL_FILE, "m", "1")
    before = (tmp_path / "m" / "1" / MODEL_FILE).read_bytes()
    with pytest.raises(RegistryError, match=r"m version 1 already exists with different content \(model sha256"):
        reg.register(MAINTENANCE / MODEL_FILE, "m", "1")
    with pytest.raises(RegistryError, match=r"different content \(manifest fields \['labels'\]"):
        reg.register(DIGITS / MODEL_FILE, "m", "1", labels=list("abcdefghij"))
    assert (tmp_path / "m" / "1" / MODEL_FILE).read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]


def test_golden_file_is_checked_against_the_model(tmp_path: Path) -> None:
    samples = load_golden(DIGITS / GOLDEN_FILE)
    samples["out:output_0"] = samples["out:probs"][::-1].copy()  # wrong answers under the raw output name
    del samples["out:probs"]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **samples)
    reg = Registry(tmp_path / "reg")
    with pytest.raises(RegistryError, match="golden output 'output_0' differs"):
        reg.register(DIGITS / MODEL_FILE, "digits", "1", golden=bad)
    assert reg.versions("digits") == []
    assert not (tmp_path / "reg" / "digits").exists()  # no temp dir, no empty model dir left behind


def test_validation_tolerances_can_be_set(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    m = reg.register(DIGITS / MODEL_FILE, "digits", "1", validation={"atol": 0.01, "rtol": 0.0, "quant_steps": 2})
    on_disk = json.loads((reg.path("digits", "1") / MANIFEST_FILE).read_text())
    assert on_disk["validation"] == m.validation == {"atol": 0.01, "rtol": 0.0, "quant_steps": 2}


@pytest.mark.parametrize(
    ("args", "message"), [(("digits", "v1"), "invalid version 'v1'"), (("../evil", "1"), "invalid model name")]
)
def test_bad_names_and_versions(tmp_path: Path, args: tuple[str, str], message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        Registry(tmp_path).register(DIGITS / MODEL_FILE, *args)
    assert list(tmp_path.iterdir()) == []


def test_missing_things_are_clear_errors(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    with pytest.raises(RegistryError, match="model file not found"):
        reg.register(tmp_path / "nope.tflite", "digits", "1")
    not_tflite = tmp_path / "junk.tflite"
    not_tflite.write_bytes(b"definitely not a flatbuffer")
    with pytest.raises(RegistryError, match=r"cannot register junk\.tflite as digits 1"):
        reg.register(not_tflite, "digits", "1")
    assert not (tmp_path / "digits").exists()
    with pytest.raises(RegistryError, match="model 'digits' has no version '1'"):
        reg.path("digits", "1")
    reg.register(DIGITS / MODEL_FILE, "digits", "1")
    with pytest.raises(RegistryError, match=r"digits version 1 already exists.*next free: 2"):
        reg.require_free("digits", "1")
