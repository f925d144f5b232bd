"""The TFLite runtime: load a model, bind named tensors, (de)quantize, and serve calls from a pool.

Interpreters are not thread-safe, so a ``LoadedModel`` owns a small pool of them and
each call borrows one. Quantized tensors are exposed in real values: inputs given as
floats are quantized on the way in and outputs are dequantized on the way out, while
arrays already in the raw INT8/UINT8 type pass straight through.

**Bounded memory.** A call may carry at most ``max_batch`` rows (the manifest's, else
``RuntimeOptions.max_batch``). TFLite never shrinks a tensor arena once a big batch grew it (not
even when resized back), so an interpreter that ran a batch above ``max_resident_batch`` is
dropped after the call and a fresh one is opened on demand: memory returns to its baseline.

**One row as two.** Some runtimes have a cliff at one row: tflite-runtime 2.14's int8
``FULLY_CONNECTED`` takes a matrix-vector path at batch 1 that is ~8x slower than its matrix path on
an AVX2-only x86 host (digits there: 169 µs for one row, 64 µs for two; none on an AVX-512 host). ``warmup`` measures
both on this device and, when two rows cost at most ``PAD_GAIN`` of one and the padded row's
outputs are bit-identical to the unpadded ones, runs every one-row call as that row twice
(``row_pad``). Measured, never assumed: a runtime or CPU without the cliff keeps one row.

Where interpreters come from (the injectable backend) lives in ``interpreter.py``. A call is
checked once: ``predict`` checks plain arrays itself; the API's decoded requests were checked
by ``kserve_v2.check_request`` and go through ``predict_checked``.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import RequestError
from edge_agent.inference.interpreter import (
    Backend,
    DelegateSpec,
    Interpreter,
    ModelSource,
    RuntimeOptions,
    default_backend,
    inspect_model,
    native_log_to_debug,
    open_interpreter,
    tensor_bindings,
)
from edge_agent.inference.quant import dequantize, quantize, to_native
from edge_agent.wire.model.manifest import Manifest, TensorSpec

# Re-exported: callers that load models import the options from here, next to LoadedModel.
__all__ = [
    "Backend",
    "DelegateSpec",
    "LoadedModel",
    "ModelSource",
    "RuntimeOptions",
    "call_times",
    "default_backend",
    "dequantize",
    "inspect_model",
    "open_interpreter",
    "quantize",
]


PAD_GAIN = 0.75  # one row runs as two when two rows cost at most this share of one (the cliff is ~3x)
PAD_PROBE_MAX_S = 0.002  # ... probed only for models this fast at one row (the cliff is ~0.1 ms per layer)


def choose_row_pad(one_s: list[float], two_s: list[float]) -> int:
    """Rows a one-row call runs as (1 or 2), from timed invocations at one and at two rows."""
    if not one_s or not two_s:
        return 1
    return 2 if float(np.median(two_s)) <= PAD_GAIN * float(np.median(one_s)) else 1


def _shape_matches(actual: tuple[int, ...], declared: tuple[int, ...], skip_batch: bool) -> bool:
    if len(actual) != len(declared):
        return False
    dims = zip(actual[1:], declared[1:], strict=True) if skip_batch else zip(actual, declared, strict=True)
    return all(d == -1 or a == d for a, d in dims)


class _Session:
    """One interpreter with its tensor bindings; used by one thread at a time."""

    def __init__(self, interp: Interpreter, manifest: Manifest) -> None:
        self.interp = interp
        self.inputs, self.outputs = tensor_bindings(interp, manifest)
        shapes = {d["index"]: tuple(int(x) for x in d["shape"]) for d in interp.get_input_details()}
        self.shapes: dict[int, tuple[int, ...]] = {idx: shapes[idx] for _, idx in self.inputs}
        self.broken = False  # allocate_tensors failed (tflite-runtime segfaults on reuse), or it grew too big

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        interp = self.interp
        resized = False
        for name, idx in self.inputs:
            shape = feeds[name].shape
            if self.shapes[idx] != shape:
                interp.resize_tensor_input(idx, list(shape), strict=False)
                self.shapes[idx] = shape
                resized = True
        if resized:
            try:
                with native_log_to_debug("allocate after resize"):  # on a new batch size only, not every call
                    interp.allocate_tensors()
            except Exception:
                self.broken = True
                raise
        for name, idx in self.inputs:
            interp.set_tensor(idx, feeds[name])
        interp.invoke()
        return {name: interp.get_tensor(idx) for name, idx in self.outputs}


class LoadedModel:
    """A model version ready to serve: manifest, interpreter pool and (de)quantization.

    ``predict`` is thread-safe; up to ``pool_size`` calls run in parallel. ``source`` is the model
    file, or its bytes (a sealed model decrypted into memory): every pooled interpreter then reads
    that one buffer (``model_content``), and nothing is written to disk.
    """

    def __init__(self, source: ModelSource, manifest: Manifest, options: RuntimeOptions | None = None) -> None:
        self.source: Path | bytes = source if isinstance(source, bytes) else Path(source)
        self.manifest = manifest
        self.options = options or RuntimeOptions()
        self.backend = self.options.backend or default_backend()
        self._pool: queue.SimpleQueue[_Session | None] = queue.SimpleQueue()
        self._created = 0
        self._lock = threading.Lock()
        first, self.delegate = open_interpreter(self.source, self.options)
        self._pool.put(_Session(first, manifest))
        self._created = 1
        self._in_specs = {s.name: s for s in manifest.inputs}
        self._natives = {s.name: np.dtype(s.dtype) for s in manifest.inputs}
        self._dynamic_batch = all(s.shape and s.shape[0] == -1 for s in manifest.inputs)
        self._fixed_batch = {s.shape[0] for s in manifest.inputs if s.shape} if not self._dynamic_batch else set()
        self.max_batch = manifest.max_batch or self.options.max_batch
        self.warm_latency_s: float | None = None
        self.row_pad = 1  # a one-row call runs as this many copies of its row (``warmup`` decides)
        self.calls = 0  # interpreter invocations (client mistakes rejected before invoke don't count)
        self.failures = 0  # invocations that raised

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    # -- pool ---------------------------------------------------------------
    def _acquire(self) -> _Session:
        """A pooled session; the pool holds sessions and ``None``: a slot whose interpreter was dropped.

        ``_created`` counts slots (up to ``pool_size``), not interpreters: a dropped interpreter
        leaves its slot in the pool as ``None``, so a caller already blocked in ``get`` wakes up
        and opens a fresh one (a bare count would leave it waiting for ever).
        """
        try:
            session = self._pool.get_nowait()
        except queue.Empty:
            with self._lock:
                grow = self._created < max(1, self.options.pool_size)
                if grow:
                    self._created += 1
            session = None if grow else self._pool.get()
        if session is not None:
            return session
        try:
            interp, _ = open_interpreter(self.source, self.options)
            return _Session(interp, self.manifest)
        except BaseException:
            self._pool.put(None)  # the slot stays free: the next caller tries again
            raise

    def check_batch(self, batch: int) -> None:
        """RequestError when one call would carry more than ``max_batch`` rows (before any work is done)."""
        if batch > self.max_batch:
            raise RequestError(f"batch size {batch} is over model {self.name!r}'s limit of {self.max_batch}")

    # -- conversion ---------------------------------------------------------
    def prepare_input(self, spec: TensorSpec, arr: np.ndarray) -> np.ndarray:
        """Check one input against its spec and convert it to the tensor's native type."""
        native = np.dtype(spec.dtype)
        kind = arr.dtype.kind
        if arr.dtype != native and not (kind in "fiu" and (spec.quantization is not None or native.kind == "f")):
            raise RequestError(
                f"input {spec.name!r}: datatype {arr.dtype.name} not accepted, expected {spec.datatype}"
                + (f" or {spec.native_datatype}" if spec.quantization else "")
            )
        if not _shape_matches(tuple(arr.shape), spec.shape, skip_batch=True):
            raise RequestError(f"input {spec.name!r}: shape {list(arr.shape)} does not match {list(spec.shape)}")
        return to_native(spec, arr, native)

    def predict(
        self, inputs: Mapping[str, np.ndarray], raw_outputs: frozenset[str] | set[str] = frozenset()
    ) -> dict[str, np.ndarray]:
        """Check and run one (possibly batched) call. Outputs are real-valued unless named in ``raw_outputs``.

        For in-process callers holding plain arrays: any numeric type is accepted where the
        tensor can take it. A decoded V2 request was already checked, strictly, by
        ``kserve_v2.check_request``: run it with :meth:`predict_checked`.
        """
        specs = self._in_specs
        unknown = [n for n in inputs if n not in specs]
        if unknown:
            raise RequestError(f"unknown input {unknown[0]!r}; this model takes {sorted(specs)}")
        missing = [n for n in specs if n not in inputs]
        if missing:
            raise RequestError(f"missing input {missing[0]!r}")
        return self._run({n: self.prepare_input(specs[n], a) for n, a in inputs.items()}, raw_outputs)

    def predict_checked(
        self, inputs: Mapping[str, np.ndarray], raw_outputs: frozenset[str] | set[str] = frozenset()
    ) -> dict[str, np.ndarray]:
        """:meth:`predict` for inputs already checked against this model's manifest (names, types, shapes).

        The HTTP hot path: the codec checked the request once, so only the conversion to the
        tensors' native types (quantizing real values) and the batch rules are left.
        """
        return self._run(self.to_native(inputs), raw_outputs)

    # -- the dynamic batcher's steps (inference/batching.py): convert, run stacked, finish per request --
    @property
    def batchable(self) -> bool:
        """Every input has a dynamic batch dimension: requests can be stacked into one invoke."""
        return self._dynamic_batch

    def to_native(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Checked inputs converted to the tensors' native types (real values quantized)."""
        specs, natives = self._in_specs, self._natives
        return {n: to_native(specs[n], a, natives[n]) for n, a in inputs.items()}

    def run_native(self, feeds: dict[str, np.ndarray], raw_outputs: frozenset[str] | set[str]) -> dict[str, np.ndarray]:
        """Native inputs through the batch rules and one invoke."""
        return self._run(feeds, raw_outputs)

    def finish(self, raw: dict[str, np.ndarray], raw_outputs: frozenset[str] | set[str]) -> dict[str, np.ndarray]:
        """Dequantize the outputs not named in ``raw_outputs`` (in place; returns ``raw``)."""
        return self._finish(raw, raw_outputs)

    def _run(self, feeds: dict[str, np.ndarray], raw_outputs: frozenset[str] | set[str]) -> dict[str, np.ndarray]:
        """The batch rules, then invoke: a fixed-batch-1 model loops over a larger batch."""
        batches = {a.shape[0] if a.ndim else 1 for a in feeds.values()}
        if len(batches) != 1:
            raise RequestError(f"inputs disagree on the batch size: {sorted(batches)}")
        batch = batches.pop()
        self.check_batch(batch)
        if not self._dynamic_batch and batch not in self._fixed_batch:
            if self._fixed_batch == {1} and batch > 0:
                parts = [self._invoke({n: a[i : i + 1] for n, a in feeds.items()}) for i in range(batch)]
                raw = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                return self._finish(raw, raw_outputs)
            raise RequestError(f"batch size {batch} not supported; the model takes {sorted(self._fixed_batch)}")
        if batch == 1 and self.row_pad > 1:
            raw = self._invoke({n: np.concatenate([a] * self.row_pad) for n, a in feeds.items()}, self.row_pad)
            return self._finish({k: v[:1] for k, v in raw.items()}, raw_outputs)
        return self._finish(self._invoke(feeds, batch), raw_outputs)

    @contextlib.contextmanager
    def _held(self, batch: int, counted: bool = True) -> Iterator[_Session]:
        """A pooled interpreter for calls of ``batch`` rows, back in the pool afterwards; ``counted``: a failure
        counts in ``failures`` (not the warm-up's probe)."""
        session = self._acquire()
        try:
            yield session
            if batch > self.options.max_resident_batch:
                session.broken = True  # free its grown arena now rather than hold it for ever
        except Exception:
            self.failures += counted  # the health window after an update watches this rate
            raise
        finally:
            self._pool.put(None if session.broken else session)  # broken: dropped, _acquire opens a fresh one

    def _invoke(self, feeds: Mapping[str, np.ndarray], batch: int = 1, counted: bool = True) -> dict[str, np.ndarray]:
        """One invoke on a pooled interpreter; ``counted``: in ``calls`` and ``failures`` (not the warm-up's probe)."""
        with self._held(batch, counted) as session:
            self.calls += counted
            return session.run(feeds)

    def run_rows(self, feeds: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        """Native rows through the model ``batch`` rows at a time; the raw outputs of all, joined (batch scoring).

        The same invokes as ``run_native`` per slice, but the whole batches run on one interpreter held
        for the loop, not taken from the pool per call (~2-3% of a 1 µs-a-row model's time); the rest
        (a last short batch, a fixed-batch model) goes through ``run_native``'s rules.
        """
        n = len(next(iter(feeds.values())))
        whole = n - n % batch if self._dynamic_batch and batch > 1 else 0
        parts: list[dict[str, np.ndarray]] = []
        if whole:
            self.check_batch(batch)
            with self._held(batch) as session:
                for i in range(0, whole, batch):
                    self.calls += 1
                    parts.append(session.run({k: v[i : i + batch] for k, v in feeds.items()}))
        raw = frozenset(s.name for s in self.manifest.outputs)
        parts += [self._run({k: v[i : i + batch] for k, v in feeds.items()}, raw) for i in range(whole, n, batch)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _finish(self, raw: dict[str, np.ndarray], raw_outputs: frozenset[str] | set[str]) -> dict[str, np.ndarray]:
        for spec in self.manifest.outputs:
            if spec.quantization is not None and spec.name not in raw_outputs:
                raw[spec.name] = dequantize(raw[spec.name], spec.quantization)
        return raw

    def example_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs that fit the spec (quantized inputs get exactly representable values)."""
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {}
        for spec in self.manifest.inputs:
            shape = tuple(batch if i == 0 and d == -1 else (d if d > 0 else 1) for i, d in enumerate(spec.shape))
            if not self._dynamic_batch and shape:
                shape = (batch, *shape[1:])
            native = np.dtype(spec.dtype)
            if spec.quantization is not None:
                info = np.iinfo(native)
                q = rng.integers(info.min, info.max + 1, size=shape).astype(native)
                out[spec.name] = dequantize(q, spec.quantization)
            elif native.kind == "f":
                out[spec.name] = rng.standard_normal(shape).astype(native)
            elif native.kind in "iu":
                out[spec.name] = rng.integers(0, 2, size=shape).astype(native)
            else:
                out[spec.name] = np.zeros(shape, native)
        return out

    def warmup(self, runs: int = 5) -> float:
        """Run a few one-row calls and decide ``row_pad``; record and return the median one-row latency in seconds."""
        sample = self.example_inputs()

        def one_row_s() -> float:
            return float(np.median(call_times(lambda: self.predict(sample), runs)))

        self.warm_latency_s = one_row_s()
        paddable = self._dynamic_batch and min(self.max_batch, self.options.max_resident_batch) >= 2
        if paddable and self.warm_latency_s <= PAD_PROBE_MAX_S:
            self.row_pad = self._probe_row_pad(max(3, runs))
            if self.row_pad > 1:
                self.warm_latency_s = one_row_s()
        return self.warm_latency_s

    def _probe_row_pad(self, runs: int) -> int:
        """``choose_row_pad`` over ``runs`` invocations at one row, then at two; 1 as soon as two rows fail
        or a row's outputs depend on the other row's values (a model that mixes rows is never padded)."""
        one = self.to_native(self.example_inputs(1, seed=0))
        alone = self._invoke(one, counted=False)
        one_s, two_s = call_times(lambda: self._invoke(one, counted=False), runs), []
        for i in range(runs + 1):  # the first call resizes the interpreter: not timed
            other = self.to_native(self.example_inputs(1, seed=i + 1))
            pair = {n: np.concatenate([a, other[n]]) for n, a in one.items()}
            t0 = time.perf_counter()
            try:
                out = self._invoke(pair, 2, counted=False)
            except Exception:  # a model that declares a batch dimension yet fails at two rows
                return 1
            if i:
                two_s.append(time.perf_counter() - t0)
            if any(not np.array_equal(v[:1], alone[k]) for k, v in out.items()):
                return 1
        return choose_row_pad(one_s, two_s)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "backend": self.backend.name,
            "delegate": self.delegate,
            "num_threads": self.options.num_threads,
            "pool_size": self.options.pool_size,
            "warm_latency_ms": None if self.warm_latency_s is None else round(self.warm_latency_s * 1e3, 4),
            "row_pad": self.row_pad,
        }


def call_times(call: Callable[[], object], runs: int) -> list[float]:
    """Seconds of each of ``runs`` calls of ``call`` (at least one)."""
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times
