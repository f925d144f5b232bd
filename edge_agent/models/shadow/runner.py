"""The agent's side of a shadow: sample live requests, ship them to the shadow child in bulk, keep its figures.

The request path only calls :meth:`ShadowRunner.offer`: one random draw and, for a sampled
request, a copy by value into the ``ring`` (requests of its signature, up to a quarter of its
rows each: shared memory the child maps too) or else an append of its arrays to a bounded queue
(a full ring or queue drops the copy and counts it). One shipping thread wakes every
``BATCH_EVERY_S``; it names the ring's slots filled since its last wake-up to the child (a few
bytes; the child frees them when done) and packs what was queued into messages of up to ``SHIP_CHUNK`` copies (``blob.pack``: the copies' tensors
stacked, no per-copy pickling; a short sleep between two messages, so no single hold of the GIL
grows with the request rate). The child (``child``) runs the candidate and the reference copy of
the active version in its own process, with its own GIL, and reports the figures a few times a
second. While the child is behind, the ring fills and the socket's buffer fills (queued copies wait
while it is full); past the ring's slots or ``queue_size`` queued copies, copies are dropped and counted.
The child runs ``SCHED_IDLE`` (``priority``); when a hand-over has waited ``priority.STARVED_S`` with
no word from it, the shipping thread gives it nice 10 back (``_watch``).

A child that dies (a segfault on a live input, the OOM killer) does not take the agent down:
the runner keeps its last figures and sets ``failure`` (``shadow process died (SIGSEGV)``), which
the verdict rejects with (``update.shadow.verdict``). It is not restarted: a candidate that
crashes the runtime on live traffic is not one to promote.
"""

from __future__ import annotations

import json
import logging
import os
import random
import select
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.reduction import send_handle
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.inference.childproc import Child, Isolation, exit_reason, options_to_json
from edge_agent.inference.runtime import RuntimeOptions
from edge_agent.models.shadow import child, priority
from edge_agent.models.shadow.blob import Sample, control, pack
from edge_agent.models.shadow.ring import Ring, fits
from edge_agent.wire.shadow import ShadowFigures

log = logging.getLogger(__name__)

QUEUE_SIZE = 256  # sampled copies the ring cannot take waiting for the child; more are dropped (and counted)
BATCH_EVERY_S = 0.5  # the shipping thread hands what was sampled to the child this often (each hand-over
# disturbs the request path for a while, whatever it carries: 0.05 s cost ~20 µs of agent CPU per copy, 0.2 s ~14)
SHIP_CHUNK = 64  # copies per message: one pack holds the GIL ~0.1 ms (cold caches), however busy the model
PAUSE_S = 0.0002  # between two messages of one wake-up, the GIL is left to the requests
STOP_TIMEOUT_S = 2.0  # a child that does not exit this long after its connection closed is killed
LOAD_TIMEOUT_S = 60.0  # the child must have loaded both versions this long after the start, or the shadow fails
IDLE = True  # the child runs the copies SCHED_IDLE until it starves (``priority``); False: at nice 10 throughout


@dataclass(frozen=True)
class ShadowModel:
    """A version as the shadow child loads it: its directory (a sealed one is opened there with ``fleet_key``)."""

    name: str
    version: str
    version_dir: Path
    fleet_key: Path | None = None
    options: RuntimeOptions | None = None  # the child's runtime options (one interpreter; default one thread)

    def spec(self) -> dict[str, str | None]:
        return {"dir": str(self.version_dir), "fleet_key": None if self.fleet_key is None else str(self.fleet_key)}


class ShadowRunner:
    """Runs ``candidate`` in a child process on sampled copies of the requests ``primary_version`` answered."""

    def __init__(
        self,
        candidate: ShadowModel,
        primary_version: str,
        rate: float,
        *,
        reference: ShadowModel | None = None,
        queue_size: int = QUEUE_SIZE,
        isolation: Isolation | None = None,
        resume: Mapping[str, Any] | None = None,
    ) -> None:
        """``reference``: the active version, loaded privately in the child and timed beside the candidate
        (None: the live time). ``resume``: a ``state()`` saved before a restart, to go on from.
        ``isolation``: how the child starts (``inference.childproc``; default forkserver).
        """
        self.candidate = candidate
        self.reference = reference
        self.primary_version = primary_version
        self.rate = rate
        self.queue_size = queue_size
        self.dropped = 0
        self.failure: str | None = None  # set when the child could not load the versions or died
        self.ready = threading.Event()  # set once the child has loaded both versions (copies flow from then on)
        self._sampling = False  # ``ready`` as a plain attribute: the request path reads it on every request
        self.child_pid: int | None = None
        self._child: Child | None = None
        self._options = candidate.options or RuntimeOptions(num_threads=1, pool_size=1)
        self._isolation = isolation
        self._pending: deque[Sample] = deque()  # appended by the request path, drained by the shipping thread
        self._ring: Ring | None = None  # copies of the first stackable copy's signature (``ring``)
        self._ring_lock = threading.Lock()
        self._no_ring = False  # set when a ring could not be made
        self._ring_sent = False  # the child has the ring's descriptor (the shipping thread sends it once)
        self._random = random.Random()
        self._state: dict[str, Any] | None = dict(resume) if resume else None
        self._figures = child.Tally(resume).to_dict()  # the child's last report (replaced whole: no lock needed)
        self.priority: str | None = None  # the child's priority, "idle" or "nice" (``priority``)
        self._waiting_since: float | None = None  # the first hand-over since the child last said anything
        self._stop = threading.Event()
        self._wake = os.pipe()  # written by ``stop``: the shipping thread's wait ends at once
        self._thread = threading.Thread(target=self._ship, name=f"shadow-{candidate.name}", daemon=True)
        self._thread.start()

    # -- the request path -------------------------------------------------------------
    def offer(
        self, version: str, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], s: float
    ) -> None:
        """A request the active version answered; copied to the candidate with probability ``rate``
        once the child has loaded both versions (before that, nothing is sampled or counted)."""
        if not self._sampling or version != self.primary_version:
            return
        if self.rate < 1.0 and self._random.random() >= self.rate:
            return
        ring = self._ring
        if ring is None and fits(inputs, outputs) and not self._no_ring:
            ring = self._make_ring(inputs, outputs)
        if ring is not None and ring.matches(inputs, outputs):
            if not ring.put(inputs, outputs, s):
                self.dropped += 1
            return
        if len(self._pending) >= self.queue_size:
            self.dropped += 1  # the figure is a count; a lost increment under a race is harmless
            return
        self._pending.append((inputs, outputs, s))

    def _make_ring(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> Ring | None:
        with self._ring_lock:  # once: a second ring made by a racing request would lose its copies
            if self._ring is None and not self._no_ring:
                try:
                    self._ring = Ring(inputs, outputs)
                except OSError as exc:  # no shared memory (fds or memory exhausted): the general way
                    self._no_ring = True
                    log.warning("shadow of %s: no shared copy ring (%s); copies are sent", self.candidate.name, exc)
            return self._ring

    # -- the shipping thread ------------------------------------------------------------
    def _ship(self) -> None:
        try:
            proc = Child(child.serve_forked, child.MODULE, child.SHADOW_COMMAND, self._isolation, [child.MODULE])
        except Exception as exc:  # no process could be started: the verdict rejects with the reason
            self.fail(f"shadow process could not start: {exc}")
            return
        self.child_pid, self._child = proc.pid, proc
        try:
            setup = {
                "candidate": self.candidate.spec(),
                "reference": None if self.reference is None else self.reference.spec(),
                "options": options_to_json(self._options),
                "resume": self._state,
                "idle": IDLE,
            }
            proc.conn.send_bytes(json.dumps(setup).encode())
            self._loop(proc)
        except (EOFError, OSError):
            if not self._stop.is_set():
                self.fail(f"shadow process died ({_reason(proc)})")
        finally:
            proc.stop(STOP_TIMEOUT_S)

    def _loop(self, proc: Child) -> None:
        """Ship every ``BATCH_EVERY_S`` and read the child's answers as they come, until stopped. Every
        step is cheap for the GIL: a ``select.poll`` (``Connection.poll`` builds a selector per call),
        a few bytes naming the ring's slots, packs of ``SHIP_CHUNK`` queued copies and their writes."""
        poller = select.poll()
        poller.register(proc.conn.fileno(), select.POLLIN)
        poller.register(self._wake[0], select.POLLIN)  # ``stop``
        room = select.poll()  # the child's socket takes more now (a starved child must not block the watcher)
        room.register(proc.conn.fileno(), select.POLLOUT)
        due = time.monotonic() + BATCH_EVERY_S
        while not self._stop.is_set():
            wait = due - time.monotonic()
            if wait > 0:
                for fd, _ in poller.poll(wait * 1e3):
                    if fd == proc.conn.fileno() and not self._answer(proc):  # EOFError once the child is gone
                        return
                continue
            due = time.monotonic() + BATCH_EVERY_S
            self._watch(proc)
            ring, pending = self._ring, self._pending
            if ring is not None:
                self._publish(proc, ring)
            while pending and not self._stop.is_set() and room.poll(0):  # only filled once ready (``offer``)
                proc.conn.send_bytes(pack([pending.popleft() for _ in range(min(SHIP_CHUNK, len(pending)))]))
                self._handed()
                if pending:
                    time.sleep(PAUSE_S)  # a request waiting for the GIL gets it between chunks

    def _handed(self) -> None:
        if self._waiting_since is None:
            self._waiting_since = time.monotonic()

    def _watch(self, proc: Child) -> None:
        """Give a ``SCHED_IDLE`` child nice 10 back once a hand-over has waited ``priority.STARVED_S`` with no word
        from it (a saturated CPU): from here, at normal priority, as it cannot do so itself without CPU time."""
        since = self._waiting_since
        if self.priority != priority.IDLE or since is None or time.monotonic() - since < priority.STARVED_S:
            return
        if proc.pid is not None and priority.restore(proc.pid):
            self.priority = priority.NICE_NAME
            log.warning("shadow of %s: the idle-priority child starved; it runs at nice %d from now on",
                        self.candidate.name, priority.NICE)  # fmt: skip
        else:
            self._waiting_since = None  # refused (or gone): looked at again after the next hand-over

    def _answer(self, proc: Child) -> bool:
        """One message from the child: ready, an error (False: the shadow ends), figures, freed ring slots."""
        report = json.loads(proc.conn.recv_bytes())
        self._waiting_since = None  # the child is not starved
        if "error" in report:
            self.fail(f"shadow process could not load the versions: {report['error']}")
            return False
        freed = report.pop("freed", None)
        if freed is not None and self._ring is not None:
            self._ring.free(int(freed))
        if report.get("ready"):
            self.priority = report.get("priority")
            self._sampling = True
            self.ready.set()
        elif report:
            self._state = report.pop("state", None)
            told = report.pop("priority", self.priority)
            self.priority = self.priority if self.priority == priority.NICE_NAME else told  # given back: for good
            self._figures = report
        return True

    def _publish(self, proc: Child, ring: Ring) -> None:
        """Hand the ring to the child once, then name the slots filled since the last wake-up (a few bytes)."""
        if not self._ring_sent:
            proc.conn.send_bytes(control({"ring": ring.layout()}))
            send_handle(proc.conn, ring.fd, proc.pid)
            self._ring_sent = True
        span = ring.publish()
        if span is not None:
            proc.conn.send_bytes(control({"slots": list(span)}))
            self._handed()

    def fail(self, reason: str) -> None:
        """Mark the shadow failed (the verdict rejects with ``reason``); the first reason wins."""
        if self.failure is None:
            self.failure = reason
        log.warning("shadow of %s %s: %s", self.candidate.name, self.candidate.version, reason)

    # -- readers --------------------------------------------------------------------------
    def figures(self) -> ShadowFigures:
        """The figures so far (the child's last answer, and the copies dropped here and the child's priority)."""
        return ShadowFigures(**self._figures, dropped=self.dropped, priority=self.priority)

    def state(self) -> dict[str, Any] | None:
        """What a restarted agent resumes from (``ShadowRunner(..., resume=...)``); None before any figures."""
        return self._state

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop shipping and end the child (queued copies are discarded)."""
        if self._stop.is_set():
            return
        self._stop.set()
        os.write(self._wake[1], b"x")
        self._thread.join(timeout_s)
        if self._thread.is_alive() and self._child is not None:  # blocked sending to a child that gets no CPU
            self._child.kill()
            self._thread.join(timeout_s)
        self._pending.clear()
        if not self._thread.is_alive():
            for fd in self._wake:
                os.close(fd)


def _reason(proc: Child) -> str:
    """How the child ended (its exit code may take a moment to be collected after the connection broke)."""
    deadline = time.monotonic() + 1.0
    while proc.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.01)
    code = proc.exitcode
    return "no exit status yet" if code is None else exit_reason(code)
