"""The shipped models in ``models/`` (a registry dir, rebuilt by ``make models``) are valid and good.

Everything runs through the edge runtime, as on a device; TensorFlow is not needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cloud_batch.registry.models import Registry
from cloud_batch.train.device_eval import predict_batched
from cloud_batch.train.maintenance.features import FEATURE_NAMES, LIVE_FEATURES
from edge_agent.inference.modelpack import verify_version_dir
from edge_agent.inference.runtime import LoadedModel
from edge_agent.wire.model.manifest import GOLDEN_FILE, MANIFEST_FILE, MODEL_FILE

REPO = Path(__file__).resolve().parents[1]
MODELS = Registry(REPO / "models")


@pytest.mark.parametrize("name", ["digits", "maintenance"])
def test_shipped_version_dirs_verify(name: str) -> None:
    assert MODELS.versions(name) == ["1"], "run `make models`"
    d = MODELS.path(name, "1")
    assert sorted(p.name for p in d.iterdir()) == sorted([MODEL_FILE, MANIFEST_FILE, GOLDEN_FILE])
    m = verify_version_dir(d)  # sha256, size, tensor specs and golden samples reproduce
    assert (m.name, m.version) == (name, "1")
    assert m.size < 100_000  # committed to git: keep them small


def test_shipped_digits_contract_and_held_out_accuracy() -> None:
    from cloud_batch.train.digits import LABELS, PREPROCESSING, load_split

    d = MODELS.path("digits", "1")
    m = verify_version_dir(d, run_golden=False)
    (inp,), (out,) = m.inputs, m.outputs
    assert (inp.name, inp.dtype, inp.datatype, inp.shape) == ("pixels", "int8", "FP32", (-1, 8, 8, 1))
    assert (out.name, out.dtype, out.datatype, out.shape) == ("probs", "int8", "FP32", (-1, 10))
    assert m.labels == LABELS and m.preprocessing == PREPROCESSING
    assert m.metrics["int8_accuracy"] >= 0.95 and m.metrics["float_accuracy"] - m.metrics["int8_accuracy"] <= 0.01

    _, x_test, _, y_test = load_split(m.metrics["seed"])
    probs = predict_batched(LoadedModel(d / MODEL_FILE, m), {"pixels": x_test})["probs"]
    accuracy = float((probs.argmax(axis=1) == y_test).mean())
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(m.metrics["int8_accuracy"], abs=1e-4)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=0.05)


def test_shipped_digits_golden_samples_are_real_digits() -> None:
    with np.load(MODELS.path("digits", "1") / GOLDEN_FILE) as g:
        pixels, probs = g["in:pixels"], g["out:probs"]
    assert pixels.shape == (10, 8, 8, 1) and pixels.min() >= 0 and pixels.max() <= 16
    assert np.array_equal(pixels, np.round(pixels))  # raw load_digits intensities, not random noise
    assert (probs.argmax(axis=1) == np.arange(10)).sum() >= 9  # one sample per class, in class order


def test_shipped_maintenance_contract() -> None:
    d = MODELS.path("maintenance", "1")
    m = verify_version_dir(d, run_golden=False)
    ins = {s.name: s for s in m.inputs}
    assert set(ins) == {"live", "asset_features"}
    assert ins["live"].shape == (-1, len(LIVE_FEATURES)) and ins["asset_features"].shape == (-1, len(FEATURE_NAMES))
    assert all(s.datatype == "FP32" and s.quantization is not None for s in m.inputs)
    (out,) = m.outputs
    assert (out.name, out.datatype, out.shape) == ("failure_prob", "FP32", (-1, 1))
    raw = json.loads((d / MANIFEST_FILE).read_text())
    assert raw["feature_names"] == {"live": list(LIVE_FEATURES), "asset_features": list(FEATURE_NAMES)}
    # The device fills asset_features from its cached feature set of that name (edge_agent/features/join.py).
    assert raw["feature_joins"] == {
        "asset_features": {"set": "asset_features", "features": list(FEATURE_NAMES), "default": None}
    }
    assert list(m.feature_joins) == ["asset_features"]
    assert m.metrics["quantized_auc"] >= 0.85 and m.metrics["float_auc"] - m.metrics["quantized_auc"] <= 0.01


def test_shipped_maintenance_ranks_failures_on_unseen_assets() -> None:
    """Recompute the held-out AUC from raw history through asset_features and the edge runtime."""
    from sklearn.metrics import roc_auc_score

    from cloud_batch.train.maintenance.data import generate
    from cloud_batch.train.maintenance.job import build_dataset, split_assets

    d = MODELS.path("maintenance", "1")
    m = verify_version_dir(d, run_golden=False)
    _, test = split_assets(build_dataset(generate(seed=m.metrics["seed"])), m.metrics["seed"])
    p = predict_batched(LoadedModel(d / MODEL_FILE, m), test.inputs())["failure_prob"]
    assert p.shape == (len(test.label), 1) and p.min() >= 0 and p.max() <= 1
    auc = roc_auc_score(test.label, p[:, 0])
    assert auc >= 0.85
    assert auc == pytest.approx(m.metrics["quantized_auc"], abs=1e-3)
