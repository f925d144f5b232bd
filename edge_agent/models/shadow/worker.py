"""Where the shadow child runs its copies: inline at nice 10, or (``runner.IDLE_WORKER``, off) on a ``SCHED_IDLE`` thread.

Off by default: on a saturated CPU the takeover below waited for the starved thread to release
the GIL and its lock, and a shadow window of 4-12 s compared nothing (the kill -9 test beside
four busy processes); a worker *process* would not share the GIL. What follows is the opt-in design.

A thread scheduled ``SCHED_IDLE`` runs on CPU time nothing else wants: a request thread of the
agent that wakes up preempts it at once, and the scheduler places wake-ups on its core as on an
idle one. On digits at ``shadow_rate = 1`` that took the primary's p99 rise from a mean of +9.3%
(the whole child at nice 10) to +4.1% (docs/benchmarks.md, "An idle-priority worker"). But on a saturated CPU such a
thread gets almost nothing, and an unprivileged thread cannot leave ``SCHED_IDLE`` again (every
copy was dropped under CI's load when the whole child ran so). Hence the split: the child's main
thread (nice 10) reads the agent's messages and submits their copies; a worker thread at idle
priority runs them, in order, in slices of ``SLICE`` copies. When a submitted hand-over has
waited ``starved_s``, the main thread tells the worker to stop after its slice and runs the rest
itself, as the whole child did before: at nice 10, for the rest of this shadow (``priority``
in the reports turns from ``"idle"`` to ``"nice"``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.models.shadow.blob import Block

log = logging.getLogger(__name__)

SLICE = 16  # copies run between two looks at a takeover (a multiple of the child's batch rows)
STARVED_S = 1.0  # a hand-over waiting this long for the idle worker: the main thread takes over

Report = Callable[[], dict[str, Any]]  # the figures to send, built on the thread that ran the copies
Send = Callable[[dict[str, Any]], None]  # one message to the agent (thread-safe)


@dataclass
class Item:
    """One hand-over: its copies left to run, the ring slots to free after them (None: queued copies)."""

    blocks: deque[Block]
    freed: int | None
    since: float


class Worker:
    """Runs submitted copies with ``run`` in submission order; answers freed slots and keeps the report due.

    ``idle=False`` (or no ``SCHED_IDLE`` on this system): everything runs on the submitting thread.
    """

    def __init__(
        self, run: Callable[[Block], None], report: Report, send: Send, *, idle: bool, starved_s: float
    ) -> None:
        self._run_block, self._report, self._send = run, report, send
        self.starved_s = starved_s
        self._items: deque[Item] = deque()
        self._cond = threading.Condition()  # guards _items, _retired, _due
        self._lock = threading.Lock()  # held while copies run: one thread at a time, in order
        self._retired = False
        self._thread: threading.Thread | None = None
        if idle and hasattr(os, "SCHED_IDLE"):
            self._thread = threading.Thread(target=self._loop, name="shadow-idle", daemon=True)
            self._thread.start()
        self._due: dict[str, Any] | None = self._figures()  # not yet sent: the resumed figures first

    @property
    def priority(self) -> str:
        """``"idle"`` while the idle worker runs the copies, ``"nice"`` once they run on the main thread."""
        return "idle" if self._thread is not None else "nice"

    def submit(self, blocks: list[Block], freed: int | None) -> None:
        """Copies to run (``freed``: answer ``{"freed": n}`` once they are done)."""
        if self._thread is None:  # inline: the blocks as they came (slices only matter for a takeover)
            with self._lock:
                self._finish(Item(deque(blocks), freed, time.monotonic()))
            return
        item = Item(deque(_sliced(blocks)), freed, time.monotonic())
        with self._cond:
            self._items.append(item)
            self._cond.notify()

    def waiting(self) -> bool:
        """Whether copies wait to run or figures to be sent (the main thread then looks again soon)."""
        with self._cond:
            return bool(self._items) or self._due is not None

    def take_report(self) -> dict[str, Any] | None:
        """The figures that changed since the last message to the agent, once (None: nothing new)."""
        with self._cond:
            due, self._due = self._due, None
        return due

    def check(self) -> None:
        """Main thread: take over when the oldest submitted hand-over has waited ``starved_s`` (or the worker died)."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            starved = bool(self._items) and time.monotonic() - self._items[0].since >= self.starved_s
            if not starved and thread.is_alive():
                return
            self._retired = True
            self._cond.notify_all()
        with self._lock:  # the worker stops after its slice
            self._thread = None
            log.warning("shadow: the idle-priority worker is %s; the copies run at the child's nice from now on",
                        "behind" if starved else "gone")  # fmt: skip
            while self._items:
                self._finish(self._items[0])

    def _loop(self) -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
        except OSError as exc:
            log.info("shadow: no SCHED_IDLE (%s); copies run at the child's nice", exc)
            with self._cond:
                self._retired = True  # check() takes over at once
            return
        try:
            while True:
                with self._cond:  # waiting without the lock: a takeover then needs nothing of this thread
                    while not self._items and not self._retired:
                        self._cond.wait()
                with self._lock:
                    with self._cond:
                        if self._retired:
                            return
                        item = self._items[0]  # only this thread takes items until it is retired
                    self._finish(item, stop=lambda: self._retired)
        except (OSError, EOFError):  # the agent closed the connection: the main thread ends the child
            return
        except Exception:
            log.exception("shadow: the idle-priority worker failed; the main thread takes over")

    def _finish(self, item: Item, stop: Callable[[], bool] = lambda: False) -> None:
        """Run what is left of ``item`` (the caller holds ``_lock``); unless stopped, retire it and report."""
        while item.blocks:
            if stop():
                return  # left at the front: the main thread goes on from here
            self._run_block(item.blocks.popleft())
        report: dict[str, Any] | None = self._figures()
        if item.freed is not None and report is not None:
            self._send({"freed": item.freed, **report})  # one wake-up of the agent: slots and figures
            report = None
        with self._cond:  # at once: the main thread never sees neither copies waiting nor figures due
            if self._items and self._items[0] is item:
                self._items.popleft()
            self._due = report

    def _figures(self) -> dict[str, Any]:
        return {**self._report(), "priority": self.priority}


def _sliced(blocks: list[Block]) -> Iterator[Block]:
    """``blocks`` cut into blocks of at most ``SLICE`` copies (views: nothing is copied)."""
    for block in blocks:
        if len(block.rows) <= SLICE:
            yield block
            continue
        bounds = np.cumsum([0, *block.rows]).tolist()
        for i in range(0, len(block.rows), SLICE):
            j = min(i + SLICE, len(block.rows))
            lo, hi = bounds[i], bounds[j]
            yield Block(block.rows[i:j], block.seconds[i:j], _rows(block.inputs, lo, hi), _rows(block.outputs, lo, hi))


def _rows(tensors: Mapping[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
    return {name: a if not a.ndim else a[lo:hi] for name, a in tensors.items()}
