"""The training reference a model's manifest carries, so the device can measure input and output drift.

Format and binning rule: ``edge_agent.wire.model.reference`` (the agent applies the same
``bin_counts`` to its rolling window, so PSI compares like with like). Tabular inputs get
quantile edges; images (rank > 2) get edges from each channel's mean and std, which is cheap
over millions of pixels and still separates a brightness or contrast shift.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

from edge_agent.wire.model.reference import bin_counts, columns, output_classes

MAX_BINS = 10  # q0..q10

_DECILES = [i / MAX_BINS for i in range(1, MAX_BINS)]
_Z = np.array([NormalDist().inv_cdf(q) for q in _DECILES])
MAX_SAMPLE = 200_000  # values per feature the quantiles are taken over (seeded subsample above)


def feature_edges(values: np.ndarray, image: bool) -> list[float]:
    """Strictly increasing bin edges of one feature: quantiles q0..q10, or mean + std·z deciles for an image channel."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    if image:
        inner = float(v.mean()) + float(v.std()) * _Z
        inner = inner[(inner > lo) & (inner < hi)]
        edges = np.concatenate([[lo], inner, [hi]])
    else:
        edges = np.quantile(v, np.linspace(0.0, 1.0, MAX_BINS + 1))
    edges = np.unique(np.round(edges, 6))
    if len(edges) < 2:  # a constant feature: one bin around its value
        edges = np.array([lo - 0.5, lo + 0.5])
    return [float(e) for e in edges]


def _fractions(counts: np.ndarray) -> list[float]:
    total = counts.sum()
    return [round(float(c) / total, 6) for c in counts] if total else [0.0] * len(counts)


def input_reference(name: str, x: np.ndarray, features: Sequence[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """``{features, edges, fractions}`` of one input over its training values (see the module docstring)."""
    cols = columns(x)
    if len(cols) > MAX_SAMPLE:
        cols = cols[np.random.default_rng(seed).choice(len(cols), MAX_SAMPLE, replace=False)]
    image = np.asarray(x).ndim > 2
    names = list(features) if features is not None and len(features) == cols.shape[1] else None
    if names is None:
        names = [f"{name}.c{i}" if image else f"{name}[{i}]" for i in range(cols.shape[1])]
    edges = [feature_edges(cols[:, i], image) for i in range(cols.shape[1])]
    fractions = [_fractions(bin_counts(cols[:, i], e)) for i, e in enumerate(edges)]
    return {"features": names, "edges": edges, "fractions": fractions}


def build_reference(
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray],
    feature_names: Mapping[str, Sequence[str]] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The manifest ``reference``: per-input bins from training inputs, class fractions of the model's outputs."""
    names = feature_names or {}
    ref: dict[str, Any] = {
        "inputs": {k: input_reference(k, v, names.get(k), seed) for k, v in inputs.items()},
        "outputs": {},
    }
    for name, y in outputs.items():
        classes, n = output_classes(y)
        ref["outputs"][name] = {"class_fractions": _fractions(np.bincount(classes, minlength=n))}
    return ref
