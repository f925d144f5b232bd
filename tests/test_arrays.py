"""``inference.arrays.concat``: the same arrays as numpy's stack/concatenate, and the same refusals."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.inference.arrays import concat


@pytest.mark.parametrize("dtype", ["float32", ">f4", "int8", "uint8", "int64", "bool"])
def test_stack_and_concatenate_match_numpy(dtype: str) -> None:
    rng = np.random.default_rng(3)
    parts = [(rng.random((2, 3, 4)) * 100).astype(dtype) for _ in range(5)]
    parts.append(np.asfortranarray(parts[0]))  # not C-contiguous: copied in C order all the same
    stacked = concat(parts, stack=True)
    assert stacked.dtype == np.dtype(dtype) and np.array_equal(stacked, np.stack(parts))
    joined = concat(parts)
    assert joined.shape == (12, 3, 4) and np.array_equal(joined, np.concatenate(parts))
    ragged = [parts[0], parts[1][:1]]  # rows may differ when concatenating
    assert np.array_equal(concat(ragged), np.concatenate(ragged))
    scalars = [np.float32(i) * np.ones((), np.float32) for i in range(4)]
    assert np.array_equal(concat(scalars, stack=True), np.arange(4, dtype=np.float32))


@pytest.mark.parametrize(
    "parts, stack",
    [
        ([np.zeros((1, 3), np.float32), np.zeros((1, 4), np.float32)], False),  # trailing shapes differ
        ([np.zeros((1, 3), np.float32), np.zeros((2, 3), np.float32)], True),  # stack needs one shape
        ([np.zeros((1, 3), np.float32), np.zeros((1, 3), np.float64)], False),  # dtypes differ
        ([np.array([object()], dtype=object)], True),  # objects are pointers, not values
        ([np.zeros((), np.float32)], False),  # a scalar has no axis to concatenate on
        ([np.zeros(3, np.float32), np.zeros((), np.float32)], False),  # ... wherever it is in the list
        ([], True),
    ],
)
def test_what_numpy_would_refuse_or_convert_is_refused(parts: list[np.ndarray], stack: bool) -> None:
    with pytest.raises(ValueError):
        concat(parts, stack=stack)
