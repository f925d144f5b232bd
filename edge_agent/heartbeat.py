"""The watchdog heartbeat: ``WATCHDOG=1`` only while every registered loop proves it is alive.

Each loop the agent depends on (the HTTP event loop, the OTA update loop) is registered by name
and calls its beat on every turn. A pinger thread checks every ``period / 2`` (systemd's advice)
and sends ``WATCHDOG=1`` only when every loop beat within the last ``period / 2``: a loop stuck
in a blocking call stops the pings, and systemd restarts the agent after ``WatchdogSec=``. The
same thread sends a ``STATUS=`` line whenever the agent's one-line status changes.

The sending function is injected (``edge_agent.sdnotify.notify`` in the agent), so this module
knows nothing of sockets.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("edge_agent.heartbeat")

STATUS_INTERVAL_S = 5.0  # how often the status line is refreshed when there is no watchdog


class Heartbeat:
    """Named beats → ``WATCHDOG=1`` pings while all are fresh, and ``STATUS=`` lines on change."""

    def __init__(
        self,
        send: Callable[..., Any],
        period_s: float | None,
        *,
        status: Callable[[], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.send = send
        self.period_s = period_s
        self.max_age_s = period_s / 2 if period_s else float("inf")
        self.status = status
        self.clock = clock
        self.pings = 0  # WATCHDOG=1 sent
        self.ticks = 0  # checks made
        self._beats: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_status: str | None = None
        self._stale_logged: tuple[str, ...] = ()
        self.loop_task: asyncio.Task[None] | None = None  # beat_forever on the agent's event loop

    def register(self, name: str) -> Callable[[], None]:
        """Watch loop ``name`` from now on; returns its beat (call it on every turn of the loop)."""
        self.beat(name)
        return lambda: self.beat(name)

    def beat(self, name: str) -> None:
        with self._lock:
            self._beats[name] = self.clock()

    def stale(self) -> list[str]:
        """The loops whose last beat is older than ``period / 2``."""
        now = self.clock()
        with self._lock:
            return sorted(n for n, t in self._beats.items() if now - t > self.max_age_s)

    def tick(self) -> bool:
        """One check: send the status line if it changed, and ``WATCHDOG=1`` if every loop is alive."""
        self.ticks += 1
        if self.status is not None:
            try:
                line = self.status()
            except Exception as exc:  # a failing status must not withhold the pings of a live agent
                line = f"status unavailable: {exc}"
            if line != self._last_status:
                self._last_status = line
                self.send(f"STATUS={line}")
        stuck = tuple(self.stale())
        if stuck:
            if stuck != self._stale_logged:
                log.error("watchdog pings withheld: %s stopped beating", ", ".join(stuck))
                self._stale_logged = stuck
            return False
        self._stale_logged = ()
        if self.period_s:
            self.send("WATCHDOG=1")
            self.pings += 1
        return True

    async def beat_forever(self, name: str) -> None:
        """An asyncio task: beats ``name`` on every turn of the running event loop."""
        beat = self.register(name)
        while True:
            beat()
            await asyncio.sleep(min(1.0, self.max_age_s / 4))

    def start_on_loop(self, name: str) -> None:
        """On the running event loop: beat ``name`` from it, and start the pings."""
        self.loop_task = asyncio.get_running_loop().create_task(self.beat_forever(name))
        self.start()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        interval = self.period_s / 2 if self.period_s else STATUS_INTERVAL_S
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(interval)
