"""The TFLite runtime layer refusing what it cannot run: bad requests, and incompatible or unreadable model files.

Against the real tflite-runtime on the models of tests/modelzoo.py: a bad request is a ``RequestError``
that leaves the model usable; a custom op, garbage or a missing file is an ``IncompatibleModelError``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import IncompatibleModelError, RequestError
from edge_agent.inference.runtime import LoadedModel, RuntimeOptions, inspect_model
from tests.modelzoo import CUSTOM_OP, Zoo
from tests.support.runtime import assert_close, load, manifest_for

# -- request errors -----------------------------------------------------------------------------


def test_unknown_and_missing_inputs_are_request_errors(zoo: Zoo) -> None:
    m = load(zoo, "multi_io")
    ins = zoo.part("multi_io", "in:")
    with pytest.raises(RequestError, match="unknown input 'c'"):
        m.predict({**ins, "c": ins["a"]})
    with pytest.raises(RequestError, match="missing input 'b'"):
        m.predict({"a": ins["a"]})
    with pytest.raises(RequestError, match="missing input"):
        m.predict({})


@pytest.mark.parametrize(
    "shape", [(2, 8, 8), (2, 8, 8, 2), (2, 4, 8, 1), (8, 8, 1), (2, 8, 8, 1, 1), ()], ids=lambda s: str(list(s))
)
def test_wrong_shape_is_a_request_error(zoo: Zoo, shape: tuple[int, ...]) -> None:
    m = load(zoo, "int8")
    with pytest.raises(RequestError, match="shape"):
        m.predict({"pixels": np.zeros(shape, np.float32)})


@pytest.mark.parametrize(
    "bad",
    [
        np.full((1, 8, 8, 1), "a"),
        np.full((1, 8, 8, 1), "x", dtype=object),
        np.zeros((1, 8, 8, 1), np.complex128),
        np.zeros((1, 8, 8, 1), np.bool_),
        np.zeros((1, 8, 8, 1), "datetime64[s]"),
    ],
    ids=["str", "object", "complex", "bool", "datetime"],
)
@pytest.mark.parametrize("model", ("int8", "float32"))
def test_wrong_dtype_is_a_request_error(zoo: Zoo, model: str, bad: np.ndarray) -> None:
    m = load(zoo, model)
    with pytest.raises(RequestError, match="datatype"):
        m.predict({"pixels": bad})


def test_request_errors_leave_the_model_usable(zoo: Zoo) -> None:
    m = load(zoo, "int8", RuntimeOptions(pool_size=1))
    for bad in (
        {"pixels": np.zeros((1, 3), np.float32)},
        {"nope": np.zeros(1)},
        {"pixels": np.zeros((1, 8, 8, 1), complex)},
    ):
        with pytest.raises(RequestError):
            m.predict(bad)
    assert_close(m, m.predict(zoo.part("int8", "in:")), zoo.part("int8", "out:"))


# -- incompatible models ----------------------------------------------------------------------


def test_custom_op_model_is_incompatible_and_names_the_op(zoo: Zoo) -> None:
    with pytest.raises(IncompatibleModelError, match=CUSTOM_OP) as info:
        inspect_model(zoo.path("custom_op"))
    assert "custom_op.tflite" in str(info.value)
    man = manifest_for(zoo.path("int8"))  # any manifest: loading fails before it is used
    with pytest.raises(IncompatibleModelError, match=CUSTOM_OP):
        LoadedModel(zoo.path("custom_op"), man)


@pytest.mark.parametrize("kind", ("random", "text", "empty", "truncated"))
def test_garbage_files_are_incompatible(zoo: Zoo, kind: str) -> None:
    path = zoo.garbage(kind)
    with pytest.raises(IncompatibleModelError, match=path.name):
        inspect_model(path)
    with pytest.raises(IncompatibleModelError):
        LoadedModel(path, manifest_for(zoo.path("int8")))


def test_missing_file_is_incompatible(tmp_path: Path) -> None:
    with pytest.raises(IncompatibleModelError):
        inspect_model(tmp_path / "nope.tflite")
