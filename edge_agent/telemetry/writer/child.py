"""The telemetry writer process: the outbox's only writer while the agent runs.

Started by ``telemetry.writer.remote.RemoteOutbox`` through ``inference.childproc.Child`` (forked from
the shared forkserver; a frozen agent re-runs its binary with ``__telemetry_writer__ --fd N``).
It serves one request at a time over its connection and answers each one::

    ("open", Spec)                                  -> ("ok", writer_token, ...)
    ("write", token, Packed, extra, labels, overflow, rates)
                                                    -> ("ok", rows written, ...)
    ("append", token, rows, labels) | ("ack", seq) | ("delete", seq, kind) | ("count_drop", kind, n)
    | ("forget_old_labels",)                        -> ("ok", the Outbox method's result, ...)
    ("close",)                                      -> ("ok", None, ...), then it exits

Every ``"ok"`` answer is ``("ok", value, drops, drift results, (rows, bytes), cpu_s)``: what the
bound dropped during the call (the agent counts them in ``edgefleet_outbox_dropped_total``), the
drift windows the call closed, the outbox's usage after it, and this process's CPU seconds so far.
A failure answers ``("error", message)`` (an ``OutboxError`` in the agent). The process runs at a
lower priority (``NICE``) than the agent, and dies with it (``die_with_parent``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from edge_agent.errors import EdgeError
from edge_agent.inference.childproc import die_with_parent, fd_main, lower_priority
from edge_agent.telemetry.drift import DriftMonitor, DriftResult
from edge_agent.telemetry.outbox import Outbox, Quota
from edge_agent.telemetry.pacing import Pacing
from edge_agent.telemetry.writer.columns import Key, unpack
from edge_agent.telemetry.writer.local import LocalWriter
from edge_agent.wire.model.manifest import Manifest

COMMAND = "__telemetry_writer__"  # hidden first argument of a frozen edge-agent binary
MODULE = "edge_agent.telemetry.writer.child"  # ``python -m`` name of this module (subprocess mode)
NICE = 5  # below serving: on a busy device the agent's requests come first


@dataclass(frozen=True)
class Spec:
    """What the writer process opens: the outbox file and its bound, and the drift settings (None: off)."""

    path: str
    max_rows: int | None
    max_bytes: int | None
    quotas: dict[str, Quota]
    drift: dict[str, Any] | None  # DriftMonitor keyword arguments
    paced: bool


class _Server:
    def __init__(self, spec: Spec) -> None:
        self.drops: dict[str, int] = {}
        self.results: list[DriftResult] = []
        self.outbox = Outbox(
            spec.path, max_rows=spec.max_rows, max_bytes=spec.max_bytes, on_drop=self._on_drop, quotas=spec.quotas
        )
        self.rates: dict[str, float | None] = {}
        pacing = (
            Pacing(lambda m: None, self.rates.get, default_interval_s=1.0, tick_s=1.0) if spec.paced else None
        )  # only its max_bps share runs here; which predictions are due is the agent's (Recorder.flush)
        drift = DriftMonitor(**spec.drift) if spec.drift is not None else None
        self.writer = LocalWriter(self.outbox, drift=drift, on_drift=self.results.append, pacing=pacing)
        self.manifests: dict[Key, Manifest] = {}

    def _on_drop(self, kind: str, n: int) -> None:
        self.drops[kind] = self.drops.get(kind, 0) + n

    def handle(self, msg: tuple[Any, ...]) -> Any:
        op = msg[0]
        if op == "write":
            _, token, packed, extra, labels, overflow, rates = msg
            self.rates.update(rates)
            return self.writer.write(unpack(packed, self.manifests), extra, labels, overflow, token)
        if op == "append":
            return self.outbox.append(msg[2], msg[3], token=msg[1])
        if op in ("ack", "delete", "count_drop", "forget_old_labels"):
            return getattr(self.outbox, op)(*msg[1:])
        raise ValueError(f"unknown telemetry writer request {op!r}")

    def answer(self, value: Any) -> tuple[Any, ...]:
        drops, self.drops = self.drops, {}
        results, self.results[:] = list(self.results), []
        return ("ok", value, drops, results, tuple(self.outbox.usage.total), time.process_time())


def serve(conn: Connection) -> None:
    """Answer the agent's requests until it closes the connection or sends ``close``."""
    die_with_parent()
    lower_priority(NICE)
    server: _Server | None = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the agent is gone
            break
        try:
            if msg[0] == "open":
                server = _Server(msg[1])
                conn.send(server.answer(server.outbox.writer_token()))
                continue
            if server is None:
                raise ValueError("telemetry writer: 'open' first")
            if msg[0] == "close":
                server.outbox.close()
                conn.send(("ok", None, {}, [], (0, 0), time.process_time()))
                break
            conn.send(server.answer(server.handle(msg)))
        except (EdgeError, ValueError) as exc:
            conn.send(("error", str(exc)))
    if server is not None:
        server.outbox.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_agent.telemetry.writer.child --fd N``: serve on the inherited descriptor (subprocess mode)."""
    return fd_main(argv, MODULE, "The agent's telemetry writer process (started by the agent).", serve)


if __name__ == "__main__":
    sys.exit(main())
