"""Quantize and dequantize: rounding, the zero point, saturation, and round trips with each zoo model's own parameters."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edge_agent.inference.runtime import dequantize, inspect_model, quantize
from edge_agent.wire.model.manifest import Quantization
from tests.modelzoo import Zoo
from tests.support.runtime import QUANTIZED

# -- quantize / dequantize ------------------------------------------------------------------------


def test_quantize_rounds_to_nearest_and_applies_the_zero_point() -> None:
    q = Quantization(scale=0.5, zero_point=3)
    x = np.array([0.0, 0.24, 0.26, 0.74, -0.24, -0.26, -0.76, 1.0, -1.0], np.float32)
    want = np.array([3, 3, 4, 4, 3, 2, 1, 5, 1], np.int8)
    got = quantize(x, q, np.dtype(np.int8))
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, want)
    # Exact halves go to one of the two neighbours, never further.
    halves = np.array([0.25, 0.75, -0.25, -0.75], np.float32)
    diff = quantize(halves, q, np.dtype(np.int8)).astype(np.float64) - (halves / 0.5 + 3)
    assert np.all(np.abs(diff) == 0.5)


@pytest.mark.parametrize(
    "dtype, q, lo, hi",
    [
        (np.int8, Quantization(0.1, 0), -128, 127),
        (np.int8, Quantization(0.02, -128), -128, 127),
        (np.uint8, Quantization(0.1, 0), 0, 255),
        (np.uint8, Quantization(1 / 255, 128), 0, 255),
    ],
)
def test_quantize_saturates(dtype: Any, q: Quantization, lo: int, hi: int) -> None:
    beyond = [(hi - q.zero_point + 10) * q.scale, (lo - q.zero_point - 10) * q.scale]
    x = np.array([1e6, -1e6, np.inf, -np.inf, 1e30, -1e30, *beyond], np.float32)
    got = quantize(x, q, np.dtype(dtype))
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, np.array([hi, lo, hi, lo, hi, lo, hi, lo], dtype))
    # Just inside the range is not clipped.
    edge = np.array([(hi - q.zero_point) * q.scale, (lo - q.zero_point) * q.scale], np.float32)
    np.testing.assert_array_equal(quantize(edge, q, np.dtype(dtype)), np.array([hi, lo], dtype))


def test_dequantize_is_affine_and_float32() -> None:
    q = Quantization(scale=0.25, zero_point=-10)
    raw = np.array([-128, -10, 0, 127], np.int8)
    got = dequantize(raw, q)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array([-29.5, 0.0, 2.5, 34.25], np.float32))
    u = dequantize(np.array([0, 128, 255], np.uint8), Quantization(0.5, 128))
    np.testing.assert_array_equal(u, np.array([-64.0, 0.0, 63.5], np.float32))


@pytest.mark.parametrize("model", QUANTIZED)
def test_every_quantized_value_roundtrips_with_the_models_own_parameters(zoo: Zoo, model: str) -> None:
    ins, outs = inspect_model(zoo.path(model))
    for spec in ins + outs:
        dtype = np.dtype(spec.dtype)
        info = np.iinfo(dtype)
        every = np.arange(info.min, info.max + 1).astype(dtype)
        np.testing.assert_array_equal(quantize(dequantize(every, spec.quantization), spec.quantization, dtype), every)
