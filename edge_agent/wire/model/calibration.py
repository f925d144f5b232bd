"""A model's calibration as its manifest records it: ``metrics["calibration"]``.

The nightly pipeline (``cloud_batch.pipeline``) folds a fitted temperature into the model before
conversion, so devices run the calibrated model unchanged; the manifest only records what was
done so operators can see it (``GET /v2/models/{m}`` ``parameters.calibration``, ``edge-agent
status``): ``temperature`` (T, logits divided by it), ``ece`` (expected calibration error after,
15 bins, on the run's holdout) and optionally ``ece_before``, ``bins``, ``method``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

CALIBRATION_KEY = "calibration"
_NUMBERS = ("temperature", "ece", "ece_before")


def calibration_of(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """The recorded calibration (finite numbers only; other keys as given), None when the manifest has none."""
    raw = metrics.get(CALIBRATION_KEY)
    if not isinstance(raw, Mapping):
        return None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _NUMBERS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            out[key] = float(value)
        elif isinstance(value, (str, int)) and not isinstance(value, bool):
            out[key] = value
    return out if "temperature" in out else None


def describe(cal: Mapping[str, Any] | None) -> str:
    """``calibration_of``'s result for a terminal: ``T=1.420, ECE 0.031 (was 0.087)`` or ``not calibrated``."""
    if cal is None:
        return "not calibrated"
    text = f"T={cal['temperature']:.3f}"
    if "ece" in cal:
        text += f", ECE {cal['ece']:.3f}"
    if "ece_before" in cal:
        text += f" (was {cal['ece_before']:.3f})"
    return text
