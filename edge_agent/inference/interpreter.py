"""Where TFLite interpreters come from: the backend seam, opening a model, and reading its tensors.

The agent never imports an interpreter class at module level. A :class:`Backend` names the
interpreter factory and delegate loader to use; :attr:`RuntimeOptions.backend` carries it to
every place that opens a model (the model server, validation, packaging, the benchmark), and
``None`` means :func:`default_backend`: the runtime ``EDGEFLEET_RUNTIME__BACKEND`` names, else
tflite-runtime, else ai-edge-litert. Tests plug a spy
or a fake in there instead of monkeypatching this module.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_agent.errors import ConfigError, IncompatibleModelError
from edge_agent.wire.model.manifest import Manifest, Quantization, TensorSpec

log = logging.getLogger(__name__)


class Interpreter(Protocol):
    """The part of ``tflite_runtime.interpreter.Interpreter`` the agent uses."""

    def allocate_tensors(self) -> None: ...
    def get_input_details(self) -> list[dict[str, Any]]: ...
    def get_output_details(self) -> list[dict[str, Any]]: ...
    def get_signature_list(self) -> dict[str, Any]: ...
    def get_signature_runner(self, signature_key: str | None = None) -> Any: ...
    def resize_tensor_input(self, input_index: int, tensor_size: Sequence[int], strict: bool = False) -> None: ...
    def set_tensor(self, tensor_index: int, value: np.ndarray) -> None: ...
    def invoke(self) -> None: ...
    def get_tensor(self, tensor_index: int) -> np.ndarray: ...


class InterpreterFactory(Protocol):
    """Builds an interpreter, like the ``Interpreter`` class of tflite-runtime / ai-edge-litert."""

    def __call__(
        self,
        *,
        model_path: str | None = None,
        model_content: bytes | None = None,
        num_threads: int | None,
        experimental_delegates: list[Any] | None = None,
    ) -> Interpreter: ...


class DelegateLoader(Protocol):
    """Loads a delegate library, like ``load_delegate`` of tflite-runtime / ai-edge-litert."""

    def __call__(self, library: str, options: dict[str, str]) -> Any: ...


@dataclass(frozen=True)
class Backend:
    """An interpreter factory and delegate loader, with the name ``info()`` and ``/agent/status`` report."""

    name: str
    interpreter: InterpreterFactory
    load_delegate: DelegateLoader


# The TFLite runtimes, in the order ``default_backend`` tries them, by the name ``info()`` reports.
RUNTIMES = {"tflite-runtime": "tflite_runtime.interpreter", "ai-edge-litert": "ai_edge_litert.interpreter"}
# Names one of RUNTIMES for every process of the agent and of ``cloud-batch`` (children inherit it); unset
# or "auto": the first one installed. It is the agent's ``[runtime] backend`` key, which ``edge-agent``
# exports here from its config. On Python 3.10/3.11 both can be installed (``edgefleet[litert]``):
# ai-edge-litert runs int8 graphs on XNNPACK, tflite-runtime 2.14 does not.
RUNTIME_ENV = "EDGEFLEET_RUNTIME__BACKEND"


def is_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def selected_runtime(
    environ: Mapping[str, str] = os.environ, installed: Callable[[str], bool] = is_installed
) -> tuple[str, str]:
    """The runtime ``default_backend`` loads, as (name, module), found without importing it.

    ``EDGEFLEET_RUNTIME__BACKEND`` names one of :data:`RUNTIMES`; unset or ``auto``, the first one
    installed. A ``ConfigError`` says why when the choice is unknown or not installed.
    """
    choice = environ.get(RUNTIME_ENV, "").strip() or "auto"
    if choice != "auto" and choice not in RUNTIMES:
        raise ConfigError(
            f"runtime.backend ({RUNTIME_ENV}) {choice!r} is not a TFLite runtime; "
            f"choose one of: auto, {', '.join(RUNTIMES)}"
        )
    for name in RUNTIMES if choice == "auto" else [choice]:
        if installed(RUNTIMES[name]):
            return name, RUNTIMES[name]
    if choice == "auto":
        raise ConfigError("no TFLite runtime installed: need tflite-runtime or ai-edge-litert")
    hint = " (pip install 'edgefleet[litert]')" if choice == "ai-edge-litert" else ""
    raise ConfigError(f"runtime.backend ({RUNTIME_ENV}) is {choice}, which is not installed here{hint}")


def runtime_label() -> str:
    """The selected runtime and its installed version, e.g. ``tflite-runtime 2.14.0`` (what its kernels are)."""
    name = selected_runtime()[0]
    try:
        return f"{name} {importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:  # a frozen build without the distribution's metadata
        return name


def runtime_preload() -> list[str]:
    """The selected runtime's module, for a forkserver to import once; none when the choice is invalid
    (the child that loads a model then says why)."""
    try:
        return [selected_runtime()[1]]
    except ConfigError:
        return []


@functools.cache
def default_backend() -> Backend:
    """The selected runtime (:func:`selected_runtime`), imported once, on first use."""
    name, module_name = selected_runtime()
    module = importlib.import_module(module_name)
    return Backend(name, module.Interpreter, module.load_delegate)


# What the runtimes' C++ code prints itself: TFLite's minimal logger ("INFO: ...", "ERROR: ...") and absl
# ("I0000 00:00:00.000000 ... file.cc:12] ..."). Nothing else is taken for the runtime's own.
_NATIVE_LINE = re.compile(r"(INFO|WARNING|ERROR|VERBOSE): |[IWEF]\d{4} \d\d:\d\d:\d\d")
_native_lock = threading.Lock()


@contextlib.contextmanager
def native_log_to_debug(source: str) -> Iterator[None]:
    """Send what the runtime's C++ code writes to fd 2 inside the block to this module's logger at DEBUG.

    ai-edge-litert prints ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`` on the first
    ``allocate_tensors()`` of a process (no env var or API turns it off), and both runtimes print
    ``ERROR: ...`` lines before raising the exception that already says what went wrong. Users see
    them only with ``--log-level debug``, prefixed with ``source`` (the backend's name). Anything
    else written to fd 2 meanwhile (another thread's log line) is written back to stderr afterwards.
    """
    with _native_lock, contextlib.ExitStack() as stack:
        try:
            sink = stack.enter_context(tempfile.TemporaryFile())
            saved = os.dup(2)
        except OSError:  # no writable temp dir or no fd 2: nothing to capture
            yield
            return
        with contextlib.suppress(Exception):  # sys.stderr may be None (no console)
            sys.stderr.flush()
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            others = []
            for line in sink.read().decode(errors="replace").splitlines(keepends=True):
                if _NATIVE_LINE.match(line):
                    log.debug("%s: %s", source, line.rstrip())
                else:
                    others.append(line)
            if others:
                with contextlib.suppress(OSError):
                    os.write(2, "".join(others).encode())


@dataclass(frozen=True)
class DelegateSpec:
    """A TFLite delegate to try, e.g. ``DelegateSpec("libedgetpu.so.1", {"device": "usb"})``."""

    library: str
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RuntimeOptions:
    """How interpreters are created: threads per interpreter, delegates, pool size, backend (None: installed)."""

    num_threads: int | None = None
    delegates: tuple[DelegateSpec, ...] = ()
    pool_size: int = 2
    backend: Backend | None = None
    max_batch: int = 64  # per call, for models whose manifest sets no max_batch
    max_resident_batch: int = 16  # an interpreter that ran a bigger batch is dropped (its arena never shrinks)


# A model file, or the model's bytes held in memory (a sealed model decrypted by ``models.sealed``).
ModelSource = str | Path | bytes


def open_interpreter(path: ModelSource, options: RuntimeOptions) -> tuple[Interpreter, str]:
    """Create and allocate an interpreter; return it with the name of the active delegate.

    ``path`` may be the model's bytes: they go to ``model_content`` and never touch the disk.
    A delegate that cannot be loaded, or that rejects the model, is logged and skipped:
    the model then runs on the CPU and ``"cpu"`` is reported.
    """
    src: dict[str, Any] = {"model_content": path} if isinstance(path, bytes) else {"model_path": str(path)}
    label = "the model (in memory)" if isinstance(path, bytes) else Path(path).name
    backend = options.backend or default_backend()
    for spec in options.delegates:
        try:
            delegate = backend.load_delegate(spec.library, dict(spec.options))
        except (ValueError, OSError, RuntimeError) as exc:
            log.warning("delegate %s unavailable, falling back: %s", spec.library, exc)
            continue
        try:
            with native_log_to_debug(backend.name):
                interp = backend.interpreter(**src, num_threads=options.num_threads, experimental_delegates=[delegate])
                interp.allocate_tensors()
            return interp, spec.library
        except (ValueError, RuntimeError) as exc:
            log.warning("delegate %s rejected the model, falling back: %s", spec.library, exc)
    try:
        with native_log_to_debug(backend.name):
            interp = backend.interpreter(**src, num_threads=options.num_threads)
            interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise IncompatibleModelError(f"cannot load {label} on this device's runtime ({backend.name}): {exc}") from exc
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


def inspect_model(path: ModelSource, backend: Backend | None = None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Derive input and output specs from the model file itself.

    Names come from the model's single serving signature when it has one (``pixels``,
    ``output_0``), otherwise from the tensor names with TF's decorations removed.
    """
    interp, _ = open_interpreter(path, RuntimeOptions(num_threads=1, backend=backend))
    sigs = interp.get_signature_list()
    if len(sigs) == 1:
        runner = interp.get_signature_runner(next(iter(sigs)))
        ins = [_spec_from_details(n, d) for n, d in runner.get_input_details().items()]
        outs = [_spec_from_details(n, d) for n, d in runner.get_output_details().items()]
    else:
        ins = [_spec_from_details(_clean_tensor_name(d["name"]), d) for d in interp.get_input_details()]
        outs = [_spec_from_details(_clean_tensor_name(d["name"]), d) for d in interp.get_output_details()]
    return ins, outs


def tensor_bindings(interp: Interpreter, manifest: Manifest) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Map the manifest's input and output names to the interpreter's tensor indices."""
    return _bind(interp.get_input_details(), manifest.inputs), _bind(interp.get_output_details(), manifest.outputs)


def _bind(details: list[dict[str, Any]], specs: Sequence[TensorSpec]) -> list[tuple[str, int]]:
    by_name = {d["name"]: d for d in details}
    return [(s.name, (by_name.get(s.tensor or s.name) or _by_clean_name(by_name, s.name))["index"]) for s in specs]


def _by_clean_name(details: Mapping[str, Mapping[str, Any]], name: str) -> Mapping[str, Any]:
    for tensor_name, d in details.items():
        if _clean_tensor_name(tensor_name) == name:
            return d
    raise IncompatibleModelError(f"the model has no tensor named {name!r} (tensors: {sorted(details)})")
