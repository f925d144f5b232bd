"""Per-model limits applied on the writer thread: a model's flush interval and its ``max_bps`` token bucket.

The outbox and the uploader are shared, so a per-model limit is a share within them
(docs/telemetry.md, "Per-model limits"):

* ``flush_interval_s``: the writer wakes at the smallest interval of any model (``tick_s``); a
  model's queued predictions are committed once its own interval has passed since its last
  commit (half a tick of slack), and stay queued until then. That interval is the model's
  power-loss window.
* ``max_bps``: a token bucket over the bytes each queued prediction adds to the outbox
  (``rows.record_bytes``: its id, its outputs and any sampled input in base64, uncompressed: an upper
  bound of what the model adds to the upload), refilled at ``max_bps`` and holding one second of it
  (at least 4 KiB, so any record can pass). A prediction that does not fit loses its sampled inputs
  first (counted ``inputs``), then is dropped (counted ``prediction``), before packs are built.
  Feedback, events and drift are never throttled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from edge_agent.telemetry.rows import Item, record_bytes

MIN_BURST = 4096


class TokenBucket:
    """``rate`` bytes per second, holding at most ``max(rate, MIN_BURST)`` bytes; starts full."""

    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self.rate, self.capacity, self.clock = rate, max(rate, float(MIN_BURST)), clock
        self.tokens, self.last = self.capacity, clock()

    def take(self, n: int) -> bool:
        """Spend ``n`` bytes when they are there."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if n > self.tokens:
            return False
        self.tokens -= n
        return True


class Pacing:
    """Which queued predictions are due, and which rows fit their model's bandwidth share."""

    def __init__(
        self,
        intervals: Callable[[str], float | None],
        rates: Callable[[str], float | None],
        *,
        default_interval_s: float,
        tick_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.intervals, self.rates = intervals, rates
        self.default_interval_s, self.slack = default_interval_s, tick_s / 2
        self.clock = clock
        self._interval: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._buckets: dict[str, TokenBucket | None] = {}

    def _interval_of(self, model: str) -> float:
        value = self._interval.get(model)
        if value is None:
            value = self._interval[model] = self.intervals(model) or self.default_interval_s
        return value

    def due(self, items: list[Any]) -> tuple[list[Any], list[Any]]:
        """Split queued predictions into (commit now, keep queued) by their model's flush interval."""
        now = self.clock()
        verdict: dict[str, bool] = {}
        now_items: list[Any] = []
        later: list[Any] = []
        for item in items:
            name = item[0].name
            ok = verdict.get(name)
            if ok is None:
                ok = verdict[name] = now - self._last.get(name, -1e18) >= self._interval_of(name) - self.slack
                if ok:
                    self._last[name] = now
            (now_items if ok else later).append(item)
        return now_items, later

    def limit(self, items: list[Item]) -> tuple[list[Item], dict[str, int]]:
        """The queued predictions that fit their model's token bucket (sampled inputs given up first); drops by kind."""
        kept: list[Item] = []
        drops: dict[str, int] = {}
        for item in items:
            bucket = self._bucket(item[0].name)
            if bucket is None or bucket.take(record_bytes(item, item[7])):
                kept.append(item)
                continue
            if item[7] and bucket.take(record_bytes(item, False)):
                kept.append((*item[:7], False))
                drops["inputs"] = drops.get("inputs", 0) + 1
                continue
            drops["prediction"] = drops.get("prediction", 0) + 1
        return kept, drops

    def _bucket(self, model: str) -> TokenBucket | None:
        if model not in self._buckets:
            rate = self.rates(model)
            self._buckets[model] = TokenBucket(rate, self.clock) if rate else None
        return self._buckets[model]
