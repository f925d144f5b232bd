"""The bookkeeping of one download: what a link must offer, the rate limit, the stall watch, the counts."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from edge_agent.mqtt.link import Handler


class ChunkLink(Protocol):
    """What ``Downloader`` needs of a link: ``MqttLink``, or the simulator's ``LoopLink``."""

    @property
    def connects(self) -> int:
        """How many times the link has (re)connected; a change means the broker may have dropped subscriptions."""
        ...

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None: ...

    def unsubscribe(self, topic_filter: str) -> None: ...


# -- rate limiting -----------------------------------------------------------------
class TokenBucket:
    """Bytes per second with a burst of ``burst`` bytes; ``take`` may go into debt."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.t = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now

    def wait_time(self, n: int) -> float:
        """Seconds until ``n`` bytes may be committed (0 if now)."""
        self._refill()
        need = min(float(n), self.burst)
        return 0.0 if self.tokens >= need else (need - self.tokens) / self.rate

    def take(self, n: int) -> None:
        self._refill()
        self.tokens -= n


@dataclass
class TransferStats:
    """What one ``Downloader.run`` did. Updated on the downloader's thread only."""

    total: int = 0  # chunks in the artifact
    already_had: int = 0  # chunks on disk when the run started
    chunks_received: int = 0  # chunks verified and stored by this run (any transport)
    duplicates: int = 0  # chunk messages that arrived when the chunk was already stored
    bad_chunks: int = 0  # chunks that failed their size/sha256 check (never stored)
    bytes_received: int = 0  # payload bytes that arrived (stored, duplicate and bad alike)
    bytes_stored: int = 0  # payload bytes of the stored chunks
    resubscribes: int = 0  # stall recoveries: outstanding window subscribed again
    corrupt_on_disk: int = 0  # stored chunks that failed verification at assembly and were refetched
    http_chunks: int = 0  # chunks obtained over HTTP(S) Range requests
    http_errors: int = 0  # HTTP failures that made the run fall back to MQTT
    via_sink: bool = False  # the chunks were verified and written by the chunk sink (``mqtt.sink``)
    elapsed: float = 0.0  # seconds
    receipts: dict[int, int] = field(default_factory=dict)  # chunk index -> MQTT messages received for it

    @property
    def rate_bps(self) -> float:
        return self.bytes_received / self.elapsed if self.elapsed > 0 else 0.0


class Stall:
    """Stall handling: the link re-subscribes after a reconnect by itself; otherwise ask again."""

    def __init__(self, link: ChunkLink, timeout_s: float, resubscribe: Callable[[list[str]], None]) -> None:
        self.link, self.timeout_s, self.resubscribe = link, timeout_s, resubscribe
        self.connects, self.last_activity = link.connects, time.monotonic()

    def check(self, activity: bool, outstanding: bool, topics: Callable[[], list[str]]) -> None:
        """After each wait: ``activity`` (chunks came or were asked for), ``outstanding`` (some still missing)."""
        now = time.monotonic()
        if activity:
            self.last_activity = now
        if self.link.connects != self.connects:
            self.connects, self.last_activity = self.link.connects, now
        elif outstanding and now - self.last_activity > self.timeout_s:
            self.resubscribe(topics())
            self.last_activity = now
