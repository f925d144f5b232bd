"""Real values to a tensor's native type and back: the one quantization rule of the agent and of batch scoring."""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_agent.wire.model.manifest import Quantization, TensorSpec


def quantize(x: np.ndarray, q: Quantization, dtype: np.dtype[Any]) -> np.ndarray:
    """Real values to the quantized integer type, rounding and saturating (one float32 temporary, worked in place)."""
    info = np.iinfo(dtype)
    y = np.asarray(x / q.scale)  # (a 0-d array for a 0-d x, which division turns into a scalar)
    if q.zero_point:
        y += q.zero_point
    np.rint(y, out=y)
    np.clip(y, info.min, info.max, out=y)
    return y.astype(dtype)


def dequantize(x: np.ndarray, q: Quantization) -> np.ndarray:
    """Quantized integers to FP32 real values (one new array, worked in place)."""
    y = x.astype(np.float32)
    if q.zero_point:
        y -= np.float32(q.zero_point)
    y *= np.float32(q.scale)
    return y


def to_native(spec: TensorSpec, arr: np.ndarray, native: np.dtype[Any]) -> np.ndarray:
    """``arr`` in the tensor's ``native`` type: real values quantized, other numbers cast; no checks."""
    if arr.dtype != native:
        if spec.quantization is not None:
            arr = quantize(arr.astype(np.float32, copy=False), spec.quantization, native)
        else:
            arr = arr.astype(native)
    return np.ascontiguousarray(arr)
