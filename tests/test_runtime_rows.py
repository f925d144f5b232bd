"""``LoadedModel.run_rows``: batch scoring's loop gives exactly what ``run_native`` gives slice by slice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import RequestError
from edge_agent.inference.runtime import LoadedModel, RuntimeOptions
from edge_agent.wire.model.manifest import Manifest
from tests.support.env import MODELS


def _model(name: str, **options: int) -> LoadedModel:
    manifest = Manifest.load(MODELS / name / "1" / "manifest.json")
    opts = RuntimeOptions(num_threads=1, pool_size=1, **options)
    return LoadedModel(Path(MODELS / name / "1" / manifest.file), manifest, opts)


def _native(model: LoadedModel, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    return {
        s.name: model.prepare_input(s, rng.uniform(0, 8, (n, *s.shape[1:])).astype(np.float32))
        for s in model.manifest.inputs
    }


@pytest.mark.parametrize(("name", "n", "batch"), [("digits", 1000, 64), ("maintenance", 777, 256), ("digits", 1, 64)])
def test_rows_equal_the_slices_run_one_call_each(name: str, n: int, batch: int) -> None:
    model = _model(name, max_batch=batch, max_resident_batch=batch)
    native = _native(model, n)
    raw = frozenset(s.name for s in model.manifest.outputs)
    slices = [model.run_native({k: v[i : i + batch] for k, v in native.items()}, raw) for i in range(0, n, batch)]
    calls = model.calls
    got = model.run_rows(native, batch)
    assert model.calls - calls == len(slices)  # one invoke per slice, as before (a padded single row too)
    for out in model.manifest.outputs:
        want = np.concatenate([s[out.name] for s in slices])
        assert got[out.name].dtype == want.dtype and np.array_equal(got[out.name], want)


def test_a_batch_above_the_resident_bound_drops_the_interpreter_afterwards() -> None:
    model = _model("digits", max_batch=128, max_resident_batch=16)
    model.run_rows(_native(model, 256), 128)
    assert model._pool.get_nowait() is None, "the interpreter that grew to 128 rows is not kept"


def test_a_batch_over_the_models_limit_is_refused_before_any_invoke() -> None:
    model = _model("digits", max_batch=32, max_resident_batch=32)
    calls = model.calls
    with pytest.raises(RequestError, match="batch size 64 is over model 'digits'"):
        model.run_rows(_native(model, 100), 64)
    assert model.calls == calls
