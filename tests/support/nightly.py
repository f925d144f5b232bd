"""Helpers for the nightly-pipeline tests: shifted field data, a seeded telemetry store, a pipeline.toml.

The field shift is a new asset type: it runs faster (rpm x1.6) and fails with a pressure rise
while its vibration stays healthy, so v1 (trained where a fault lowers pressure and raises
vibration) ranks it backwards (field AUC ~0.2) and a model retrained on the labeled field rows learns it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cloud_batch.ingest.store import TelemetryStore
from cloud_batch.train.maintenance.data import generate
from cloud_batch.train.maintenance.features import FEATURE_NAMES
from cloud_batch.train.maintenance.job import build_dataset
from edge_agent.wire.telemetry import TelemetryBatch, TelemetryRecord, encode_batch
from edge_agent.wire.topics import telemetry_topic

T0 = 1_764_590_400.0  # 2025-12-01T12:00:00Z
_RPM = FEATURE_NAMES.index("rpm_mean_24h")
_PRESSURE = FEATURE_NAMES.index("pressure_mean_24h")


def shifted_field(n: int, seed: int = 7, positive_rate: float = 0.35) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` rows of the new asset type: (live [n,4], asset_features [n,K], label [n])."""
    rng = np.random.default_rng(seed)
    data = build_dataset(generate(n_assets=30, days=14, seed=seed))
    healthy = np.flatnonzero(data.label == 0)
    idx = rng.choice(healthy, size=n, replace=True)
    live, feats = data.live[idx].copy(), data.features[idx].copy()
    label = (rng.random(n) < positive_rate).astype(np.int64)
    live[:, 3] *= 1.6
    feats[:, _RPM] *= 1.6
    rise = label * rng.uniform(1.5, 2.5, n)
    live[:, 2] += rise
    feats[:, _PRESSURE] += rise
    return live.astype(np.float32), feats.astype(np.float32), label


def _tensor(x: np.ndarray) -> dict[str, Any]:
    return {"shape": [1, *x.shape], "datatype": "FP32", "data": [float(v) for v in x.ravel()]}


def seed_store(
    store: Path,
    fleet: str,
    device: str,
    model: str,
    inputs: dict[str, np.ndarray],
    label: np.ndarray,
    per_batch: int = 400,
    per_commit: int = 50,
) -> None:
    """Commit one labeled prediction of ``model`` per row into ``store``, as ``cloud-batch ingest`` would.

    ``per_batch`` rows (a prediction and its feedback each) per telemetry batch (under the wire's
    size limit), ``per_commit`` batches per commit.
    """
    messages = []
    with TelemetryStore(store, fleet) as s:
        for first in range(0, len(label), per_batch):
            records = []
            for i in range(first, min(first + per_batch, len(label))):
                body = {
                    "model": model,
                    "version": "1",
                    "request_id": f"{device}-r{i}",
                    "inputs": {k: _tensor(v[i]) for k, v in inputs.items()},
                    "outputs": {},
                }
                records.append(TelemetryRecord(2 * i + 1, "prediction", T0 + i, body))
                fb = {"model": model, "request_id": f"{device}-r{i}", "label": int(label[i])}
                records.append(TelemetryRecord(2 * i + 2, "feedback", T0 + i + 0.5, fb))
            batch = TelemetryBatch(device, fleet, records[0].seq, records[-1].seq, tuple(records))
            messages.append((telemetry_topic(fleet, device), encode_batch(batch)))
            if len(messages) == per_commit:
                s.commit(messages)
                messages = []
        if messages:
            s.commit(messages)


def write_config(path: Path, **sections: dict[str, Any]) -> Path:
    """A pipeline.toml for maintenance: small base data, few epochs; ``sections`` override keys per table."""
    tables: dict[str, dict[str, Any]] = {
        "pipeline": {
            "model": "maintenance",
            "fleet": "tfleet",
            "runs_dir": "runs",
            "registry": "registry",
            "store": "store",
        },
        "dataset": {"min_labeled_rows": 100, "holdout_fraction": 0.25},
        "train": {"epochs": 20, "n_assets": 40, "days": 24, "batch_size": 32},
        "gates": {"latency_budget_ms": 1000.0, "max_regression": 0.02},
        "release": {"key": "keys/signing.key", "health_window_s": 1.0},
    }
    for name, values in sections.items():
        tables.setdefault(name, {}).update(values)
    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml(v)}" for k, v in values.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    """A TOML value: strings, booleans, numbers, lists and inline tables."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)
