"""The TFLite runtime layer against the real tflite-runtime, on the models of tests/modelzoo.py.

No mocks: every model is a real ``.tflite`` built by TensorFlow (in a subprocess), and every
expected output was computed by TensorFlow's own ``tf.lite.Interpreter`` at build time.
Quantized outputs may differ by one quantization step between TFLite builds.
Request errors and incompatible models are in ``test_runtime_errors.py``, quantization in
``test_runtime_quantize.py``.
"""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import RequestError
from edge_agent.inference.interpreter import Backend, default_backend
from edge_agent.inference.runtime import DelegateSpec, RuntimeOptions, dequantize, inspect_model, quantize
from tests.modelzoo import DYNAMIC_BATCH, FIXED_BATCH_SAMPLES, Zoo
from tests.support.runtime import QUANTIZED, assert_close, load

RUNNABLE = ("int8", "uint8", "float16", "float32", "multi_io", "fixed_batch")


def sliced(arrays: dict[str, np.ndarray], n: int, start: int = 0) -> dict[str, np.ndarray]:
    return {k: v[start : start + n] for k, v in arrays.items()}


# -- inspect_model ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", RUNNABLE)
def test_inspect_model_reports_what_tensorflow_built(zoo: Zoo, model: str) -> None:
    """Names, dtypes, shapes (with -1 for the dynamic batch) and quantization equal TF's view."""
    ins, outs = inspect_model(zoo.path(model))
    want = zoo.specs(model)
    for specs, side in ((ins, "inputs"), (outs, "outputs")):
        assert {s.name for s in specs} == set(want[side])
        for spec in specs:
            w = want[side][spec.name]
            assert spec.dtype == w["dtype"]
            assert spec.shape == tuple(w["shape"])
            assert spec.tensor == w["tensor"]
            if w["quantization"] is None:
                assert spec.quantization is None
            else:
                assert spec.quantization is not None
                assert spec.quantization.scale == pytest.approx(w["quantization"][0], rel=1e-6)
                assert spec.quantization.zero_point == w["quantization"][1]


def test_inspect_model_details_per_model(zoo: Zoo) -> None:
    """Spot checks that do not depend on TF: the dtypes, dynamic batch and quantization we asked for."""
    specs = {m: inspect_model(zoo.path(m)) for m in RUNNABLE}

    def one(model: str, side: int) -> Any:
        (spec,) = specs[model][side]
        return spec

    assert (one("int8", 0).dtype, one("int8", 1).dtype) == ("int8", "int8")
    assert (one("uint8", 0).dtype, one("uint8", 1).dtype) == ("uint8", "uint8")
    for m in ("int8", "uint8"):
        assert one(m, 0).name == "pixels" and one(m, 0).shape == (-1, 8, 8, 1)
        assert one(m, 1).name == "logits" and one(m, 1).shape == (-1, 3)
        assert one(m, 0).quantization is not None and one(m, 0).quantization.scale > 0
        assert one(m, 0).datatype == "FP32" and one(m, 0).native_datatype == m.upper()
    assert one("uint8", 0).quantization.zero_point != 0  # uint8 needs an offset for signed data
    for m in ("float16", "float32"):  # float16 *weights*: the I/O stays float32, unquantized
        assert one(m, 0).dtype == "float32" and one(m, 0).quantization is None
        assert one(m, 1).dtype == "float32" and one(m, 1).quantization is None
    ins, outs = specs["multi_io"]
    assert {s.name: s.shape for s in ins} == {"a": (-1, 4), "b": (-1, 3)}
    assert {s.name: s.shape for s in outs} == {"mix": (-1, 2), "gate": (-1, 1)}
    assert one("fixed_batch", 0).shape == (1, 6) and one("fixed_batch", 1).shape == (1, 2)


# -- correctness --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", RUNNABLE)
def test_predict_matches_tensorflow_interpreter(zoo: Zoo, model: str) -> None:
    m = load(zoo, model)
    got = m.predict(zoo.part(model, "in:"))
    assert_close(m, got, zoo.part(model, "out:"))


@pytest.mark.parametrize("model", QUANTIZED)
def test_quantized_models_fp32_in_fp32_out_and_raw_passthrough(zoo: Zoo, model: str) -> None:
    """FP32 in -> real FP32 out; raw INT8/UINT8 in gives the identical result; raw_outputs gives the integers."""
    m = load(zoo, model)
    real_in, raw_in = zoo.part(model, "in:"), zoo.part(model, "raw_in:")
    for name, arr in raw_in.items():
        spec = m.manifest.input(name)
        assert arr.dtype == np.dtype(spec.dtype) and spec.quantization is not None
        # The FP32 samples are exactly representable: quantizing them gives the raw samples back.
        np.testing.assert_array_equal(quantize(real_in[name], spec.quantization, arr.dtype), arr)

    from_real = m.predict(real_in)
    from_raw = m.predict(raw_in)
    assert set(from_real) == set(from_raw) == {s.name for s in m.manifest.outputs}
    for name in from_real:
        assert from_real[name].dtype == np.float32
        np.testing.assert_array_equal(from_real[name], from_raw[name])

    names = {s.name for s in m.manifest.outputs}
    raw = m.predict(real_in, raw_outputs=names)
    want_raw = zoo.part(model, "raw_out:")
    for spec in m.manifest.outputs:
        r = raw[spec.name]
        assert r.dtype == np.dtype(spec.dtype), spec.name
        assert int(np.max(np.abs(r.astype(np.int32) - want_raw[spec.name].astype(np.int32)))) <= 1
        np.testing.assert_array_equal(dequantize(r, spec.quantization), from_real[spec.name])


def test_raw_outputs_applies_per_output(zoo: Zoo) -> None:
    m = load(zoo, "multi_io")
    out = m.predict(zoo.part("multi_io", "in:"), raw_outputs={"gate"})
    assert out["gate"].dtype == np.int8 and out["mix"].dtype == np.float32


@pytest.mark.parametrize("model", ("float16", "float32"))
def test_float_models_accept_other_real_dtypes(zoo: Zoo, model: str) -> None:
    """FP64 (JSON numbers) and FP16 inputs are cast to the FP32 tensor; bools and complex are not."""
    m = load(zoo, model)
    x = zoo.part(model, "in:")["pixels"]
    ref = m.predict({"pixels": x})["logits"]
    np.testing.assert_array_equal(m.predict({"pixels": x.astype(np.float64)})["logits"], ref)
    half = x.astype(np.float16)
    np.testing.assert_array_equal(
        m.predict({"pixels": half})["logits"], m.predict({"pixels": half.astype(np.float32)})["logits"]
    )
    for bad in (x.astype(np.complex64), x > 0):
        with pytest.raises(RequestError, match="pixels"):
            m.predict({"pixels": bad})


def test_multi_io_addressed_by_name_in_any_order(zoo: Zoo) -> None:
    m = load(zoo, "multi_io")
    ins, want = zoo.part("multi_io", "in:"), zoo.part("multi_io", "out:")
    ab = m.predict({"a": ins["a"], "b": ins["b"]})
    ba = m.predict({"b": ins["b"], "a": ins["a"]})
    assert set(ab) == {"mix", "gate"}
    for k in ab:
        np.testing.assert_array_equal(ab[k], ba[k])
    assert_close(m, ba, want)
    # Bound by name, not by position: b's data under a's name is refused, not silently run.
    with pytest.raises(RequestError, match="shape"):
        m.predict({"a": ins["b"], "b": ins["a"]})
    with pytest.raises(RequestError, match="batch size"):
        m.predict({"a": ins["a"][:2], "b": ins["b"][:3]})


@pytest.mark.parametrize("model", ("int8", "float32", "multi_io"))
def test_batch_size_changes_resize_the_interpreter(zoo: Zoo, model: str) -> None:
    """One interpreter (pool_size=1) serves batches 1, 7, 3, 1 in turn, each correct."""
    m = load(zoo, model, RuntimeOptions(pool_size=1))
    ins, want = zoo.part(model, "in:"), zoo.part(model, "out:")
    for i, batch in enumerate((1, DYNAMIC_BATCH, 3, 1)):
        start = i % (DYNAMIC_BATCH - batch + 1)
        got = m.predict(sliced(ins, batch, start))
        for v in got.values():
            assert v.shape[0] == batch
        assert_close(m, got, sliced(want, batch, start))
    assert m._created == 1


def test_dynamic_batch_of_zero_returns_empty_outputs(zoo: Zoo) -> None:
    m = load(zoo, "int8")
    out = m.predict({"pixels": np.zeros((0, 8, 8, 1), np.float32)})
    assert out["logits"].shape == (0, 3)


def test_fixed_batch_model_loops_over_larger_batches(zoo: Zoo) -> None:
    m = load(zoo, "fixed_batch")
    ins, want = zoo.part("fixed_batch", "in:"), zoo.part("fixed_batch", "out:")
    assert ins["x"].shape[0] == FIXED_BATCH_SAMPLES == 4
    got = m.predict(ins)
    assert got["y"].shape == (4, 2)
    assert_close(m, got, want)
    assert_close(m, m.predict(sliced(ins, 1, 2)), sliced(want, 1, 2))
    raw = m.predict(zoo.part("fixed_batch", "raw_in:"), raw_outputs={"y"})
    assert raw["y"].dtype == np.int8 and raw["y"].shape == (4, 2)
    assert set(m.example_inputs(batch=3)["x"].shape) == {3, 6}
    with pytest.raises(RequestError, match="batch"):
        m.predict({"x": np.zeros((0, 6), np.float32)})


def test_num_threads_is_honoured(zoo: Zoo) -> None:
    """The option reaches every interpreter the pool creates, and results do not change with it."""
    seen: list[Any] = []
    real = default_backend()

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("num_threads"))
        return real.interpreter(*args, **kwargs)

    spying = Backend(real.name, spy, real.load_delegate)  # injected, not monkeypatched
    ins = zoo.part("int8", "in:")
    two = load(zoo, "int8", RuntimeOptions(num_threads=2, pool_size=2, backend=spying))
    assert two.info()["num_threads"] == 2
    one = load(zoo, "int8", RuntimeOptions(num_threads=1, backend=spying))
    a, b = two.predict(ins), one.predict(ins)
    np.testing.assert_array_equal(a["logits"], b["logits"])
    assert 2 in seen and 1 in seen


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # tflite's Delegate.__del__
def test_missing_delegate_falls_back_to_cpu(zoo: Zoo, caplog: pytest.LogCaptureFixture) -> None:
    options = RuntimeOptions(delegates=(DelegateSpec("libdoesnotexist.so.1", {"device": "usb"}),))
    with caplog.at_level(logging.WARNING, logger="edge_agent.inference"):
        m = load(zoo, "int8", options)
    assert m.delegate == "cpu"
    assert m.info()["delegate"] == "cpu"
    assert "libdoesnotexist.so.1" in caplog.text
    assert_close(m, m.predict(zoo.part("int8", "in:")), zoo.part("int8", "out:"))
    caplog.clear()  # the records hold the load error, whose traceback holds tflite's half-built Delegate
    gc.collect()  # ... whose __del__ complains: let that happen under this test's filter


def test_concurrent_predictions_on_a_pool_of_two(zoo: Zoo) -> None:
    """8 threads x 200 calls with varying batch sizes on 2 interpreters: every result is right."""
    m = load(zoo, "int8", RuntimeOptions(pool_size=2))
    ins = zoo.part("int8", "in:")["pixels"]
    cases = [(start, n) for n in range(1, DYNAMIC_BATCH + 1) for start in range(DYNAMIC_BATCH - n + 1)]
    reference = {c: m.predict({"pixels": ins[c[0] : c[0] + c[1]]})["logits"] for c in cases}
    errors: list[str] = []
    done = [0] * 8
    start_gate = threading.Barrier(8)

    def worker(tid: int) -> None:
        start_gate.wait()
        for i in range(200):
            c = cases[(tid * 31 + i * 7) % len(cases)]
            try:
                got = m.predict({"pixels": ins[c[0] : c[0] + c[1]]})["logits"]
            except Exception as exc:
                errors.append(f"thread {tid} call {i}: {exc!r}")
                return
            if not np.array_equal(got, reference[c]):
                errors.append(f"thread {tid} call {i} case {c}: wrong result")
                return
            done[tid] += 1

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "workers hung"
    assert errors == []
    assert done == [200] * 8
    assert m._created <= 2


def test_warmup_and_info(zoo: Zoo) -> None:
    m = load(zoo, "multi_io")
    assert m.warmup(runs=2) >= 0
    info = m.info()
    assert info["warm_latency_ms"] is not None
    assert info["backend"] == default_backend().name and info["delegate"] == "cpu"
