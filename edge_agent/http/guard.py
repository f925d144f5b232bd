"""Connection limits uvicorn lacks: a read timeout, and room for new clients when connections run out.

uvicorn answers requests above ``limit_concurrency`` with 503, but only once their headers are
complete, and has no header timeout: a client that opens connections and never finishes a request
(slowloris) holds a file descriptor each, for ever, until the process hits its fd limit (the
model watcher then fails with EMFILE). :class:`GuardedProtocol` is uvicorn's httptools protocol
with two additions:

- **read timeout**: a request's headers and body must arrive within ``read_timeout_s`` of the
  connection opening (or of its first byte, on a kept-alive connection). Past it, a connection
  still sending headers gets ``408 {"error": ...}`` and is closed; one still sending its body is
  closed (the app sees the client gone). Like Go's ``http.Server.ReadTimeout``.
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
    _read_timer: asyncio.TimerHandle | None = None
    _waiting_since: float | None = None  # no request running since then: may be evicted
    _sending = True  # a request has begun arriving (False: idle keep-alive, closed silently)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        limit = self.limit_concurrency
        if limit is not None and len(self.connections) >= limit - 1:  # uvicorn counts this one too
            _evict_oldest_idle(self.connections)
        super().connection_made(transport)
        self._waiting_since = time.monotonic()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._waiting_since = None
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        self._sending = True
        super().on_message_begin()
        if self._read_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._waiting_since = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._waiting_since = time.monotonic()
            self._sending = False

    # -- timers ---------------------------------------------------------------------
    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timeout)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timeout(self) -> None:
        self._read_timer = None
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
        victim._waiting_since = None
        victim._disarm()
        connections.discard(victim)  # now: its connection_lost may run after the new request is counted
        if victim._sending:
            victim.close_with(503, "too many connections: this unfinished request was dropped for a new client")
        else:
            victim.transport.close()


def guarded_protocol(read_timeout_s: float) -> type[GuardedProtocol]:
    """A :class:`GuardedProtocol` subclass with this read timeout, to pass as ``uvicorn.Config(http=...)``."""
    return type("GuardedProtocol", (GuardedProtocol,), {"read_timeout_s": float(read_timeout_s)})
