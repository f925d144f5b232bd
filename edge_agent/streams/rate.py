"""``RecentRate``: events per second over the last few seconds (a stream's ``fps_in`` / ``fps_processed``).

A lifetime average lags: after an outage it still shows the old rate, and a stream that slowed
down looks fast for minutes. This counts the events of the last ``window_s`` seconds instead
(over the time since start while that is shorter), so a stalled source reads 0 within the window.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 5.0


class RecentRate:
    """Thread-safe: ``tick()`` from the thread that sees the event, ``per_second()`` from any thread."""

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self._clock = window_s, clock
        self._times: deque[float] = deque()
        self._lock = threading.Lock()
        self._since = clock()

    def restart(self) -> None:
        """Forget every event; the rate is measured from now (the stream starts)."""
        with self._lock:
            self._times.clear()
            self._since = self._clock()

    def tick(self) -> None:
        now = self._clock()
        with self._lock:
            self._times.append(now)
            self._trim(now)

    def per_second(self) -> float:
        now = self._clock()
        with self._lock:
            self._trim(now)
            n = len(self._times)
        span = min(self.window_s, now - self._since)
        return n / span if span > 0 else 0.0

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] >= self.window_s:  # the window is (now - window_s, now]
            self._times.popleft()
