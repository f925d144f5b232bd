"""Per model version inference statistics: the one set of counters behind ``/v2/models/stats`` and ``nv_*``.

The statistics extension (``http/ext/stats.py``) renders a :meth:`InferenceStats.snapshot` in Triton's
JSON shape, and the Triton-named Prometheus series (``http/ext/nvmetrics.py``) are read from the same
snapshot at scrape time, so the two can never disagree. Durations are kept in integer nanoseconds.

Per request (Triton's meaning): ``success``/``fail`` count requests and their time from request in
to response out; ``queue`` is the wait in the dynamic batcher; ``compute_input`` decoding, checking
and converting the inputs; ``compute_infer`` running the model (the whole batch's invoke time for
each request in it); ``compute_output`` encoding the response. ``inference_count`` counts rows,
``execution_count`` interpreter executions (one per dynamic batch), so their ratio is the mean batch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
BATCH_PHASES = ("compute_input", "compute_infer", "compute_output")
UNUSED = ("cache_hit", "cache_miss")  # no response cache on the agent: always zero


@dataclass
class Duration:
    """A count and the total nanoseconds spent."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)

    def to_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class VersionStats:
    """The counters of one model version."""

    name: str
    version: str
    phases: dict[str, Duration] = field(default_factory=lambda: {p: Duration() for p in PHASES})
    batches: dict[int, dict[str, Duration]] = field(default_factory=dict)  # executions by batch size
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0

    def to_dict(self) -> dict[str, Any]:
        """This version in the statistics extension's ``$model_stat`` shape."""
        inference = {p: d.to_dict() for p, d in self.phases.items()}
        inference.update({p: Duration().to_dict() for p in UNUSED})
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": inference,
            "batch_stats": [
                {"batch_size": size, **{p: d.to_dict() for p, d in phases.items()}}
                for size, phases in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }


class InferenceStats:
    """Thread-safe counters keyed by (model, version); writers are the inference path and the batcher."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, str], VersionStats] = {}

    def _get(self, name: str, version: str) -> VersionStats:
        s = self._stats.get((name, version))
        if s is None:
            s = self._stats[(name, version)] = VersionStats(name, version)
        return s

    def request(self, name: str, version: str, ok: bool, seconds: float) -> None:
        """A finished request (success or failure) and its time from request in to response out."""
        with self._lock:
            s = self._get(name, version)
            s.phases["success" if ok else "fail"].add(seconds)
            if ok:
                s.last_inference_ms = int(time.time() * 1000)

    def phases(
        self,
        name: str,
        version: str,
        rows: int,
        input_s: float,
        queue_s: float,
        infer_s: float,
        output_s: float,
        executed: bool,
    ) -> None:
        """The phases of one successful inference of ``rows`` rows; ``executed``: it ran alone (not batched),
        so it is also one execution (a dynamic batch's is counted once, by :meth:`execution`)."""
        with self._lock:
            s = self._get(name, version)
            p = s.phases
            p["compute_input"].add(input_s)
            p["queue"].add(queue_s)
            p["compute_infer"].add(infer_s)
            p["compute_output"].add(output_s)
            s.inference_count += rows
            if executed:
                self._execution(s, rows, infer_s)

    def execution(self, name: str, version: str, batch_size: int, infer_s: float) -> None:
        """One interpreter execution of ``batch_size`` rows (a whole dynamic batch)."""
        with self._lock:
            self._execution(self._get(name, version), batch_size, infer_s)

    @staticmethod
    def _execution(s: VersionStats, batch_size: int, infer_s: float) -> None:
        s.execution_count += 1
        b = s.batches.get(batch_size)
        if b is None:
            b = s.batches[batch_size] = {p: Duration() for p in BATCH_PHASES}
        b["compute_infer"].add(infer_s)

    def snapshot(self, known: dict[str, list[str]] | None = None) -> list[VersionStats]:
        """Copies of every version's counters, sorted; ``known`` versions without any traffic appear as zeros."""
        with self._lock:
            keys = set(self._stats)
            for name, versions in (known or {}).items():
                keys.update((name, v) for v in versions)
            out = []
            for key in sorted(keys):
                s = self._stats.get(key)
                if s is None:
                    out.append(VersionStats(*key))
                else:
                    out.append(
                        VersionStats(
                            s.name,
                            s.version,
                            {p: Duration(d.count, d.ns) for p, d in s.phases.items()},
                            {b: {p: Duration(d.count, d.ns) for p, d in ph.items()} for b, ph in s.batches.items()},
                            s.inference_count,
                            s.execution_count,
                            s.last_inference_ms,
                        )
                    )
            return out
