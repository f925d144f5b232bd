"""Precomputed-first serving rig: the shipped maintenance model twice (joined, and scored ahead), real cache, real builders.

``maintenance`` is the shipped model (its ``asset_features`` join only); ``maintenance_scored`` is the
same model under another name whose manifest also declares ``precomputed`` answers in
``maintenance_scores``. Score bundles are built with the cloud's own ``features build`` from a CSV
of the model's real answers (so a precomputed answer must equal a live one bit for bit), and
applied to a real SQLite cache whose clock the tests set.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cloud_batch.features.build import build
from edge_agent.features.cache import DB_FILE, FeatureCache
from edge_agent.models.serving import ModelServer
from edge_agent.models.store import ModelStore
from edge_agent.wire.bundle import FeatureSpec, write_bundle
from edge_agent.wire.model.manifest import MANIFEST_FILE
from tests.support.join import FEATURES, MAINT
from tests.support.join import SET as ASSET_SET

T0 = 1_800_000_000.0
MAX_AGE = 3600.0
SCORES = "maintenance_scores"
SCORED = "maintenance_scored"
OUT = "failure_prob"
DECLARATION = {"set": SCORES, "outputs": {OUT: [OUT]}, "max_age_s": MAX_AGE}

with np.load(MAINT / "golden.npz") as _g:
    LIVE, ASSET = _g["in:live"], _g["in:asset_features"]
ENTITIES = [f"asset-{i}" for i in range(len(ASSET))]


def scored_model(tmp: Path, declaration: dict[str, Any] | None = None, version: str = "1") -> Path:
    """The maintenance model renamed ``maintenance_scored``, its manifest declaring ``precomputed``."""
    out = tmp / f"{SCORED}-{version}"
    shutil.copytree(MAINT, out)
    raw = json.loads((out / MANIFEST_FILE).read_text())
    raw.update(name=SCORED, version=version, precomputed=declaration or DECLARATION)
    (out / MANIFEST_FILE).write_text(json.dumps(raw))
    return out


def asset_bundle(tmp: Path) -> Path:
    """The golden rows as ``asset_features`` version 1 (no TTL), for the joins of the live path."""
    path = tmp / "asset-features-1"
    specs = [FeatureSpec(f, "float32") for f in FEATURES]
    write_bundle(path, ASSET_SET, "1", "snapshot", ENTITIES, T0 - 100, ASSET, specs, ttl_s=None)
    return path


def score_bundle(reg: Path, tmp: Path, version: str, probs: np.ndarray, *, scored_at: float, **kw: Any) -> Path:
    """``maintenance_scores`` ``version`` built by ``cloud-batch features build`` from a table of scores."""
    n = len(probs)
    frame = pd.DataFrame(
        {
            "rank": np.argsort(-probs).argsort().astype(np.float64),  # a column before the score: a real index map
            "asset": ENTITIES[:n],
            OUT: probs.astype(np.float32),
            "scored_at": np.full(n, scored_at),
        }
    )
    src = tmp / f"scores-{version}.csv"
    frame.to_csv(src, index=False, float_format="%.17g")
    result = build(reg, SCORES, version, source=src, entity_key="asset", event_ts_col="scored_at", progress=False, **kw)
    return result.path


class Rig:
    """Both models installed and served, a feature cache holding ``asset_features``, a registry for score bundles."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.reg = tmp / "registry"
        self.store = ModelStore(tmp / "data")
        self.store.install_dir(MAINT)
        self.store.install_dir(scored_model(tmp))
        self.server = ModelServer(self.store)
        self.server.sync()
        self.now = T0  # the cache's clock
        self.cache = FeatureCache(tmp / "data" / DB_FILE, clock=lambda: self.now)
        self.cache.apply(asset_bundle(tmp))
        self.live_probs = self.expected(LIVE, ASSET)[:, 0]

    def expected(self, live: np.ndarray, asset: np.ndarray) -> np.ndarray:
        """What the interpreter answers for these inputs."""
        out: np.ndarray = self.server.get("maintenance").predict({"live": live, "asset_features": asset})[OUT]
        return out

    def publish(self, version: str, probs: np.ndarray | None = None, *, age: float = 60.0, **kw: Any) -> None:
        """Build score version ``version`` (default: the model's own answers), scored ``age`` seconds ago, and apply it."""
        probs = self.live_probs if probs is None else probs
        self.cache.apply(score_bundle(self.reg, self.tmp, version, probs, scored_at=self.now - age, **kw))

    def close(self) -> None:
        self.server.stop()
        self.cache.close()


def body(live: np.ndarray | None = None, **params: Any) -> dict[str, Any]:
    """An infer body naming entities in ``params``, with the ``live`` input when given."""
    out: dict[str, Any] = {}
    if live is not None:
        out["inputs"] = [{"name": "live", "shape": list(live.shape), "datatype": "FP32", "data": live.ravel().tolist()}]
    if params:
        out["parameters"] = params
    return out


def probs(resp: dict[str, Any]) -> np.ndarray:
    """The ``failure_prob`` output of a response, as float32 [N]."""
    (out,) = resp["outputs"]
    assert out["name"] == OUT and out["datatype"] == "FP32"
    return np.asarray(out["data"], np.float32).reshape(out["shape"])[:, 0]
