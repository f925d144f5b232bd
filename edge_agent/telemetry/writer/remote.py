"""The outbox as the agent sees it while a writer process owns it (``telemetry.writer.child``).

Why a process: building rows, drift windows and the SQLite transaction cost the telemetry thread
~15-30 µs of CPU per prediction, and in the agent every one of them was GIL time taken from
serving, with a GIL hand-off per SQLite step on top (docs/benchmarks.md, "Telemetry"). Here the
agent's side of a flush is :func:`columns.pack` and one pickled message; the writer process does
the rest on its own interpreter and answers when the rows are committed.

:class:`RemoteOutbox` has the methods of :class:`~edge_agent.telemetry.outbox.Outbox`: every write
(``append``, ``ack``, ``delete``, ``count_drop``, and :meth:`write`, the recorder's flush) is one
request answered after the writer's commit, so every guarantee holds as before (a feedback label
is committed before its 200, a seq comes from the one AUTOINCREMENT, the bound and its drop
counts run in the writer's transaction); reads (``read_after``, ``has_label``, ...) use this
process's own read-only use of the same file (WAL: readers never wait for the writer).

When the writer process dies (a crash, a kill, no answer within ``RPC_TIMEOUT_S``), the request
is retried on a new one unless it already committed: each write carries a ``token`` the writer
stores in the same transaction (``meta.writer_token``), so nothing is written twice. After
``MAX_RESTARTS`` restarts within ``RESTART_WINDOW_S``, or when no process can be started (e.g. a
frozen binary without the hidden command), the outbox falls back to a ``LocalWriter`` on the
agent's own telemetry thread: slower, never off. Restarts and the fallback are logged and counted
(``on_restart``; ``/agent/status``). A dead writer's open drift windows are lost (it holds them).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge_agent.errors import OutboxError, WriterLost
from edge_agent.inference.childproc import Child, Isolation, exit_reason
from edge_agent.telemetry.drift import DriftMonitor, DriftResult
from edge_agent.telemetry.outbox import Outbox, OutboxStats, Row
from edge_agent.telemetry.pacing import Pacing
from edge_agent.telemetry.rows import Item
from edge_agent.telemetry.writer.child import COMMAND, MODULE, Spec, serve
from edge_agent.telemetry.writer.columns import Key, pack
from edge_agent.telemetry.writer.local import LocalWriter

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 30.0  # a writer that has not answered by then is killed and replaced
START_TIMEOUT_S = 60.0  # the first child may wait for the forkserver's imports
MAX_RESTARTS = 3
RESTART_WINDOW_S = 600.0


class RemoteOutbox:
    """An outbox written by a child process; see the module doc."""

    def __init__(
        self,
        spec: Spec,
        *,
        on_drop: Callable[[str, int], None],
        on_drift: Callable[[DriftResult], None],
        drift: DriftMonitor | None = None,
        pacing: Pacing | None = None,
        on_restart: Callable[[], None] | None = None,
        isolation: Isolation | None = None,
    ) -> None:
        self.spec, self.path = spec, Path(spec.path)
        self.max_rows, self.max_bytes, self.quotas = spec.max_rows, spec.max_bytes, dict(spec.quotas)
        self.on_drop, self.on_drift, self.on_restart = on_drop, on_drift, on_restart
        self.drift, self.pacing, self.isolation = drift, pacing, isolation
        self.restarts = 0
        self._lock = threading.Lock()
        self._child: Child | None = None
        self._known: set[Key] = set()  # manifests this child has
        self._rated: set[str] = set()  # models whose max_bps this child has
        self._recent: deque[float] = deque()
        self._local: LocalWriter | None = None
        self._usage: tuple[int, int] = (0, 0)
        self._cpu_done = self._cpu_now = 0.0
        with self._lock:
            try:
                self._token = self._spawn()
            except WriterLost as exc:  # in-process next; an outbox that cannot be opened raises OutboxError there
                self.restarts += 1
                if on_restart is not None:
                    on_restart()
                self._fall_back(f"could not start: {exc}")
                self._token = 0
        try:
            self._reader = Outbox(self.path)  # this process's reads (WAL: never waits for the writer)
        except OutboxError:
            if self._child is not None:
                self._child.stop(1.0)
            raise

    # -- status -------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """``process``, or ``thread`` after the fallback."""
        return "thread" if self._local is not None else "process"

    @property
    def child_cpu_s(self) -> float:
        """CPU seconds of every writer process so far (as each last reported it)."""
        return self._cpu_done + self._cpu_now

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None else None

    # -- writes: one request each, answered after the commit ---------------------------------
    def write(
        self, items: list[Item], extra: list[Row] | None, labels: list[tuple[str, str]] | None, overflow: int
    ) -> int:
        """The recorder's flush (``recorder.Writer``): ``items`` packed into columns, committed by the child."""
        drift_on = self.drift is not None
        result = self._call(
            lambda token: (
                "write",
                token,
                pack(items, self._known, drift_on),
                extra,
                labels,
                overflow,
                self._rates(items),
            ),
            lambda w: w.write(items, extra, labels, overflow),
        )
        return int(result or 0)

    def append(self, rows: list[Row], labels: list[tuple[str, str]] | None = None, **_: object) -> int:
        """``Outbox.append`` in the writer (its ``token`` and ``drops`` are this class's own business)."""
        result = self._call(lambda tok: ("append", tok, rows, labels), lambda w: w.outbox.append(rows, labels))
        return int(result or 0)

    def ack(self, acked_seq: int) -> int:
        return int(self._call(lambda _: ("ack", acked_seq), lambda w: w.outbox.ack(acked_seq), idempotent=True) or 0)

    def delete(self, seq: int, kind: str) -> None:
        self._call(lambda _: ("delete", seq, kind), lambda w: w.outbox.delete(seq, kind), idempotent=True)

    def count_drop(self, kind: str, n: int) -> None:
        self._call(lambda _: ("count_drop", kind, n), lambda w: w.outbox.count_drop(kind, n), idempotent=True)

    def forget_old_labels(self) -> None:
        self._call(lambda _: ("forget_old_labels",), lambda w: w.outbox.forget_old_labels(), idempotent=True)

    def close(self) -> None:
        with self._lock:
            child, self._child = self._child, None
            if child is not None:
                try:
                    child.conn.send(("close",))
                    if child.conn.poll(RPC_TIMEOUT_S):
                        child.conn.recv()
                except (EOFError, OSError):
                    pass
                child.stop(5.0)
            if self._local is not None:
                self._local.outbox.close()
        self._reader.close()

    # -- reads: this process's connection ------------------------------------------------------
    def read_after(self, seq: int, limit_bytes: int, limit_rows: int = 10_000) -> list[tuple[int, str, float, str]]:
        return self._reader.read_after(seq, limit_bytes, limit_rows)

    def find_prediction(self, request_id: str) -> str | None:
        return self._reader.find_prediction(request_id)

    def has_label(self, request_id: str) -> bool:
        return self._reader.has_label(request_id)

    def acked_seq(self) -> int:
        return self._reader.acked_seq()

    def dropped(self) -> dict[str, int]:
        return self._reader.dropped()

    def stats(self) -> OutboxStats:
        """As ``Outbox.stats``; rows and bytes as the writer counted them after its newest commit."""
        if self._local is not None:
            return self._local.outbox.stats()
        rows, size = self._usage
        return replace(self._reader.stats(), rows=rows, bytes=size)

    # -- the process ------------------------------------------------------------------------------
    def _rates(self, items: list[Item]) -> dict[str, float | None]:
        """``max_bps`` of the models in ``items`` this child has not been told yet."""
        if self.pacing is None:
            return {}
        new: dict[str, float | None] = {}
        for item in items:
            name = item[0].name
            if name not in self._rated:
                self._rated.add(name)
                new[name] = self.pacing.rates(name)
        return new

    def _call(
        self,
        request: Callable[[int], tuple[Any, ...]],
        local: Callable[[LocalWriter], Any],
        *,
        idempotent: bool = False,
    ) -> Any:
        """Send ``request(token)`` to the writer and return its answer's value; retried once on a new writer.

        A request that is not ``idempotent`` carries a fresh token: when the writer dies before
        answering, the token in the outbox tells whether it committed (then it is not sent again).
        """
        with self._lock:
            while True:  # ends: every failure counts, and past MAX_RESTARTS the fallback answers
                if self._local is not None:
                    return local(self._local)
                token = 0 if idempotent else self._token + 1
                try:
                    child = self._child
                    if child is None:
                        self._token = max(self._token, self._spawn())
                        continue
                    value = self._ask(child, request(token))
                    if token:
                        self._token = token
                    return value
                except WriterLost as exc:
                    committed = bool(token) and self._reader.writer_token() >= token
                    self._lost(str(exc))
                    if committed:
                        self._token = token
                        return None  # it committed, then died: done (its answer, e.g. drift results, is lost)

    def _ask(self, child: Child, msg: tuple[Any, ...]) -> Any:
        try:
            child.conn.send(msg)
            if not child.conn.poll(RPC_TIMEOUT_S):
                raise WriterLost(f"no answer within {RPC_TIMEOUT_S:g}s")
            reply = child.conn.recv()
        except (EOFError, OSError) as exc:
            code = child.exitcode
            raise WriterLost(exit_reason(code) if code is not None else f"{type(exc).__name__}: {exc}") from exc
        if reply[0] != "ok":
            raise OutboxError(f"telemetry writer: {reply[1]}")
        _, value, drops, results, usage, cpu = reply
        self._usage, self._cpu_now = usage, cpu
        for kind, n in drops.items():
            self.on_drop(kind, n)
        for result in results:
            if self.drift is not None:
                self.drift.remember(result)
            self.on_drift(result)
        return value

    def _spawn(self) -> int:
        """Start a writer process and open the outbox in it; its current writer token."""
        try:
            child = Child(serve, MODULE, COMMAND, self.isolation, preload=(MODULE,))
        except OSError as exc:
            raise WriterLost(f"{type(exc).__name__}: {exc}") from exc
        self._known.clear()
        self._rated.clear()
        self._cpu_done += self._cpu_now
        self._cpu_now = 0.0
        try:
            child.conn.send(("open", self.spec))
            if not child.conn.poll(START_TIMEOUT_S):
                raise WriterLost(f"not ready within {START_TIMEOUT_S:g}s")
            reply = child.conn.recv()
        except (EOFError, OSError, WriterLost) as exc:
            child.stop(1.0)
            raise WriterLost(str(exc) or type(exc).__name__) from exc
        if reply[0] != "ok":  # it cannot open the outbox: counted like a crash (the fallback then tries here)
            child.stop(5.0)
            raise WriterLost(f"cannot open the outbox: {reply[1]}")
        self._child = child
        self._usage = reply[4]
        log.info("telemetry writer process %s started (%s)", child.pid, child.mode)
        return int(reply[1])

    def _lost(self, why: str) -> None:
        """Forget a dead writer, count it, and fall back past MAX_RESTARTS within RESTART_WINDOW_S."""
        child, self._child = self._child, None
        if child is not None:
            child.stop(1.0)
        now = time.monotonic()
        self._recent.append(now)
        while self._recent and now - self._recent[0] > RESTART_WINDOW_S:
            self._recent.popleft()
        self.restarts += 1
        if self.on_restart is not None:
            self.on_restart()
        if len(self._recent) > MAX_RESTARTS:
            self._fall_back(f"{len(self._recent)} failures within {RESTART_WINDOW_S:g}s, the last: {why}")
        else:
            log.error("telemetry writer process lost (%s); starting another", why)

    def _fall_back(self, why: str) -> None:
        log.error("telemetry writer process %s: writing on the agent's telemetry thread from now on", why)
        outbox = Outbox(
            self.path, max_rows=self.max_rows, max_bytes=self.max_bytes, on_drop=self.on_drop, quotas=self.quotas
        )
        self._local = LocalWriter(outbox, drift=self.drift, on_drift=self.on_drift, pacing=self.pacing)


Store = Outbox | RemoteOutbox  # an outbox as the recorder and the uploader see it
