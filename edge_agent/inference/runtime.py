"""The TFLite runtime: load a model, bind named tensors, (de)quantize, and serve calls from a pool.

Interpreters are not thread-safe, so a ``LoadedModel`` owns a small pool of them and
each call borrows one. Quantized tensors are exposed in real values: inputs given as
floats are quantized on the way in and outputs are dequantized on the way out, while
arrays already in the raw INT8/UINT8 type pass straight through.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import IncompatibleModelError, RequestError
from edge_agent.wire.manifest import Manifest, Quantization, TensorSpec

log = logging.getLogger(__name__)


def _import_backend() -> tuple[str, Any, Callable[..., Any]]:
    """Return (backend name, Interpreter class, load_delegate) from whichever runtime is installed."""
    try:
        from tflite_runtime.interpreter import Interpreter, load_delegate  # type: ignore[import-not-found]

        return "tflite-runtime", Interpreter, load_delegate
    except ImportError:
        pass
    try:
        from ai_edge_litert.interpreter import Interpreter, load_delegate  # type: ignore[import-not-found]

        return "ai-edge-litert", Interpreter, load_delegate
    except ImportError as exc:  # pragma: no cover - packaging guarantees one of them
        raise IncompatibleModelError("no TFLite runtime installed: need tflite-runtime or ai-edge-litert") from exc


BACKEND, _Interpreter, _load_delegate = _import_backend()


@dataclass(frozen=True)
class DelegateSpec:
    """A TFLite delegate to try, e.g. ``DelegateSpec("libedgetpu.so.1", {"device": "usb"})``."""

    library: str
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RuntimeOptions:
    """How interpreters are created: threads per interpreter, delegates, pool size."""

    num_threads: int | None = None
    delegates: tuple[DelegateSpec, ...] = ()
    pool_size: int = 2


def open_interpreter(path: str | Path, options: RuntimeOptions) -> tuple[Any, str]:
    """Create and allocate an interpreter; return it with the name of the active delegate.

    A delegate that cannot be loaded, or that rejects the model, is logged and skipped:
    the model then runs on the CPU and ``"cpu"`` is reported.
    """
    path = str(path)
    for spec in options.delegates:
        try:
            delegate = _load_delegate(spec.library, dict(spec.options))
        except (ValueError, OSError, RuntimeError) as exc:
            log.warning("delegate %s unavailable, falling back: %s", spec.library, exc)
            continue
        try:
            interp = _Interpreter(model_path=path, num_threads=options.num_threads, experimental_delegates=[delegate])
            interp.allocate_tensors()
            return interp, spec.library
        except (ValueError, RuntimeError) as exc:
            log.warning("delegate %s rejected the model, falling back: %s", spec.library, exc)
    try:
        interp = _Interpreter(model_path=path, num_threads=options.num_threads)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise IncompatibleModelError(
            f"cannot load {Path(path).name} on this device's runtime ({BACKEND}): {exc}"
        ) from exc
    return interp, "cpu"


def _clean_tensor_name(name: str) -> str:
    if name.startswith("serving_default_"):
        name = name[len("serving_default_") :]
    return name.split(":", 1)[0]


def _spec_from_details(name: str, d: Mapping[str, Any]) -> TensorSpec:
    scale, zero_point = d["quantization"]
    quant = Quantization(float(scale), int(zero_point)) if scale and scale > 0 else None
    sig = d.get("shape_signature")
    shape = tuple(int(x) for x in (sig if sig is not None and len(sig) else d["shape"]))
    return TensorSpec(
        name=name,
        dtype=np.dtype(d["dtype"]).name,
        shape=shape,
        quantization=quant,
        tensor=d["name"] if d["name"] != name else None,
    )


def inspect_model(path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Derive input and output specs from the model file itself.

    Names come from the model's single serving signature when it has one (``pixels``,
    ``output_0``), otherwise from the tensor names with TF's decorations removed.
    """
    interp, _ = open_interpreter(path, RuntimeOptions(num_threads=1))
    sigs = interp.get_signature_list()
    if len(sigs) == 1:
        runner = interp.get_signature_runner(next(iter(sigs)))
        ins = [_spec_from_details(n, d) for n, d in runner.get_input_details().items()]
        outs = [_spec_from_details(n, d) for n, d in runner.get_output_details().items()]
    else:
        ins = [_spec_from_details(_clean_tensor_name(d["name"]), d) for d in interp.get_input_details()]
        outs = [_spec_from_details(_clean_tensor_name(d["name"]), d) for d in interp.get_output_details()]
    return ins, outs


def quantize(x: np.ndarray, q: Quantization, dtype: np.dtype[Any]) -> np.ndarray:
    """Real values to the quantized integer type, rounding and saturating."""
    info = np.iinfo(dtype)
    return np.clip(np.rint(x / q.scale + q.zero_point), info.min, info.max).astype(dtype)


def dequantize(x: np.ndarray, q: Quantization) -> np.ndarray:
    """Quantized integers to FP32 real values."""
    return ((x.astype(np.float32) - np.float32(q.zero_point)) * np.float32(q.scale)).astype(np.float32)


def _shape_matches(actual: tuple[int, ...], declared: tuple[int, ...], skip_batch: bool) -> bool:
    if len(actual) != len(declared):
        return False
    dims = zip(actual[1:], declared[1:]) if skip_batch else zip(actual, declared)
    return all(d == -1 or a == d for a, d in dims)


def tensor_bindings(interp: Any, manifest: Manifest) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Map the manifest's input and output names to the interpreter's tensor indices."""
    by_name = {d["name"]: d for d in interp.get_input_details()}
    out_by_name = {d["name"]: d for d in interp.get_output_details()}
    ins = [
        (s.name, (by_name.get(s.tensor or s.name) or _by_clean_name(by_name, s.name))["index"]) for s in manifest.inputs
    ]
    outs = [
        (s.name, (out_by_name.get(s.tensor or s.name) or _by_clean_name(out_by_name, s.name))["index"])
        for s in manifest.outputs
    ]
    return ins, outs


class _Session:
    """One interpreter with its tensor bindings; used by one thread at a time."""

    def __init__(self, interp: Any, manifest: Manifest) -> None:
        self.interp = interp
        self.inputs, self.outputs = tensor_bindings(interp, manifest)
        shapes = {d["index"]: tuple(int(x) for x in d["shape"]) for d in interp.get_input_details()}
        self.shapes: dict[int, tuple[int, ...]] = {idx: shapes[idx] for _, idx in self.inputs}
        self.broken = False  # allocate_tensors failed: tflite-runtime segfaults if this interpreter is reused

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
                interp.allocate_tensors()
            except Exception:
                self.broken = True
                raise
        for name, idx in self.inputs:
            interp.set_tensor(idx, feeds[name])
        interp.invoke()
        return {name: interp.get_tensor(idx) for name, idx in self.outputs}


def _by_clean_name(details: Mapping[str, Mapping[str, Any]], name: str) -> Mapping[str, Any]:
    for tensor_name, d in details.items():
        if _clean_tensor_name(tensor_name) == name:
            return d
    raise IncompatibleModelError(f"the model has no tensor named {name!r} (tensors: {sorted(details)})")


class LoadedModel:
    """A model version ready to serve: manifest, interpreter pool and (de)quantization.

    ``predict`` is thread-safe; up to ``pool_size`` calls run in parallel.
    """

    def __init__(self, path: str | Path, manifest: Manifest, options: RuntimeOptions | None = None) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.options = options or RuntimeOptions()
        self._pool: queue.SimpleQueue[_Session] = queue.SimpleQueue()
        self._created = 0
        self._lock = threading.Lock()
        first, self.delegate = open_interpreter(self.path, self.options)
        self._pool.put(_Session(first, manifest))
        self._created = 1
        self._in_specs = {s.name: s for s in manifest.inputs}
        self._dynamic_batch = all(s.shape and s.shape[0] == -1 for s in manifest.inputs)
        self._fixed_batch = {s.shape[0] for s in manifest.inputs if s.shape} if not self._dynamic_batch else set()
        self.warm_latency_s: float | None = None
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
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            grow = self._created < max(1, self.options.pool_size)
            if grow:
                self._created += 1
        if grow:
            try:
                interp, _ = open_interpreter(self.path, self.options)
                return _Session(interp, self.manifest)
            except BaseException:
                with self._lock:
                    self._created -= 1
                raise
        return self._pool.get()

    # -- conversion ---------------------------------------------------------
    def prepare_input(self, spec: TensorSpec, arr: np.ndarray) -> np.ndarray:
        """Check one input against its spec and convert it to the tensor's native type."""
        native = np.dtype(spec.dtype)
        if arr.dtype == native:
            out = arr
        elif spec.quantization is not None and arr.dtype.kind in "fiu" and arr.dtype.kind != "b":
            out = quantize(arr.astype(np.float32, copy=False), spec.quantization, native)
        elif native.kind == "f" and arr.dtype.kind in "fiu":
            out = arr.astype(native)
        else:
            raise RequestError(
                f"input {spec.name!r}: datatype {arr.dtype.name} not accepted, expected {spec.datatype}"
                + (f" or {spec.native_datatype}" if spec.quantization else "")
            )
        if not _shape_matches(tuple(out.shape), spec.shape, skip_batch=True):
            raise RequestError(f"input {spec.name!r}: shape {list(out.shape)} does not match {list(spec.shape)}")
        return np.ascontiguousarray(out)

    def predict(
        self, inputs: Mapping[str, np.ndarray], raw_outputs: frozenset[str] | set[str] = frozenset()
    ) -> dict[str, np.ndarray]:
        """Run one (possibly batched) call. Outputs are real-valued unless named in ``raw_outputs``."""
        specs = self._in_specs
        unknown = [n for n in inputs if n not in specs]
        if unknown:
            raise RequestError(f"unknown input {unknown[0]!r}; this model takes {sorted(specs)}")
        missing = [n for n in specs if n not in inputs]
        if missing:
            raise RequestError(f"missing input {missing[0]!r}")
        feeds = {n: self.prepare_input(specs[n], a) for n, a in inputs.items()}
        batches = {a.shape[0] if a.ndim else 1 for a in feeds.values()}
        if len(batches) != 1:
            raise RequestError(f"inputs disagree on the batch size: {sorted(batches)}")
        batch = batches.pop()
        if not self._dynamic_batch and batch not in self._fixed_batch:
            if self._fixed_batch == {1} and batch > 0:
                parts = [self._invoke({n: a[i : i + 1] for n, a in feeds.items()}) for i in range(batch)]
                raw = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                return self._finish(raw, raw_outputs)
            raise RequestError(f"batch size {batch} not supported; the model takes {sorted(self._fixed_batch)}")
        return self._finish(self._invoke(feeds), raw_outputs)

    def _invoke(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._acquire()
        self.calls += 1
        try:
            return session.run(feeds)
        except Exception:
            self.failures += 1  # the health window after an update watches this rate
            raise
        finally:
            if session.broken:  # drop it; _acquire opens a fresh interpreter in its place
                with self._lock:
                    self._created -= 1
            else:
                self._pool.put(session)

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
                shape = (batch,) + shape[1:]
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
        """Run a few calls on every pooled interpreter; record and return the median latency in seconds."""
        sample = self.example_inputs()
        times = []
        for _ in range(max(1, runs)):
            t0 = time.perf_counter()
            self.predict(sample)
            times.append(time.perf_counter() - t0)
        self.warm_latency_s = float(np.median(times))
        return self.warm_latency_s

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "backend": BACKEND,
            "delegate": self.delegate,
            "num_threads": self.options.num_threads,
            "pool_size": self.options.pool_size,
            "warm_latency_ms": None if self.warm_latency_s is None else round(self.warm_latency_s * 1e3, 4),
        }
