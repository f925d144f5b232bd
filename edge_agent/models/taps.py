"""What the request path shows the update machinery: recent latencies and outputs, and shadow copies.

``ModelTaps.observe`` is called once per answered infer request (``http.infer.InferPath``)
with the model version that answered, its inputs and outputs and its predict time. It keeps,
per model version, the most recent ``KEEP`` latencies and first outputs' classes or values
(``summarize``; deque appends, no I/O), which the health window compares with the previous version's
(``update.health.signals``), and offers the request to the model's shadow runner, if one is
running (``models.shadow``): after the response is sent, when the caller says how (``later``). The last ``KEEP_VERSIONS`` versions of each model are kept, so
the version an update replaced is still there to compare with.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edge_agent.inference.runtime import LoadedModel
    from edge_agent.models.shadow import ShadowRunner
    from edge_agent.wire.kserve_v2 import InferRequest

Later = Callable[..., object]  # schedules ``fn(*args)`` to run soon, e.g. ``loop.call_soon``

KEEP = 1024  # recent requests kept per model version
KEEP_VERSIONS = 3  # versions kept per model


def summarize(y: np.ndarray) -> tuple[np.ndarray, int]:
    """A request's first output as kept: the class per row of ``[N, C>1]`` scores, else the values; and C (or 1)."""
    if y.ndim >= 2 and y.shape[-1] > 1:
        return y.reshape(-1, y.shape[-1]).argmax(axis=-1), int(y.shape[-1])
    return y.reshape(-1), 1


class Recent:
    """The most recent latencies (seconds) and output summaries (``summarize``) of one model version."""

    def __init__(self, keep: int = KEEP) -> None:
        self.latencies: deque[float] = deque(maxlen=keep)
        self.outputs: deque[np.ndarray] = deque(maxlen=keep)  # classes or values per row: small, not the tensors
        self.width = 0  # classes of the first output (1: a value per row, e.g. a regression or one score)
        self.count = 0  # requests observed in all

    def snapshot(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """Copies of the latencies and outputs (safe against concurrent appends)."""
        while True:
            try:
                return np.asarray(list(self.latencies), dtype=np.float64), list(self.outputs)
            except RuntimeError:  # "deque mutated during iteration": a request came in; read again
                continue


class ModelTaps:
    """Per-version recent figures and the running shadow runners, fed by the request path."""

    def __init__(self, keep: int = KEEP) -> None:
        self.keep = keep
        self._recent: dict[tuple[str, str], Recent] = {}
        self._order: dict[str, deque[str]] = {}
        self._shadows: dict[str, ShadowRunner] = {}
        self._lock = threading.Lock()

    # -- the request path -------------------------------------------------------------
    def observe(
        self,
        model: LoadedModel,
        request: InferRequest,
        outputs: Mapping[str, np.ndarray],
        seconds: float,
        later: Later | None = None,
    ) -> None:
        """One answered request; one that asked for raw (quantized) outputs is not compared across versions.

        ``later``: runs the shadow copy after the response is on its way (the event loop's
        ``call_soon``), not before: sampling and copying cost ~8 µs on the request path (more at
        the tail, its code cold after every request). None: the copy is taken here.
        """
        raw = bool(request.raw_outputs)
        recent = self._recent.get((model.manifest.name, model.manifest.version))
        if recent is None:
            recent = self._add(model.manifest.name, model.manifest.version)
        recent.latencies.append(seconds)
        recent.count += 1
        if not raw and outputs:
            values, recent.width = summarize(np.asarray(next(iter(outputs.values()))))
            recent.outputs.append(values)
        shadow = self._shadows.get(model.manifest.name)
        if shadow is not None and not raw:
            if later is None:
                shadow.offer(model.manifest.version, request.inputs, outputs, seconds)
            else:
                later(shadow.offer, model.manifest.version, request.inputs, outputs, seconds)

    def _add(self, name: str, version: str) -> Recent:
        with self._lock:
            recent = self._recent.get((name, version))
            if recent is None:
                recent = self._recent[(name, version)] = Recent(self.keep)
                order = self._order.setdefault(name, deque())
                order.append(version)
                while len(order) > KEEP_VERSIONS:
                    self._recent.pop((name, order.popleft()), None)
            return recent

    # -- readers ------------------------------------------------------------------------
    def recent(self, name: str, version: str) -> Recent | None:
        """The recent figures of a model version (None: nothing observed since this process started)."""
        return self._recent.get((name, version))

    def start_shadow(self, name: str, runner: ShadowRunner) -> None:
        """Copy sampled requests of ``name`` to ``runner`` from now on (replaces a previous runner)."""
        with self._lock:
            old = self._shadows.get(name)
            self._shadows[name] = runner
        if old is not None and old is not runner:
            old.stop()

    def stop_shadow(self, name: str, runner: ShadowRunner) -> None:
        """Stop copying requests to ``runner`` (if it is still the one running) and stop it."""
        with self._lock:
            if self._shadows.get(name) is runner:
                del self._shadows[name]
        runner.stop()

    def shadows(self) -> dict[str, ShadowRunner]:
        """The shadow runners running now, by model name (``/metrics``, ``/agent/status``)."""
        return dict(self._shadows)
