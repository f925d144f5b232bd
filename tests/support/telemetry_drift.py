"""Maintenance traffic and a maintenance version with a training reference, for the drift tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cloud_batch.train.maintenance.data import SENSORS, generate
from cloud_batch.train.reference import build_reference
from edge_agent.models.serving import ModelServer
from edge_agent.models.store import ModelStore
from tests.support.env import MODELS


def readings(part: int) -> np.ndarray:
    """Sensor readings of one fleet: part 0 trains the reference, part 1 is later traffic of the same assets."""
    rows = generate(n_assets=40, days=5, seed=0)[list(SENSORS)].to_numpy(np.float32)
    rows = rows[np.random.default_rng(1).permutation(len(rows))]
    return rows[:3000] if part == 0 else rows[3000:]


def infer_body(live: np.ndarray) -> dict[str, Any]:
    """A V2 request for maintenance with ``live`` sensor values (one row) and zero asset features."""
    return {
        "inputs": [
            {"name": "live", "shape": [1, 4], "datatype": "FP32", "data": live.tolist()},
            {"name": "asset_features", "shape": [1, 18], "datatype": "FP32", "data": [0.0] * 18},
        ]
    }


def reference_version(work: Path, version: str = "2") -> Path:
    """maintenance 1 as ``version`` with the training reference of ``readings(0)`` in its manifest."""
    src = work / f"maintenance-{version}"
    shutil.copytree(MODELS / "maintenance" / "1", src)
    store = ModelStore(work / "probe")
    store.install_dir(MODELS / "maintenance" / "1")
    probe = ModelServer(store)
    probe.sync()
    train = readings(0)
    model = probe.get("maintenance")
    parts = [
        model.predict({"live": train[i : i + 64], "asset_features": np.zeros((len(train[i : i + 64]), 18), np.float32)})
        for i in range(0, len(train), 64)
    ]
    probe.stop()
    outputs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["version"] = version
    manifest["reference"] = build_reference({"live": train}, outputs, {"live": list(SENSORS)})
    (src / "manifest.json").write_text(json.dumps(manifest))
    return src
