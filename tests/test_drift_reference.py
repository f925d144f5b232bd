"""The drift reference ``cloud-batch train`` writes into a manifest: bins that describe the training data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cloud_batch.train.reference import build_reference
from edge_agent.errors import ManifestError
from edge_agent.wire.model.manifest import Manifest
from edge_agent.wire.model.reference import bin_counts, parse_reference


def psi(expected: list[float], actual: np.ndarray) -> float:
    e = np.maximum(np.asarray(expected), 1e-4)
    a = np.maximum(actual / actual.sum(), 1e-4)
    return float(np.sum((a - e) * np.log(a / e)))


def test_tabular_quantile_bins_separate_in_and_out_of_distribution() -> None:
    rng = np.random.default_rng(0)
    train = np.stack([rng.normal(60, 5, 5000), rng.uniform(0, 1, 5000)], axis=1).astype(np.float32)
    ref = build_reference({"live": train}, {}, {"live": ["temperature", "load"]})["inputs"]["live"]
    assert ref["features"] == ["temperature", "load"]
    assert all(len(e) == 11 and len(f) == 10 for e, f in zip(ref["edges"], ref["fractions"], strict=True))
    assert all(abs(sum(f) - 1) < 1e-3 and max(f) < 0.12 for f in ref["fractions"])  # deciles: ~0.1 each
    fresh = rng.normal(60, 5, 1000)
    assert psi(ref["fractions"][0], bin_counts(fresh, ref["edges"][0])) < 0.1
    assert psi(ref["fractions"][0], bin_counts(fresh + 15, ref["edges"][0])) > 0.25  # +15 °C


def test_image_channels_get_mean_std_bins_and_outputs_their_class_share() -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 17, size=(300, 8, 8, 1)).astype(np.float32)
    probs = np.eye(10)[rng.integers(0, 10, 300)]
    score = rng.uniform(0, 1, (300, 1))
    ref = build_reference({"pixels": images}, {"probs": probs, "failure_prob": score})
    px = ref["inputs"]["pixels"]
    assert px["features"] == ["pixels.c0"] and 2 <= len(px["edges"][0]) <= 11
    assert sum(px["fractions"][0]) == pytest.approx(1, abs=1e-3)
    assert len(ref["outputs"]["probs"]["class_fractions"]) == 10
    share = ref["outputs"]["failure_prob"]["class_fractions"]  # one sigmoid column: below/above 0.5
    assert len(share) == 2 and share[1] == pytest.approx(float((score >= 0.5).mean()), abs=1e-6)


def test_manifest_round_trips_the_reference_and_refuses_a_bad_one(digits_dir: Path) -> None:
    raw = json.loads((digits_dir / "manifest.json").read_text())
    rng = np.random.default_rng(2)
    raw["reference"] = build_reference(
        {"pixels": rng.uniform(0, 16, (50, 8, 8, 1))}, {"probs": np.eye(10)[rng.integers(0, 10, 50)]}
    )
    m = Manifest.from_dict(json.loads(json.dumps(raw)))
    assert m.reference == raw["reference"]
    assert Manifest.from_dict(m.to_dict()).reference == raw["reference"]
    del raw["reference"]
    assert Manifest.from_dict(raw).reference is None  # backwards compatible: no reference, no drift
    with pytest.raises(ManifestError, match="not an input"):
        parse_reference({"inputs": {"nope": {}}}, ["pixels"], ["probs"])
