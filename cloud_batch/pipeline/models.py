"""What the pipeline needs to know about each model it can retrain: inputs, base data, network, metric.

The networks and base data are the training jobs' own (``train/digits.py``,
``train/maintenance/``): the pipeline runs their pieces as separate, resumable steps.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud_batch.errors import InputError
from cloud_batch.pipeline.config import TrainSection


@dataclass
class Rows:
    """Examples: named inputs, labels, a timestamp (epoch s; NaN when the source has none), field or base."""

    inputs: dict[str, np.ndarray]
    y: np.ndarray
    ts: np.ndarray
    field: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def __post_init__(self) -> None:
        if len(self.field) != len(self.y):
            self.field = np.zeros(len(self.y), bool)

    def __len__(self) -> int:
        return len(self.y)

    def take(self, mask: np.ndarray) -> Rows:
        return Rows({k: v[mask] for k, v in self.inputs.items()}, self.y[mask], self.ts[mask], self.field[mask])

    @staticmethod
    def concat(a: Rows, b: Rows) -> Rows:
        return Rows(
            {k: np.concatenate([a.inputs[k], b.inputs[k]]) for k in a.inputs},
            np.concatenate([a.y, b.y]),
            np.concatenate([a.ts, b.ts]),
            np.concatenate([a.field, b.field]),
        )

    def save(self, path: Path) -> None:
        arrays = {f"in:{k}": v for k, v in self.inputs.items()}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, y=self.y, ts=self.ts, field=self.field, **arrays)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @staticmethod
    def load(path: Path) -> Rows:
        with np.load(path) as z:
            inputs = {k[3:]: z[k] for k in z.files if k.startswith("in:")}
            return Rows(inputs, z["y"], z["ts"], z["field"])


def time_split(rows: Rows, fraction: float) -> tuple[Rows, Rows]:
    """The latest ``fraction`` of ``rows`` by timestamp (ties kept together) as the holdout: (train, holdout)."""
    if len(rows) == 0:
        return rows, rows
    cut = np.quantile(rows.ts, 1.0 - fraction) if fraction > 0 else np.inf
    held = rows.ts > cut if fraction < 1 else np.ones(len(rows), bool)
    if fraction > 0 and not held.any():
        held = rows.ts >= cut
    return rows.take(~held), rows.take(held)


@dataclass(frozen=True)
class ModelSpec:
    """One retrainable model."""

    name: str
    inputs: Mapping[str, tuple[int, ...]]
    output: str
    kind: str  # "softmax" | "sigmoid"
    metric: str  # "accuracy" | "auc"
    quantization: str
    n_classes: int

    def label_values(self, raw: list[Any]) -> np.ndarray:
        """Labels as class indices (digits: 0-9 or "0".."9"; maintenance: 0/1); InputError for others."""
        out = np.empty(len(raw), np.int64)
        for i, v in enumerate(raw):
            try:
                value = int(v) if not isinstance(v, float) or float(v).is_integer() else None
            except (TypeError, ValueError):
                value = None
            if value is None or not 0 <= value < self.n_classes or isinstance(v, (list, dict)):
                raise InputError(f"{self.name}: label {v!r} is not a class index in 0..{self.n_classes - 1}")
            out[i] = value
        return out

    def score(self, p: np.ndarray, y: np.ndarray) -> float:
        """The gated metric: accuracy (digits) or ROC AUC (maintenance; NaN with one class)."""
        if self.metric == "accuracy":
            return float((np.asarray(p).argmax(axis=1) == y).mean())
        from sklearn.metrics import roc_auc_score

        if len(np.unique(y)) < 2:
            return float("nan")
        return float(roc_auc_score(y, np.asarray(p).reshape(len(y), -1)[:, 0]))

    def base_split(self, train: TrainSection, holdout_fraction: float) -> tuple[Rows, Rows]:
        """The built-in training data, split into (train, holdout)."""
        if self.name == "digits":
            from cloud_batch.train.digits import load_split

            x_tr, x_te, y_tr, y_te = load_split(train.seed)  # no timestamps: the job's seeded stratified split
            nan = np.full(len(y_tr) + len(y_te), np.nan)
            return Rows({"pixels": x_tr}, y_tr, nan[: len(y_tr)]), Rows({"pixels": x_te}, y_te, nan[len(y_tr) :])
        from cloud_batch.train.maintenance.data import generate
        from cloud_batch.train.maintenance.job import build_dataset

        data = build_dataset(generate(n_assets=train.n_assets, days=train.days, seed=train.seed))
        ts = data.as_of.astype("datetime64[s]").astype(np.float64)
        rows = Rows({"live": data.live, "asset_features": data.features}, data.label.astype(np.int64), ts)
        return time_split(rows, holdout_fraction)

    def build_model(self, train: Rows) -> Any:
        """A compiled, untrained network (the training job's), normalised on ``train``."""
        if self.name == "digits":
            from cloud_batch.train import digits

            return digits.build_model()
        from cloud_batch.train.maintenance.job import Dataset, build_model

        n = len(train)
        dummy = np.zeros(n)
        return build_model(Dataset(train.inputs["live"], train.inputs["asset_features"], train.y, dummy, dummy))

    def joined_sets(self) -> dict[str, str]:
        """The feature sets the model's manifest joins (``feature_joins``), each with the recipe that rebuilds it."""
        if self.name == "digits":
            return {}
        from cloud_batch.train.maintenance.job import FEATURE_JOINS

        return {str(j["set"]): "maintenance" for j in FEATURE_JOINS.values()}

    def register_kwargs(self, holdout: Rows) -> dict[str, Any]:
        """Keywords for ``Registry.register`` beyond metrics: golden inputs, labels, joins, tolerance."""
        rename = {"output_0": self.output}
        if self.name == "digits":
            from cloud_batch.train.digits import LABELS, PREPROCESSING

            idx = [int(np.flatnonzero(holdout.y == c)[0]) for c in range(10) if np.any(holdout.y == c)]
            golden = {"pixels": holdout.inputs["pixels"][idx]}
            return {"golden_inputs": golden, "labels": LABELS, "preprocessing": PREPROCESSING, "rename_outputs": rename}
        from cloud_batch.train.maintenance.job import FEATURE_JOINS, FEATURE_NAMES_EXTRA, GOLDEN_TOLERANCE

        pos, neg = np.flatnonzero(holdout.y == 1)[:4], np.flatnonzero(holdout.y == 0)
        idx = np.concatenate([pos, neg[: 8 - len(pos)]])
        golden = {k: v[idx] for k, v in holdout.inputs.items()}
        extra = {"feature_names": FEATURE_NAMES_EXTRA, "feature_joins": FEATURE_JOINS}
        return {"golden_inputs": golden, "rename_outputs": rename, "extra": extra, "validation": GOLDEN_TOLERANCE}


def spec_for(model: str) -> ModelSpec:
    """The spec of ``model`` (InputError for models the pipeline cannot retrain)."""
    if model == "digits":
        return ModelSpec("digits", {"pixels": (8, 8, 1)}, "probs", "softmax", "accuracy", "int8", 10)
    if model == "maintenance":
        from cloud_batch.train.maintenance.features import FEATURE_NAMES, LIVE_FEATURES

        shapes = {"live": (len(LIVE_FEATURES),), "asset_features": (len(FEATURE_NAMES),)}
        return ModelSpec("maintenance", shapes, "failure_prob", "sigmoid", "auc", "int16x8", 2)
    raise InputError(f"the pipeline cannot retrain model {model!r}; use digits or maintenance")
