"""Connection limits uvicorn lacks: a read timeout, and room for new clients when connections run out.

uvicorn answers requests above ``limit_concurrency`` with 503, but only once their headers are
complete, and has no header timeout: a client that opens connections and never finishes a request
(slowloris) holds a file descriptor each, for ever, until the process hits its fd limit (the
model watcher then fails with EMFILE). :class:`GuardedProtocol` is uvicorn's httptools protocol
with two additions:

- **read timeout**: a request's headers and body must arrive within ``read_timeout_s`` of the
  connection opening (or of its first byte, on a kept-alive connection). Past it, a connection
  still sending headers gets ``408 {"error": ...}`` and is closed; one still sending its body is
  closed (the app sees the client gone). Like Go's ``http.Server.ReadTimeout``. A request only
  writes its deadline (one clock read); one sweep per server, every ``read_timeout_s / 4`` (at
  most 1 s) while connections are open, closes the late ones, so a timeout fires up to a sweep
  interval late. A timer armed and cancelled per request cost ~1-2 µs (docs/benchmarks.md).
- **eviction**: a new connection that finds ``limit_concurrency`` connections open closes the
  one that has waited longest without a request in progress (half-sent headers or idle
  keep-alive) instead of being turned away, so legitimate clients get through a slowloris while
  the number of open sockets stays bounded. Connections running a request are never cut.

Build the class with :func:`guarded_protocol` and pass it as uvicorn's ``http``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from edge_agent.wire import kserve_v2 as v2


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a read timeout and eviction of idle connections."""

    read_timeout_s: float = 10.0
    _deadline: float | None = None  # the request being read must have arrived by then (None: not reading)
    _waiting_since: float | None = None  # no request running since then: may be evicted
    _sending = True  # a request has begun arriving (False: idle keep-alive, closed silently)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        limit = self.limit_concurrency
        if limit is not None and len(self.connections) >= limit - 1:  # uvicorn counts this one too
            _evict_oldest_idle(self.connections)
        super().connection_made(transport)
        self._waiting_since = now = time.monotonic()
        self._deadline = now + self.read_timeout_s
        _Sweep.ensure(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline = self._waiting_since = None
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        self._sending = True
        super().on_message_begin()
        if self._deadline is None:
            self._deadline = time.monotonic() + self.read_timeout_s

    def on_headers_complete(self) -> None:
        self._waiting_since = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._deadline = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._waiting_since = time.monotonic()
            self._sending = False

    # -- the read timeout -------------------------------------------------------------
    def _read_timeout(self) -> None:
        """Called by the sweep once ``_deadline`` has passed."""
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._waiting_since is not None:  # still sending headers: tell it why
            self.close_with(408, f"request not received within {self.read_timeout_s:g} s")
        else:  # headers done, body too slow: the app sees a disconnect
            self.transport.close()

    def close_with(self, status: int, message: str) -> None:
        """Write one ``{"error"}`` response and close the connection (no request is running)."""
        body = v2.dumps({"error": message})
        reason = {408: b"Request Timeout", 503: b"Service Unavailable"}.get(status, b"Error")
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        self.transport.write(head % (status, reason, len(body)) + body)
        self.transport.close()


def _evict_oldest_idle(connections: Any) -> None:
    """Close the guarded connection idle longest (no request running); none idle: nothing happens."""
    idle = [c for c in connections if isinstance(c, GuardedProtocol) and c._waiting_since is not None]
    if idle:
        victim = min(idle, key=lambda c: c._waiting_since or 0.0)
        victim._waiting_since = victim._deadline = None
        connections.discard(victim)  # now: its connection_lost may run after the new request is counted
        if victim._sending:
            victim.close_with(503, "too many connections: this unfinished request was dropped for a new client")
        else:
            victim.transport.close()


class _Sweep:
    """One per server (its ``ServerState``): closes the guarded connections past their deadline, every ``interval``."""

    def __init__(self, proto: GuardedProtocol) -> None:
        self.loop, self.connections = proto.loop, proto.connections
        self.interval = min(1.0, proto.read_timeout_s / 4)
        self.handle: asyncio.TimerHandle | None = None

    @staticmethod
    def ensure(proto: GuardedProtocol) -> None:
        """Start the sweep of ``proto``'s server if it is not running (on a new connection)."""
        state = proto.server_state
        sweep = getattr(state, "_edgefleet_sweep", None)
        if sweep is None:
            sweep = _Sweep(proto)
            state._edgefleet_sweep = sweep  # type: ignore[attr-defined]
        if sweep.handle is None:
            sweep.handle = sweep.loop.call_later(sweep.interval, sweep.run)

    def run(self) -> None:
        now = time.monotonic()
        guarded = [c for c in self.connections if isinstance(c, GuardedProtocol)]
        for c in guarded:
            if c._deadline is not None and c._deadline <= now:
                c._read_timeout()
        # Keep sweeping while connections are open; the next connection starts it again.
        self.handle = self.loop.call_later(self.interval, self.run) if guarded else None


def guarded_protocol(read_timeout_s: float) -> type[GuardedProtocol]:
    """A :class:`GuardedProtocol` subclass with this read timeout, to pass as ``uvicorn.Config(http=...)``."""
    return type("GuardedProtocol", (GuardedProtocol,), {"read_timeout_s": float(read_timeout_s)})
