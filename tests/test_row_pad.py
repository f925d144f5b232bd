"""One row run as two (``LoadedModel.row_pad``): same outputs, and decided by measuring, never assumed.

The equality tests run the real tflite runtime on the shipped models and on the zoo's. The probe's
decision is a logic test: its backend is the installed runtime wrapped so that one row costs 5 ms
more (a stand-in for the int8 matrix-vector cliff of some CPUs) and, in one test, so that a row's
outputs depend on the other rows (a model that mixes rows). The probe's speed gate
(``PAD_PROBE_MAX_S``) is lifted in those tests so that a loaded CI host, where the slept row can take
longer than the gate, cannot skip the probe; two rows (~0.1 ms) against one (≥ 5 ms) keeps the
ratio far from ``PAD_GAIN``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.inference import runtime
from edge_agent.inference.interpreter import Backend, default_backend
from edge_agent.inference.runtime import LoadedModel, RuntimeOptions, choose_row_pad
from edge_agent.wire.model.manifest import MANIFEST_FILE, Manifest
from tests.modelzoo import Zoo
from tests.support.runtime import load

MODELS = Path(__file__).resolve().parents[1] / "models"
ONE_ROW_EXTRA_S = 0.005


def shipped(name: str, options: RuntimeOptions | None = None) -> LoadedModel:
    d = MODELS / name / "1"
    return LoadedModel(d / "model.tflite", Manifest.load(d / MANIFEST_FILE), options)


def spying_backend(
    one_row_extra_s: float = 0.0, mix_rows: bool = False, fail_at: int | None = None
) -> tuple[Backend, list[int]]:
    """The installed runtime, recording the batch of every ``invoke``; optionally slower at one row,
    adding each output's batch mean to every row (so a row's outputs depend on the others), or
    failing at ``fail_at`` rows."""
    real = default_backend()
    batches: list[int] = []

    class Spy:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._interp = real.interpreter(*args, **kwargs)

        def invoke(self) -> None:
            batch = int(self._interp.get_input_details()[0]["shape"][0])
            batches.append(batch)
            if batch == fail_at:
                raise RuntimeError(f"this model fails at {batch} rows")
            if batch == 1 and one_row_extra_s:
                time.sleep(one_row_extra_s)
            self._interp.invoke()

        def get_tensor(self, index: int) -> np.ndarray:
            out = self._interp.get_tensor(index)
            if not mix_rows or out.ndim == 0:
                return out
            return (out + out.mean(axis=0, keepdims=True).astype(out.dtype)).astype(out.dtype)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._interp, name)

    return Backend(real.name, Spy, real.load_delegate), batches


@pytest.fixture
def probe_any_speed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe however slow one row is, so the probe always runs under the slept cliff."""
    monkeypatch.setattr(runtime, "PAD_PROBE_MAX_S", float("inf"))


def test_choose_row_pad_takes_two_rows_only_when_clearly_cheaper() -> None:
    assert choose_row_pad([100e-6] * 5, [40e-6] * 5) == 2
    assert choose_row_pad([100e-6] * 5, [75e-6] * 5) == 2  # at the margin (PAD_GAIN)
    assert choose_row_pad([100e-6] * 5, [80e-6] * 5) == 1
    assert choose_row_pad([10e-6] * 5, [18e-6] * 5) == 1  # the usual case: two rows cost more
    assert choose_row_pad([100e-6, 100e-6, 1.0], [40e-6, 40e-6, 40e-6]) == 2  # medians: one stall does not decide
    assert choose_row_pad([], [40e-6]) == 1


@pytest.mark.parametrize("name", ["digits", "maintenance"])
def test_a_padded_row_answers_bit_identically_on_the_shipped_models(name: str) -> None:
    backend, batches = spying_backend()
    padded, plain = shipped(name, RuntimeOptions(backend=backend)), shipped(name)
    padded.row_pad = 2
    for seed in range(20):
        x = plain.example_inputs(1, seed=seed)
        got, want = padded.predict(x), plain.predict(x)
        assert set(got) == set(want)
        for k in want:
            assert got[k].shape == want[k].shape and got[k].shape[0] == 1
            assert np.array_equal(got[k], want[k]), (name, seed, k)
    assert batches and set(batches) == {2}  # every call ran as two rows
    x4 = plain.example_inputs(4, seed=99)  # a real batch is run as it is
    got4, want4 = padded.predict(x4), plain.predict(x4)
    assert all(np.array_equal(got4[k], want4[k]) for k in want4)
    assert batches[-1] == 4


@pytest.mark.parametrize("model", ["int8", "uint8", "float32", "multi_io"])
def test_a_padded_row_answers_bit_identically_on_the_zoo(zoo: Zoo, model: str) -> None:
    padded, plain = load(zoo, model), load(zoo, model)
    padded.row_pad = 2
    raw = frozenset(s.name for s in plain.manifest.outputs)  # the quantized outputs as they are, too
    for seed in range(5):
        x = plain.example_inputs(1, seed=seed)
        for outputs in (frozenset(), raw):
            got, want = padded.predict(x, outputs), plain.predict(x, outputs)
            assert all(np.array_equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)


@pytest.mark.usefixtures("probe_any_speed")
def test_warmup_pads_when_one_row_is_measured_slower() -> None:
    backend, batches = spying_backend(one_row_extra_s=ONE_ROW_EXTRA_S)
    model = shipped("digits", RuntimeOptions(backend=backend))
    warm = model.warmup(5)
    assert model.row_pad == 2 and model.info()["row_pad"] == 2
    assert warm < ONE_ROW_EXTRA_S  # the recorded latency is the padded call's
    batches.clear()
    model.predict(model.example_inputs(1, seed=3))
    assert batches == [2]


@pytest.mark.usefixtures("probe_any_speed")
def test_warmup_never_pads_a_model_whose_rows_mix() -> None:
    backend, _ = spying_backend(one_row_extra_s=ONE_ROW_EXTRA_S, mix_rows=True)
    model = shipped("digits", RuntimeOptions(backend=backend))
    model.warmup(5)
    assert model.row_pad == 1


@pytest.mark.usefixtures("probe_any_speed")
def test_warmup_keeps_one_row_when_two_cannot_stay_resident() -> None:
    backend, _ = spying_backend(one_row_extra_s=ONE_ROW_EXTRA_S)
    model = shipped("digits", RuntimeOptions(backend=backend, max_resident_batch=1))
    model.warmup(5)
    assert model.row_pad == 1  # two rows would drop the interpreter after every call


@pytest.mark.usefixtures("probe_any_speed")
def test_warmup_keeps_one_row_for_a_model_failing_at_two_and_counts_no_failure() -> None:
    backend, _ = spying_backend(one_row_extra_s=ONE_ROW_EXTRA_S, fail_at=2)
    model = shipped("digits", RuntimeOptions(backend=backend))
    model.warmup(5)  # the probe's failure is not the version's: no raise, nothing for the health window
    assert model.row_pad == 1 and model.failures == 0
    assert model.predict(model.example_inputs(1))["probs"].shape == (1, 10)
