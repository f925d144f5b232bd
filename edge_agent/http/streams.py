"""The stream routes of the agent API (``edge_agent/streams``)::

    GET /agent/streams                  {"streams": [status, ...]}: state, fps in/processed, drops, last error
    GET /agent/streams/{id}/latest      the newest result, its frame's timestamp and age (503 before the first)
    GET /agent/streams/{id}/events      Server-Sent Events: one ``result`` event per processed frame

An agent without ``[[streams]]`` answers the list with ``[]`` and every stream id with 404.
An SSE client that reads too slowly loses the oldest queued events, never stalls the stream. Feeds end
(cleanly, within a second) when the agent shuts down, so the drain never waits for SSE clients.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import TYPE_CHECKING, Any

from edge_agent.errors import MethodNotAllowedError, NotFoundError, NotReadyError
from edge_agent.http.asgi import Receive, Scope, Send, send_error, send_response
from edge_agent.wire import kserve_v2 as v2

if TYPE_CHECKING:
    from edge_agent.streams.manager import StreamManager
    from edge_agent.streams.runner import Stream

PREFIX = "/agent/streams"
SSE_QUEUE = 32  # events buffered per client
KEEPALIVE_S = 15.0
_POLL_S = 1.0  # how often an idle SSE connection checks that its stream still runs


async def handle(scope: Scope, receive: Receive, send: Send, manager: StreamManager | None) -> None:
    """Route one request under ``/agent/streams``."""
    path: str = scope["path"].rstrip("/")
    parts = path[len(PREFIX) :].strip("/").split("/") if path != PREFIX else []
    try:
        if scope["method"] not in ("GET", "HEAD"):
            raise MethodNotAllowedError(scope["method"], path, "GET, HEAD")
        if not parts:
            streams = manager.status() if manager is not None else []
            await send_response(send, 200, v2.dumps({"streams": streams}))
            return
        if len(parts) != 2 or parts[1] not in ("latest", "events"):
            raise NotFoundError(f"no route for GET {path}")
        if manager is None:
            raise NotFoundError(f"unknown stream {parts[0]!r} (no streams are configured)")
        stream = manager.get(parts[0])
        if parts[1] == "latest":
            doc = stream.latest()
            if doc is None:
                raise NotReadyError(f"stream {stream.cfg.id!r} has no result yet (state: {stream.state})")
            await send_response(send, 200, v2.dumps(doc))
            return
    except Exception as exc:
        await send_error(send, exc, scope)
        return
    if scope["method"] == "HEAD":
        await send_response(send, 200, b"", b"text/event-stream")
        return
    await _events(receive, send, stream, manager.closing)


def _event(doc: dict[str, Any]) -> bytes:
    return b"event: result\ndata: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


async def _events(receive: Receive, send: Send, stream: Stream, closing: threading.Event) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=SSE_QUEUE)

    def put(doc: dict[str, Any]) -> None:  # on the event loop
        if queue.full():
            queue.get_nowait()  # a slow client loses the oldest event
        queue.put_nowait(doc)

    def push(doc: dict[str, Any]) -> None:  # on the stream's inference thread
        loop.call_soon_threadsafe(put, doc)

    unsubscribe = stream.subscribe(push)
    gone = asyncio.ensure_future(_disconnected(receive))
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    try:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        latest = stream.latest()
        if latest is not None:
            await send({"type": "http.response.body", "body": _event(latest), "more_body": True})
        idle = 0.0
        while not gone.done() and not closing.is_set():
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, gone}, timeout=_POLL_S, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                idle = 0.0
                await send({"type": "http.response.body", "body": _event(getter.result()), "more_body": True})
                continue
            getter.cancel()
            idle += _POLL_S
            if idle >= KEEPALIVE_S:
                idle = 0.0
                await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
        if not gone.done():
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except OSError:
        pass  # the client went away mid-write
    finally:
        unsubscribe()
        gone.cancel()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
