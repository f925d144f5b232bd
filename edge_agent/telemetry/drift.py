"""Drift on the device: PSI of each input feature and of the output classes against the training reference.

A model version whose manifest carries a ``reference`` (``wire/model/reference.py``) gets a window per
version: the input columns and output classes of its requests are collected until the window
holds ``window`` requests (default 1,000) or ``window_s`` seconds passed (default 1 h), then
binned with the reference's own edges (``reference.bin_counts``, the rule the trainer used) and
compared. Windows are tumbling: each result covers one window, and the next starts empty.

    PSI = sum over bins (a - e) * ln(a / e)      a, e: window and reference shares, floored at 1e-4

The usual reading: below ``watch`` (0.1) stable, up to ``alert`` (0.25) worth watching, above it
the inputs moved. Collection runs on the telemetry writer thread, never on the request path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.wire.model.reference import bin_counts, columns, output_classes

# The defaults of ``[drift]``: ``config.telemetry.DriftConfig`` takes them from here (config sits
# above telemetry in the layers, so the values live with the code that uses them).
WINDOW = 1000  # requests per window ...
WINDOW_S = 3600.0  # ... or this many seconds, whichever comes first
WATCH = 0.1  # PSI above this: watch
ALERT = 0.25  # PSI above this: alert

EPS = 1e-4
OUTPUT_PREFIX = "output:"  # the feature label of an output's class distribution


def psi(actual: np.ndarray, expected: np.ndarray) -> float:
    """Population stability index of two distributions over the same bins (counts or shares)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    a = np.maximum(a / a.sum() if a.sum() else a, EPS)
    e = np.maximum(e / e.sum() if e.sum() else e, EPS)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass(frozen=True)
class DriftResult:
    """One window's PSI for one model version."""

    model: str
    version: str
    window: int  # requests in the window
    psi: dict[str, float]  # input feature -> PSI
    output_psi: float | None
    level: str  # "ok" | "watch" | "alert"
    ts: float = field(default_factory=time.time)

    def body(self) -> dict[str, Any]:
        """The ``drift`` telemetry record's body."""
        return {
            "model": self.model,
            "version": self.version,
            "window": self.window,
            "psi": self.psi,
            "output_psi": self.output_psi,
            "level": self.level,
        }

    def worst(self, n: int) -> dict[str, float]:
        """The ``n`` highest PSIs (inputs and the output), for DeviceState."""
        items = list(self.psi.items())
        if self.output_psi is not None:
            items.append(("output", self.output_psi))
        return dict(sorted(items, key=lambda kv: -kv[1])[:n])


@dataclass
class _Window:
    version: str
    reference: dict[str, Any]
    started: float
    n: int = 0
    inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)


class DriftMonitor:
    """Per model version windows; :meth:`observe` returns a :class:`DriftResult` when a window closes."""

    def __init__(
        self,
        *,
        window: int = WINDOW,
        window_s: float = WINDOW_S,
        watch: float = WATCH,
        alert: float = ALERT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window, self.window_s = window, window_s
        self.watch, self.alert = watch, alert
        self.clock = clock
        self._windows: dict[str, _Window] = {}
        self._latest: dict[str, DriftResult] = {}
        self._lock = threading.Lock()

    def observe(
        self,
        model: str,
        version: str,
        reference: dict[str, Any] | None,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
    ) -> DriftResult | None:
        """Add one request to its model version's window; the result when this closed the window."""
        if reference is None:
            return None
        w = self._windows.get(model)
        now = self.clock()
        if w is None or w.version != version:
            w = self._windows[model] = _Window(version, reference, now)
        for name in reference.get("inputs", {}):
            if name in inputs:
                w.inputs.setdefault(name, []).append(columns(inputs[name]))
        for name in reference.get("outputs", {}):
            if name in outputs:
                w.outputs.setdefault(name, []).append(output_classes(outputs[name])[0])
        w.n += 1
        if w.n < self.window and now - w.started < self.window_s:
            return None
        result = self._close(model, w)
        self._windows[model] = _Window(version, reference, now)
        with self._lock:
            self._latest[model] = result
        return result

    def _close(self, model: str, w: _Window) -> DriftResult:
        scores: dict[str, float] = {}
        for name, spec in w.reference.get("inputs", {}).items():
            blocks = w.inputs.get(name)
            if not blocks:
                continue
            cols = np.concatenate(blocks)
            for i, feature in enumerate(spec["features"]):
                if i < cols.shape[1]:
                    counts = bin_counts(cols[:, i], spec["edges"][i])
                    scores[feature] = round(psi(counts, np.asarray(spec["fractions"][i])), 4)
        out_scores = []
        for name, spec in w.reference.get("outputs", {}).items():
            blocks = w.outputs.get(name)
            if not blocks:
                continue
            expected = np.asarray(spec["class_fractions"], dtype=np.float64)
            classes = np.concatenate(blocks)
            classes = classes[(classes >= 0) & (classes < len(expected))]
            out_scores.append(psi(np.bincount(classes, minlength=len(expected)), expected))
        output_psi = round(max(out_scores), 4) if out_scores else None
        top = max([*scores.values(), output_psi or 0.0], default=0.0)
        level = "alert" if top > self.alert else "watch" if top > self.watch else "ok"
        return DriftResult(model, w.version, w.n, scores, output_psi, level)

    def remember(self, result: DriftResult) -> None:
        """Keep ``result`` as its model's newest (a window closed in the writer process, ``telemetry.writer.remote``)."""
        with self._lock:
            self._latest[result.model] = result

    def latest(self) -> dict[str, DriftResult]:
        """The newest result per model."""
        with self._lock:
            return dict(self._latest)

    def summary(self, top: int = 3) -> dict[str, dict[str, Any]]:
        """For DeviceState: per model, its version, level and the ``top`` worst PSIs."""
        return {
            m: {"version": r.version, "level": r.level, "psi": r.worst(top)} for m, r in sorted(self.latest().items())
        }
