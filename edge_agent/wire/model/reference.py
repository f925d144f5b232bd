"""The training reference a manifest may carry for on-device drift (optional; absent = no drift).

Written by ``cloud-batch train``, read by ``edge_agent.telemetry.drift``::

    "reference": {
      "inputs":  {"<input>": {"features": ["temperature", ...],      # one per last-axis column (images: per channel)
                              "edges": [[q0, q1, ..., q10], ...],     # quantile bin edges per feature
                              "fractions": [[f0, ..., f9], ...]}},    # training share per bin (len(edges) - 1)
      "outputs": {"<output>": {"class_fractions": [p0, p1, ...]}}}    # training share of each argmax class

A value below ``q0`` counts in the first bin, above ``q10`` in the last (:func:`bin_counts`, the one
binning rule: the trainer builds the reference with it and the agent bins its rolling window with it,
so PSI compares like with like). :func:`columns` turns an input batch into one column per feature
(the last axis; an image's channels), :func:`output_classes` an output batch into argmax classes.
The document is kept as the plain dict it is (the manifest writes it back unchanged);
:func:`parse_reference` only checks it.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from edge_agent.errors import ManifestError

MAX_BINS = 10  # deciles: q0..q10


def columns(x: Any) -> np.ndarray:
    """``x`` as ``[rows, features]`` float64: one column per last-axis entry (an image's channels)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim <= 1:
        return a.reshape(-1, 1)
    return a.reshape(-1, a.shape[-1])


def bin_counts(values: Any, edges: Any) -> np.ndarray:
    """Counts of ``values`` per bin of ``edges`` (``len(edges) - 1`` bins; out-of-range values go to the end bins)."""
    e = np.asarray(edges, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    idx = np.searchsorted(e[1:-1], v, side="right")
    return np.bincount(idx, minlength=len(e) - 1)[: len(e) - 1]


def output_classes(y: Any) -> tuple[np.ndarray, int]:
    """``(class per row, number of classes)``: argmax of ``[N, C>1]``, ``score >= 0.5`` of ``[N, 1]``, 1-D as is."""
    a = np.asarray(y)
    if a.ndim <= 1:
        classes = a.astype(np.int64).ravel()
        return classes, int(classes.max(initial=-1)) + 1
    flat = a.reshape(-1, a.shape[-1])
    if flat.shape[1] == 1:  # one sigmoid score ([N, 1]): two classes, score >= 0.5 is class 1
        return (flat[:, 0] >= 0.5).astype(np.int64), 2
    return np.argmax(flat, axis=-1).astype(np.int64), int(a.shape[-1])


def _numbers(raw: Any, where: str, *, nonneg: bool = False) -> list[float]:
    if not isinstance(raw, list) or not raw:
        raise ManifestError(f"{where}: expected a non-empty list of numbers")
    for x in raw:
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or (nonneg and x < 0):
            raise ManifestError(f"{where}: {x!r} is not a finite{' non-negative' if nonneg else ''} number")
    return [float(x) for x in raw]


def _check_input(name: str, raw: Any) -> None:
    where = f"manifest.reference.inputs.{name}"
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected an object")
    features, edges, fractions = raw.get("features"), raw.get("edges"), raw.get("fractions")
    if not isinstance(features, list) or not features or not all(isinstance(f, str) and f for f in features):
        raise ManifestError(f"{where}.features: expected a non-empty list of names")
    if not isinstance(edges, list) or not isinstance(fractions, list):
        raise ManifestError(f"{where}: edges and fractions must be lists")
    if len(edges) != len(features) or len(fractions) != len(features):
        raise ManifestError(f"{where}: edges and fractions need one entry per feature ({len(features)})")
    for i, feature in enumerate(features):
        e = _numbers(edges[i], f"{where}.edges[{feature}]")
        f = _numbers(fractions[i], f"{where}.fractions[{feature}]", nonneg=True)
        if len(e) < 2 or len(f) != len(e) - 1:
            raise ManifestError(f"{where}: feature {feature!r} needs >= 2 edges and one fraction per bin")
        if any(b < a for a, b in itertools.pairwise(e)):
            raise ManifestError(f"{where}.edges[{feature}]: edges must not decrease")


def parse_reference(raw: Any, input_names: list[str], output_names: list[str]) -> dict[str, Any] | None:
    """Validate the shape and types of a ``reference`` document; return it unchanged (None when absent)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ManifestError("manifest.reference: expected an object or null")
    inputs, outputs = raw.get("inputs", {}), raw.get("outputs", {})
    if not isinstance(inputs, dict) or not isinstance(outputs, dict):
        raise ManifestError("manifest.reference: inputs and outputs must be objects")
    for name, spec in inputs.items():
        if name not in input_names:
            raise ManifestError(f"manifest.reference.inputs: {name!r} is not an input of the model")
        _check_input(name, spec)
    for name, spec in outputs.items():
        if name not in output_names:
            raise ManifestError(f"manifest.reference.outputs: {name!r} is not an output of the model")
        if not isinstance(spec, dict):
            raise ManifestError(f"manifest.reference.outputs.{name}: expected an object")
        _numbers(spec.get("class_fractions"), f"manifest.reference.outputs.{name}.class_fractions", nonneg=True)
    return raw
