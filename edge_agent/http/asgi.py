"""The ASGI plumbing of the API: reading a request body within the limit, and writing responses and errors.

Kept apart from the routes so the app reads as "which route does what". An error's status
comes from ``errors.http_status`` (the one exception → status table); only a 500 is logged,
because only a 500 is the server's own fault.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from edge_agent.errors import (
    ClientGone,
    MethodNotAllowedError,
    PayloadTooLargeError,
    RequestError,
    UnsupportedMediaTypeError,
    http_status,
)
from edge_agent.wire import kserve_v2 as v2

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON = b"application/json"
OCTETS = b"application/octet-stream"


async def send_response(
    send: Send, status: int, body: bytes, content_type: bytes = JSON, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    """One complete response: start (status, type, length, ``extra`` headers) and body."""
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, exc: BaseException, scope: Scope) -> tuple[int, str]:
    """Answer ``{"error": message}`` with the exception's status; return (status, metrics reason)."""
    status, reason = http_status(exc)
    extra: list[tuple[bytes, bytes]] = []
    if status == 500:
        log.error("%s %s failed", scope.get("method"), scope.get("path"), exc_info=exc)
        message = f"internal error: {type(exc).__name__}: {exc}"
    else:
        message = str(exc)
    if isinstance(exc, MethodNotAllowedError):
        extra.append((b"allow", exc.allowed.encode()))
    try:
        await send_response(send, status, v2.dumps({"error": message}), JSON, extra)
    except Exception:  # the client is gone; nothing left to tell it
        log.debug("could not send error response", exc_info=True)
    return status, reason


async def read_body(receive: Receive, content_length: bytes | None, limit: int) -> bytes:
    """The whole request body; PayloadTooLargeError as soon as it is known to be over ``limit``."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise RequestError(f"invalid Content-Length {content_length[:40]!r}") from None
        if declared > limit:
            raise PayloadTooLargeError(f"request body of {declared} bytes is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body is over the {limit}-byte limit")
        if not message.get("more_body", False):
            if not chunks:
                return chunk  # the usual case: one message, no copy
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


def decode_content(body: bytes, encoding: bytes, limit: int) -> bytes:
    """Undo a gzip/deflate Content-Encoding (tritonclient's request compression), within the body limit."""
    enc = encoding.strip().lower()
    if enc == b"identity":
        return body
    if enc not in (b"gzip", b"deflate"):
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {enc.decode('latin-1')!r} is not supported; use gzip or deflate"
        )
    decoder = zlib.decompressobj(wbits=31 if enc == b"gzip" else 15)
    try:
        out = decoder.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestError(f"cannot decode the {enc.decode()} request body: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLargeError(f"decompressed request body is over the {limit}-byte limit")
    if not decoder.eof:
        raise RequestError(f"the {enc.decode()} request body is truncated")
    return out
