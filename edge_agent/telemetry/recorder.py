"""The hot path's side of telemetry: inference ids, and a prediction queued in memory for the writer.

:meth:`Recorder.prediction` is what a request pays: a policy lookup, one ``random()`` for the input
sample, one ``deque.append`` of references it already holds and one dict insert into the recent-id
index (a few hundred nanoseconds). Everything else — top-k, JSON, SQLite, drift windows — happens
in :meth:`Recorder.flush` on the telemetry writer thread, every ``flush_interval_ms``; what is
queued but not yet flushed is what a power loss can take (docs/telemetry.md).

The queue is bounded (``queue_max``); a prediction that finds it full is dropped and counted
(``prediction``), never blocking the request.
"""

from __future__ import annotations

import itertools
import json
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.telemetry.drift import DriftMonitor, DriftResult
from edge_agent.telemetry.outbox import Outbox, Row
from edge_agent.wire.kserve_v2 import dumps
from edge_agent.wire.manifest import NUMPY_TO_V2, Manifest

TOP_K = 3
FULL_OUTPUT_MAX = 16  # an output of at most this many values is sent whole
MAX_SAMPLE_VALUES = 32_768  # a sampled input above this many values is not kept (counted as "inputs")
INDEX_SIZE = 100_000  # recent inference ids remembered for feedback (beyond the outbox)
_encode = json.JSONEncoder(separators=(",", ":"), check_circular=False, allow_nan=False).encode


@dataclass(frozen=True)
class ModelPolicy:
    """Telemetry for one model: whether predictions are recorded and what share keeps its inputs."""

    enabled: bool = True
    sample_inputs: float = 0.0


class IdSource:
    """Inference ids: ``<8 random hex>-<counter>``, unique across restarts without a uuid per request."""

    def __init__(self) -> None:
        self.prefix = secrets.token_hex(4)
        self._count = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.prefix}-{next(self._count)}"


def summarize_outputs(stacked: np.ndarray, classifier: bool) -> list[Any]:
    """One output of ``n`` predictions (``[n, *shape]``, same shape each), summarized per prediction.

    A classifier's output (the manifest has ``labels``) and any output above FULL_OUTPUT_MAX values
    become the top-k ``{"top_k": [[class, score], ...]}`` (a list of those per row for a batch);
    other outputs are sent whole. Vectorised over the flush: the writer's cost per record stays small.
    """
    n = stacked.shape[0]
    per = stacked[0]
    if per.ndim == 0 or per.shape[-1] < 2 or (not classifier and per.size <= FULL_OUTPUT_MAX):
        return list(_plain(stacked))
    flat = stacked.reshape(n, -1, per.shape[-1]).astype(np.float64)
    k = min(TOP_K, flat.shape[-1])
    idx = np.argsort(-flat, axis=-1)[..., :k]
    scores = np.round(np.take_along_axis(flat, idx, axis=-1), 6).tolist()
    classes = idx.tolist()
    if flat.shape[1] == 1:  # one row per prediction (the usual request): no per-row list of lists
        return [
            {"top_k": list(map(list, zip(cs[0], ss[0], strict=True)))} for cs, ss in zip(classes, scores, strict=True)
        ]
    return [
        {"top_k": [list(map(list, zip(c_row, s_row, strict=True))) for c_row, s_row in zip(cs, ss, strict=True)]}
        for cs, ss in zip(classes, scores, strict=True)
    ]


def _stacks(
    items: list[tuple[Any, ...]], idxs: Iterable[int], field: int
) -> Iterator[tuple[str, list[int], np.ndarray]]:
    """``(tensor name, item indices, stacked array)`` per (model, name, shape, dtype) of ``items[i][field]``."""
    groups: dict[tuple[int, str, tuple[int, ...], str], list[int]] = {}
    for i in idxs:
        item = items[i]
        model = id(item[0])
        for name, arr in item[field].items():
            key = (model, name, arr.shape, arr.dtype.str)
            group = groups.get(key)
            if group is None:
                groups[key] = [i]
            else:
                group.append(i)
    for (_, name, _, _), group in groups.items():
        yield name, group, np.stack([items[i][field][name] for i in group])


def _summaries(items: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """``outputs`` of each queued prediction, computed one stacked array per (model, output, shape)."""
    out: list[dict[str, Any]] = [{} for _ in items]
    for name, idxs, stacked in _stacks(items, range(len(items)), 5):
        for i, value in zip(idxs, summarize_outputs(stacked, bool(items[idxs[0]][0].labels)), strict=True):
            out[i][name] = value
    return out


def _plain(arr: np.ndarray) -> Any:
    if arr.dtype.kind == "f":
        return np.round(arr.astype(np.float64), 6).tolist()
    return arr.tolist()


def _samples(items: list[tuple[Any, ...]], idxs: list[int]) -> dict[int, dict[str, Any]]:
    """Sampled inputs of ``items[i]`` as V2 tensors ``{name: {shape, datatype, data}}``, stacked per group.

    An item whose inputs hold more than MAX_SAMPLE_VALUES values is left out (the caller counts it).
    """
    kept = [i for i in idxs if sum(a.size for a in items[i][4].values()) <= MAX_SAMPLE_VALUES]
    out: dict[int, dict[str, Any]] = {i: {} for i in kept}
    for name, group, stacked in _stacks(items, kept, 4):
        shape, datatype = list(stacked.shape[1:]), NUMPY_TO_V2.get(stacked.dtype.name, "FP32")
        for i, data in zip(group, _plain(stacked.reshape(len(group), -1)), strict=True):
            out[i][name] = {"shape": shape, "datatype": datatype, "data": data}
    return out


class Recorder:
    """Queues predictions (hot path) and writes them to the outbox in batches (writer thread)."""

    def __init__(
        self,
        outbox: Outbox,
        policy: Callable[[str], ModelPolicy],
        *,
        drift: DriftMonitor | None = None,
        on_drift: Callable[[DriftResult], None] | None = None,
        queue_max: int = 50_000,
        index_size: int = INDEX_SIZE,
        rng: random.Random | None = None,
    ) -> None:
        self.outbox, self.policy = outbox, policy
        self.drift, self.on_drift = drift, on_drift
        self.queue_max, self.index_size = queue_max, index_size
        self.new_id = IdSource()
        self._queue: deque[tuple[Any, ...]] = deque()
        self._policies: dict[str, ModelPolicy] = {}
        self._index: dict[str, str] = {}  # request id -> model, newest last
        self._random = (rng or random.Random()).random
        self._overflow = 0
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
        if len(self._queue) >= self.queue_max:
            self._overflow += 1
            return
        sampled = pol.sample_inputs > 0.0 and self._random() < pol.sample_inputs
        self._queue.append((manifest, request_id, latency_s, time.time(), inputs, outputs, entity_id, sampled))
        self._index[request_id] = name

    # -- the writer thread ----------------------------------------------------------------
    def pending(self) -> int:
        return len(self._queue)

    def known(self, request_id: str) -> str | None:
        """The model of a recent inference id (queued, flushed or in the outbox), else None."""
        model = self._index.get(request_id)
        return model if model is not None else self.outbox.find_prediction(request_id)

    def flush(self, extra: list[Row] | None = None, labels: list[tuple[str, str]] | None = None) -> int:
        """Commit everything queued (plus ``extra`` rows) in one transaction; returns the rows written."""
        with self.lock:
            return self._flush(extra, labels)

    def _flush(self, extra: list[Row] | None, labels: list[tuple[str, str]] | None) -> int:
        rows: list[Row] = []
        results: list[DriftResult] = []
        q = self._queue
        self._build_rows([q.popleft() for _ in range(len(q))], rows, results)
        rows.extend(extra or ())
        if rows:
            self.outbox.append(rows, labels)
        overflow, self._overflow = self._overflow, 0
        if overflow:
            self.outbox.count_drop("prediction", overflow)
        self._trim_index()
        for result in results:
            if self.on_drift is not None:
                self.on_drift(result)
        return len(rows)

    def _build_rows(self, items: list[tuple[Any, ...]], rows: list[Row], results: list[DriftResult]) -> None:
        """Append the rows of ``items`` (queued predictions) and of any drift window they close."""
        sampled = [i for i, item in enumerate(items) if item[7]]
        samples = _samples(items, sampled) if sampled else {}
        if len(samples) < len(sampled):
            self.outbox.count_drop("inputs", len(sampled) - len(samples))
        for i, (item, summary) in enumerate(zip(items, _summaries(items), strict=True)):
            manifest, rid, latency, ts, inputs, outputs, entity, _ = item
            rows.append(self._row(manifest, rid, latency, ts, summary, entity, samples.get(i)))
            if self.drift is not None and manifest.reference is not None:
                result = self.drift.observe(manifest.name, manifest.version, manifest.reference, inputs, outputs)
                if result is not None:
                    results.append(result)
                    rows.append(Row("drift", time.time(), dumps(result.body()).decode(), model=manifest.name))

    @staticmethod
    def _row(
        manifest: Manifest,
        rid: str,
        latency: float,
        ts: float,
        outputs: dict[str, Any],
        entity: Any,
        sample: dict[str, Any] | None,
    ) -> Row:
        body: dict[str, Any] = {
            "model": manifest.name,
            "version": manifest.version,
            "request_id": rid,
            "latency_ms": round(latency * 1000.0, 3),
            "outputs": outputs,
        }
        if entity is not None:
            body["entity_id"] = entity
        if sample is not None:
            body["inputs"] = sample
        return Row("prediction", ts, _encode(body), model=manifest.name, request_id=rid, has_inputs=sample is not None)

    def _trim_index(self) -> None:
        index = self._index
        try:
            while len(index) > self.index_size:
                del index[next(iter(index))]
        except (RuntimeError, StopIteration, KeyError):  # the request path inserted meanwhile: trim next time
            pass
