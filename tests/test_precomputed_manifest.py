"""``manifest.precomputed``: every bad declaration is a ManifestError naming the field; good ones round-trip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cloud_batch.cli.main import main as cloud
from cloud_batch.registry.models import Registry
from edge_agent.cli.main import main as edge
from edge_agent.errors import ManifestError
from edge_agent.models.store import ModelStore
from edge_agent.wire.model.manifest import MANIFEST_FILE, Manifest
from edge_agent.wire.model.precomputed import Precomputed
from tests.support.join import MAINT
from tests.support.precomputed import DECLARATION, SCORES, scored_model

RAW = json.loads((MAINT / MANIFEST_FILE).read_text())


def declared(decl: Any) -> Manifest:
    return Manifest.from_dict({**RAW, "precomputed": decl})


def test_a_declaration_parses_and_round_trips() -> None:
    m = declared(DECLARATION)
    assert m.precomputed == Precomputed(SCORES, {"failure_prob": ("failure_prob",)}, 3600.0)
    assert m.to_dict()["precomputed"] == DECLARATION
    assert Manifest.from_dict(json.loads(m.to_json())).precomputed == m.precomputed
    assert Manifest.from_dict(RAW).precomputed is None  # not declared: the hot path's one check
    # A writer that passes the JSON form through ``extra`` (as cloud_batch does) gets it validated too.
    fields = {k: getattr(m, k) for k in ("name", "version", "sha256", "size", "inputs", "outputs")}
    assert Manifest(**fields, extra={"precomputed": DECLARATION}).precomputed == m.precomputed
    with pytest.raises(ManifestError, match="max_age_s"):
        Manifest(**fields, extra={"precomputed": {**DECLARATION, "max_age_s": 0}})


@pytest.mark.parametrize(
    ("decl", "message"),
    [
        ("maintenance_scores", r"manifest.precomputed: expected an object \{set, outputs, max_age_s\}"),
        ({**DECLARATION, "ttl": 5}, r"manifest.precomputed: unknown keys \['ttl'\]"),
        ({"set": SCORES, "outputs": DECLARATION["outputs"]}, r"manifest.precomputed: missing \['max_age_s'\]"),
        ({**DECLARATION, "set": "no/slash"}, r"manifest.precomputed.set: expected a feature set name"),
        ({**DECLARATION, "max_age_s": 0}, r"max_age_s: expected a positive number of seconds, got 0"),
        ({**DECLARATION, "max_age_s": -5.0}, r"got -5.0"),
        ({**DECLARATION, "max_age_s": True}, r"got True"),
        ({**DECLARATION, "max_age_s": "1d"}, r"got '1d'"),
        ({**DECLARATION, "outputs": {}}, r"manifest.precomputed.outputs: expected an object"),
        (
            {**DECLARATION, "outputs": {"probs": ["p0"]}},
            r"manifest.precomputed.outputs: the model has no output 'probs' \(outputs: \['failure_prob'\]\)",
        ),
        (
            {**DECLARATION, "outputs": {"failure_prob": ["p0", "p1"]}},
            r"\['failure_prob'\]: 2 columns for output 'failure_prob' of shape \[-1, 1\] \(1 value per row\)",
        ),
        ({**DECLARATION, "outputs": {"failure_prob": []}}, r"expected a non-empty list of column names"),
        ({**DECLARATION, "outputs": {"failure_prob": [3]}}, r"expected a non-empty list of column names"),
    ],
)
def test_bad_declarations_are_refused_naming_the_field(decl: Any, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        declared(decl)


def test_every_output_needs_columns_of_its_row_width() -> None:
    two = {**RAW, "outputs": [*RAW["outputs"], {**RAW["outputs"][0], "name": "probs", "shape": [-1, 3]}]}
    with pytest.raises(ManifestError, match="output 'probs' has no columns"):
        Manifest.from_dict({**two, "precomputed": DECLARATION})
    cols = {"failure_prob": ["f"], "probs": ["p0", "p1", "p2"]}
    assert Manifest.from_dict({**two, "precomputed": {**DECLARATION, "outputs": cols}}).precomputed is not None
    with pytest.raises(ManifestError, match="a column is named twice"):
        Manifest.from_dict({**two, "precomputed": {**DECLARATION, "outputs": {**cols, "probs": ["f", "p1", "p2"]}}})
    dynamic = {**two, "outputs": [two["outputs"][0], {**two["outputs"][1], "shape": [-1, -1]}]}
    with pytest.raises(ManifestError, match="needs a fixed row shape"):
        Manifest.from_dict({**dynamic, "precomputed": {**DECLARATION, "outputs": cols}})


def test_the_store_refuses_to_install_a_bad_declaration(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "data")
    bad = scored_model(tmp_path, {**DECLARATION, "outputs": {"failure_prob": ["a", "b"]}})
    with pytest.raises(ManifestError, match="2 columns for output 'failure_prob'"):
        store.install_dir(bad)
    assert store.install_dir(scored_model(tmp_path, version="2")) is not None


def test_manifest_files_attach_the_declaration_on_both_sides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--manifest FILE.json`` (``wire/model/merge.py``) carries ``precomputed``; a bad one is an ``error:``, nothing written."""
    fields = {"outputs": {"output_0": "failure_prob"}, "precomputed": DECLARATION}
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(fields))
    bad.write_text(json.dumps({**fields, "precomputed": {**DECLARATION, "outputs": {"output_0": ["p"]}}}))
    model, data, reg = str(MAINT / "model.tflite"), str(tmp_path / "data"), str(tmp_path / "registry")
    for argv in (
        ["models", "install", model, "--name", "scored", "--version", "1", "--data-dir", data],
        ["register", model, "--name", "scored", "--version", "1", "--registry", reg],
    ):
        run = edge if argv[0] == "models" else cloud
        assert run([*argv, "--manifest", str(bad)]) != 0
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "the model has no output 'output_0'" in err, err
        assert run([*argv, "--manifest", str(good)]) == 0, capsys.readouterr().err
    assert ModelStore(tmp_path / "data").manifest("scored", "1").precomputed == declared(DECLARATION).precomputed
    assert Registry(reg).manifest("scored", "1").precomputed == declared(DECLARATION).precomputed
