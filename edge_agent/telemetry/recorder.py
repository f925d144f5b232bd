"""The hot path's side of telemetry: inference ids, and a prediction queued in memory for the writer.

:meth:`Recorder.prediction` is what a request pays: a policy lookup, one ``random()`` for the input
sample, one ``deque.append`` of references it already holds (the inputs only when the writer will
read them: sampled, or a drift reference) and one entry in the recent-id index (``ids.IdIndex``: two
array stores for a generated id); 1-2.5 µs in all, measured alone (docs/benchmarks.md).
Everything else — top-k, JSON, SQLite, drift windows — happens when :meth:`Recorder.flush` (the
telemetry thread, every ``flush_interval_ms``) hands the queue to its ``writer``: in the agent the
writer process (``telemetry.writer.remote``), else a ``writer.local.LocalWriter`` on this thread. What is queued
but not yet committed is what a power loss can take (docs/telemetry.md).

The queue is bounded (``queue_max``); a prediction that finds it full is dropped and counted
(``prediction``), never blocking the request.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edge_agent.errors import EdgeError
from edge_agent.telemetry.drift import DriftMonitor, DriftResult
from edge_agent.telemetry.ids import IdIndex
from edge_agent.telemetry.ids import IdSource as IdSource  # re-exported: http.infer imports it from here
from edge_agent.telemetry.outbox import Outbox, Row
from edge_agent.telemetry.pacing import Pacing
from edge_agent.telemetry.rows import Item
from edge_agent.telemetry.writer.local import LocalWriter
from edge_agent.telemetry.writer.remote import Store
from edge_agent.wire.model.manifest import Manifest

INDEX_SIZE = 100_000  # recent inference ids remembered for feedback (beyond the outbox)
NO_INPUTS: dict[str, np.ndarray] = {}  # the inputs of a queued prediction nobody will read (never mutated)


@dataclass(frozen=True)
class ModelPolicy:
    """Telemetry for one model: whether predictions are recorded, what share keeps its inputs, its limits.

    ``max_bps`` and ``flush_interval_s`` are the model's own (``telemetry.pacing``); None: the device's.
    """

    enabled: bool = True
    sample_inputs: float = 0.0
    max_bps: float | None = None
    flush_interval_s: float | None = None


class Writer(Protocol):
    """Commits queued predictions, ``extra`` rows and label marks in one transaction (``writer.local.LocalWriter``)."""

    def write(
        self, items: list[Item], extra: list[Row] | None, labels: list[tuple[str, str]] | None, overflow: int
    ) -> int: ...


class Recorder:
    """Queues predictions (hot path) and hands them to the writer in batches (telemetry thread)."""

    def __init__(
        self,
        outbox: Store,
        policy: Callable[[str], ModelPolicy],
        *,
        drift: DriftMonitor | None = None,
        on_drift: Callable[[DriftResult], None] | None = None,
        queue_max: int = 50_000,
        index_size: int = INDEX_SIZE,
        rng: random.Random | None = None,
        pacing: Pacing | None = None,
        writer: Writer | None = None,
    ) -> None:
        """``writer``: where flushes go (default: a ``LocalWriter`` on ``outbox`` with ``drift`` and ``pacing``)."""
        self.outbox, self.policy = outbox, policy
        self.drift, self.on_drift = drift, on_drift
        if writer is None:
            if not isinstance(outbox, Outbox):
                raise TypeError("a Recorder on a remote outbox needs its writer")
            writer = LocalWriter(outbox, drift=drift, on_drift=on_drift, pacing=pacing)
        self.writer: Writer = writer
        self.queue_max, self.index_size = queue_max, index_size
        self.new_id = IdSource()
        self.index = IdIndex(self.new_id, index_size)
        self._queue: deque[Item] = deque()
        self._policies: dict[str, ModelPolicy] = {}
        self._random = (rng or random.Random()).random
        self._overflow = 0
        self.pacing = pacing
        self.lock = threading.RLock()  # one flush at a time; feedback holds it across its 409 check and commit

    # -- the hot path ---------------------------------------------------------------------
    def prediction(
        self,
        manifest: Manifest,
        request_id: str,
        latency_s: float,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        entity_id: Any = None,
    ) -> None:
        """Queue one prediction record (never blocks; a full queue drops and counts it)."""
        name = manifest.name
        pol = self._policies.get(name)
        if pol is None:
            pol = self._policies[name] = self.policy(name)
        if not pol.enabled:
            return
        q = self._queue
        if len(q) >= self.queue_max:
            self._overflow += 1
            return
        sampled = pol.sample_inputs > 0.0 and self._random() < pol.sample_inputs
        if not sampled and manifest.reference is None:
            inputs = NO_INPUTS  # not needed by the writer: the request's tensors are freed now, not a flush later
        q.append((manifest, request_id, latency_s, time.time(), inputs, outputs, entity_id, sampled))
        self.index.add(request_id, name)

    # -- the writer thread ----------------------------------------------------------------
    def pending(self) -> int:
        return len(self._queue)

    def known(self, request_id: str) -> str | None:
        """The model of a recent inference id (queued, flushed or in the outbox), else None."""
        model = self.index.get(request_id)
        return model if model is not None else self.outbox.find_prediction(request_id)

    def flush(
        self, extra: list[Row] | None = None, labels: list[tuple[str, str]] | None = None, *, force: bool = True
    ) -> int:
        """Commit what is queued (plus ``extra`` rows) in one transaction; returns the rows written.

        ``force=False`` (the writer's tick) keeps a model's predictions queued until its own flush
        interval has passed (``pacing``); an explicit flush commits everything.
        """
        with self.lock:
            return self._flush(extra, labels, force)

    def _flush(self, extra: list[Row] | None, labels: list[tuple[str, str]] | None, force: bool) -> int:
        q = self._queue
        items = [q.popleft() for _ in range(len(q))]
        if self.pacing is not None and not force:
            items, later = self.pacing.due(items)
            q.extendleft(reversed(later))  # older than anything the request path appended meanwhile
        overflow, self._overflow = self._overflow, 0
        if not items and not extra and not overflow:  # an idle tick: no request to the writer process
            self.index.trim()
            return 0
        try:
            written = self.writer.write(items, extra, labels, overflow)
        except EdgeError:
            q.extendleft(reversed(items))  # not committed (outbox or writer process failed): the next flush retries
            self._overflow += overflow
            raise
        self.index.trim()
        return written
