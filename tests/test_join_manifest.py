"""The manifest's ``feature_joins`` declaration: each malformed edit is refused, and the shipped maintenance model declares its join."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edge_agent.errors import ManifestError
from edge_agent.wire.model.manifest import MANIFEST_FILE, Manifest
from tests.support.join import FEATURES, MAINT, SET


# -- the manifest declaration ----------------------------------------------------------------------
def _manifest(edit: Any) -> dict[str, Any]:
    raw = json.loads((MAINT / MANIFEST_FILE).read_text())
    edit(raw["feature_joins"])
    return raw


@pytest.mark.parametrize(
    "edit,error",
    [
        (lambda j: j.update(pixels=j.pop("asset_features")), "the model has no input 'pixels'"),
        (lambda j: j["asset_features"]["features"].pop(), "17 names for input 'asset_features' of width 18"),
        (lambda j: j["asset_features"]["features"].__setitem__(1, j["asset_features"]["features"][0]), "duplicate"),
        (lambda j: j["asset_features"].update(default=[0.0] * 17), "default: expected null or 18 finite numbers"),
        (lambda j: j["asset_features"].update(default=[float("nan")] * 18), "default: expected null or 18 finite"),
        (lambda j: j["asset_features"].update(set="no/slash"), "feature_joins['asset_features'].set"),
        (lambda j: j["asset_features"].update(features=[]), "non-empty list of feature names"),
        (lambda j: j["asset_features"].update(sets="x"), "unknown keys ['sets']"),
    ],
)
def test_the_manifest_declaration_is_validated(edit: Any, error: str) -> None:
    with pytest.raises(ManifestError, match=None) as exc:
        Manifest.from_dict(_manifest(edit))
    assert error in str(exc.value)


def test_the_shipped_maintenance_manifest_declares_its_join() -> None:
    m = Manifest.load(MAINT / MANIFEST_FILE)
    join = m.feature_joins["asset_features"]
    assert (join.input, join.set, list(join.features), join.default) == ("asset_features", SET, FEATURES, None)
    assert list(m.feature_joins) == ["asset_features"]  # live is always sent by the client
    assert Manifest.from_dict(json.loads(m.to_json())).feature_joins == m.feature_joins
