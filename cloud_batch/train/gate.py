"""The quality gate: the last check before a quantized model may be registered.

Quantization can silently wreck a model (bad calibration ranges, an input whose scale
swamps the others). The gate compares the quantized model with its float original on
held-out data and refuses it when it is too far below the float model or below an
absolute floor. Refusal is an exception, so no code path can register a refused model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cloud_batch.errors import QualityGateError


@dataclass(frozen=True)
class Gate:
    """Thresholds for one metric (higher is better), e.g. accuracy ≥ 0.95 and ≤ 0.01 below float."""

    metric: str
    minimum: float
    max_drop: float

    def check(self, float_value: float, quant_value: float, metrics: dict[str, Any] | None = None) -> None:
        """Raise QualityGateError unless ``quant_value`` meets both thresholds."""
        problems = []
        if quant_value < self.minimum:
            problems.append(f"quantized {self.metric} {quant_value:.4f} is below the floor {self.minimum:.4f}")
        drop = float_value - quant_value
        if drop > self.max_drop:
            problems.append(
                f"quantized {self.metric} {quant_value:.4f} is {drop:.4f} below float {float_value:.4f} "
                f"(allowed drop {self.max_drop:.4f})"
            )
        if problems:
            raise QualityGateError("model refused, nothing registered: " + "; ".join(problems), metrics)
