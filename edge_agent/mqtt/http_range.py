"""The artifact's second transport: HTTP(S) Range requests for runs of missing chunks.

When a release's ``Artifact`` has an ``http(s)`` url, ``download.Downloader`` first asks it for
runs of consecutive missing chunks; every chunk still goes through ``ChunkStore.put`` (size and
sha256 checked), so a CDN or proxy can speed a download up but cannot corrupt it. Any HTTP
problem (``HTTP_ERRORS``) leaves what is still missing to MQTT. Kept apart from the MQTT loop
so each transport reads on its own.
"""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Protocol

from edge_agent.mqtt.chunks import ChunkStore

# What makes the downloader give up on HTTP and carry on over MQTT.
HTTP_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, ValueError)


class _Readable(Protocol):
    def read(self, n: int) -> bytes: ...


def runs_of(missing: list[int], max_run: int = 64) -> list[list[int]]:
    """Group sorted chunk indices into runs of consecutive ones (at most ``max_run`` long): one request each."""
    runs: list[list[int]] = []
    for i in missing:
        if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < max_run:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def fetch_run(
    url: str,
    store: ChunkStore,
    run: list[int],
    *,
    timeout: Callable[[], float],
    pace: Callable[[int], None],
    accept: Callable[[int, bytes], None],
) -> bool:
    """GET the bytes of ``run`` and hand each chunk to ``accept(index, data)``; True if the whole body came.

    ``pace(size)`` runs before the request and before each further chunk (bandwidth limit, stop,
    deadline); ``timeout()`` is read after the first pace. A server that ignores Range answers
    200 with the whole artifact: then every chunk is offered. Protocol surprises are ValueError.
    """
    start = run[0] * store.artifact.chunk_size
    end = start + sum(store.expected_size(i) for i in run) - 1
    pace(store.expected_size(run[0]))
    req = urllib.request.Request(url, headers={"Range": f"bytes={start}-{end}", "User-Agent": "edgefleet-agent"})
    with urllib.request.urlopen(req, timeout=timeout()) as resp:
        if resp.status == 206:
            content_range = resp.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {start}-{end}/"):
                raise ValueError(f"unexpected Content-Range {content_range!r} for bytes={start}-{end}")
            indices, whole = run, False
        elif resp.status == 200:  # Range ignored: the whole artifact follows; keep what is missing
            indices, whole = list(range(store.total)), True
        else:
            raise ValueError(f"unexpected HTTP status {resp.status}")
        for n, i in enumerate(indices):
            size = store.expected_size(i)
            if n:
                pace(size)
            data = _read_exact(resp, size)
            if len(data) != size:
                raise ValueError(f"short read at chunk {i}: {len(data)} of {size} bytes")
            accept(i, data)
    return whole


def _read_exact(resp: _Readable, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        part = resp.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)
