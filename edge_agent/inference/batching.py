"""Dynamic batching: concurrent requests for one model coalesced into one interpreter invoke.

Off unless a model has a ``[models.NAME.batching]`` table (``config/batching.py`` builds the
:class:`BatchPolicy`), and only for models whose every input has a dynamic batch dimension.

A :class:`Batcher` belongs to one ``LoadedModel`` (a hot swap gets a new one). Requests are
converted to the tensors' native types on the caller's side, then queued. A scheduler thread
waits for a free interpreter (``pool_size`` of them, as many batches run at once), then forms a
batch as Triton's dynamic batcher does: it sends at once when the queue holds ``max_batch_size``
rows or the largest preferred batch size, else it waits up to ``max_queue_delay_us`` after the
oldest request arrived and sends what it has (cut to the largest preferred size that fits). One
departure: a request that finds the model idle (no batch executing) goes at once. At low load
waiting would only add the delay to every request; under load requests arrive while batches run,
and those wait and coalesce. Only requests whose non-batch
shapes agree share a batch; one request is never split.

The batch's raw outputs are cut back into each request's own rows (offsets in queue order) and
dequantized per request. If the batched invoke raises, every request of the batch is run alone, so
a bad request fails alone and the others still get their answers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edge_agent.errors import RequestError

if TYPE_CHECKING:
    from edge_agent.inference.runtime import LoadedModel
    from edge_agent.inference.stats import InferenceStats

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]
Result = tuple[Outputs, float, float]  # outputs, seconds queued, seconds of the (batch's) invoke


@dataclass(frozen=True)
class BatchPolicy:
    """One model's batching settings (``[models.NAME.batching]``)."""

    max_batch_size: int = 8
    max_queue_delay_us: int = 100
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass
class _Item:
    feeds: dict[str, np.ndarray]
    rows: int
    key: tuple[tuple[str, tuple[int, ...]], ...]  # the non-batch shapes: only equal keys share a batch
    raw_outputs: frozenset[str] | set[str]
    future: Future[Result]
    queued_at: float


class Batcher:
    """The dynamic batcher of one loaded model version (module doc)."""

    def __init__(self, model: LoadedModel, policy: BatchPolicy, stats: InferenceStats | None = None) -> None:
        self.model = model
        self.stats = stats
        self.max_rows = max(1, min(policy.max_batch_size, model.max_batch))
        self.delay_s = policy.max_queue_delay_us / 1e6
        self.preferred = sorted({p for p in policy.preferred_batch_sizes if p <= self.max_rows})
        self.instances = max(1, model.options.pool_size)
        self._all_raw = frozenset(s.name for s in model.manifest.outputs)
        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._free = threading.Semaphore(self.instances)
        self._executor: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._running = 0  # batches executing now

    # -- callers ------------------------------------------------------------------------
    def submit(self, inputs: Mapping[str, np.ndarray], raw_outputs: frozenset[str] | set[str]) -> Future[Result]:
        """Queue one checked request (any thread); the future gives (outputs, queued s, invoke s)."""
        feeds = self.model.to_native(inputs)
        first = next(iter(feeds.values()))
        key = tuple(sorted((n, tuple(a.shape[1:])) for n, a in feeds.items()))
        item = _Item(feeds, int(first.shape[0]) if first.ndim else 1, key, raw_outputs, Future(), time.perf_counter())
        with self._cond:
            closed = self._closed
            if not closed:
                self._queue.append(item)
                self._cond.notify()
                if self._thread is None:
                    self._executor = ThreadPoolExecutor(self.instances, thread_name_prefix=f"batch-{self.model.name}")
                    self._thread = threading.Thread(
                        target=self._schedule, name=f"batcher-{self.model.name}", daemon=True
                    )
                    self._thread.start()
        if closed:  # a swap closed this batcher after the request resolved its model: run it alone
            self._run([item], time.perf_counter())
        return item.future

    async def infer(self, inputs: Mapping[str, np.ndarray], raw_outputs: frozenset[str] | set[str]) -> Result:
        """:meth:`submit`, awaited from the event loop."""
        return await asyncio.wrap_future(self.submit(inputs, raw_outputs))

    def close(self) -> None:
        """Send what is queued, then stop the scheduler thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- the scheduler thread -------------------------------------------------------------
    def _schedule(self) -> None:
        while True:
            self._free.acquire()  # a free interpreter first: while all are busy, the queue grows
            batch = self._next_batch()
            if batch is None:
                break
            assert self._executor is not None
            self._executor.submit(self._execute, batch)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _next_batch(self) -> list[_Item] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._queue[0].queued_at + self.delay_s
            target = self.preferred[-1] if self.preferred else self.max_rows
            while not self._closed:
                rows = self._rows()
                left = deadline - time.perf_counter()
                if rows >= target or left <= 0 or not self._running:  # an idle model: no one to wait for
                    break
                self._cond.wait(left)
            self._running += 1
            return self._take()

    def _rows(self) -> int:
        """Rows queued that could join the oldest request's batch (up to ``max_rows``)."""
        key, rows = self._queue[0].key, 0
        for item in self._queue:
            if item.key == key and rows + item.rows <= self.max_rows:
                rows += item.rows
        return rows

    def _take(self) -> list[_Item]:
        """The next batch, oldest first: the most rows up to ``max_rows``, cut to a preferred size if one fits."""
        rows = max(self._rows(), self._queue[0].rows)
        fits = [p for p in self.preferred if p <= rows]
        limit = fits[-1] if fits else rows
        key, taken = self._queue[0].key, 0
        batch: list[_Item] = []
        keep: deque[_Item] = deque()
        while self._queue:
            item = self._queue.popleft()
            if item.key == key and (not batch or taken + item.rows <= limit):
                batch.append(item)
                taken += item.rows
            else:
                keep.append(item)
        self._queue = keep
        return batch

    # -- executing a batch ------------------------------------------------------------------
    def _execute(self, batch: list[_Item]) -> None:
        try:
            self._run([item for item in batch if item.future.set_running_or_notify_cancel()], time.perf_counter())
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify()
            self._free.release()

    def _run(self, batch: list[_Item], started: float) -> None:
        if not batch:
            return
        feeds = (
            batch[0].feeds
            if len(batch) == 1
            else {n: np.concatenate([i.feeds[n] for i in batch]) for n in batch[0].feeds}
        )
        rows = sum(i.rows for i in batch)
        try:
            raw = self.model.run_native(feeds, self._all_raw)
            short = [k for k, v in raw.items() if v.ndim == 0 or v.shape[0] != rows]
            if short:  # never hand out rows the model did not produce (a fixed-batch output)
                raise RequestError(
                    f"model {self.model.name!r}: output {short[0]!r} does not have one row per input row"
                )
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0].future, exc)
            else:  # find the culprit: each request alone, so only the bad one fails
                log.debug("batch of %d failed (%s); running its requests one by one", len(batch), exc)
                for item in batch:
                    self._run([item], time.perf_counter())
            return
        infer_s = time.perf_counter() - started
        if self.stats is not None:
            self.stats.execution(self.model.name, self.model.version, rows, infer_s)
        offset = 0
        for item in batch:
            own = {k: v[offset : offset + item.rows] for k, v in raw.items()}
            offset += item.rows
            _settle(item.future, (self.model.finish(own, item.raw_outputs), started - item.queued_at, infer_s))


def _settle(future: Future[Result], outcome: Result | BaseException) -> None:
    """Resolve ``future`` unless its caller is gone (a disconnected client cancels it)."""
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:
        pass


class Batching:
    """The batchers of an API: one per model name with a policy, for the version that serves."""

    def __init__(self, policies: Mapping[str, BatchPolicy], stats: InferenceStats | None = None) -> None:
        self.policies = dict(policies)
        self.stats = stats
        self._batchers: dict[str, Batcher] = {}
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.policies)

    def get(self, model: LoadedModel) -> Batcher | None:
        """``model``'s batcher, or None when its batching is off or it has no dynamic batch dimension."""
        batcher = self._batchers.get(model.name)
        if batcher is not None and batcher.model is model:
            return batcher
        policy = self.policies.get(model.name)
        if policy is None:
            return None
        if not model.batchable:
            if model.name not in self._warned:
                self._warned.add(model.name)
                log.warning("model %s has no dynamic batch dimension: batching is off for it", model.name)
            return None
        with self._lock:
            old = self._batchers.get(model.name)
            if old is not None and old.model is model:
                return old
            batcher = self._batchers[model.name] = Batcher(model, policy, self.stats)
        if old is not None:
            old.close()
        return batcher

    def close(self) -> None:
        with self._lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for b in batchers:
            b.close()
