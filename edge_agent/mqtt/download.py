"""Chunked, resumable artifact transfer over MQTT (device side) and the matching publisher.

The wire contract is in ``protocol.py``: the release job publishes an artifact as RETAINED
chunk messages on ``chunk_topic(sha256, index)`` (raw bytes) and describes it in the signed
release manifest as an ``Artifact`` (whole sha256, size, chunk size, sha256 of every chunk).
No server has to stay up: the broker's retained store *is* the download server.

Device side:

* ``ChunkStore`` keeps one file per verified chunk in ``root/<sha256>/<index>.chunk``. Every
  chunk is hash-checked before it is written (temp file, fsync, ``os.replace``), so a kill -9
  never leaves a torn file that looks valid. On open, stray temp files and chunk files of the
  wrong size are deleted; chunk hashes are checked again while assembling (a chunk that rotted
  on disk is dropped and fetched again).
* ``Downloader`` subscribes to the *individual* topics of the missing chunks only (a wildcard
  would make the broker resend every retained chunk, including those already on disk), in a
  sliding window, and unsubscribes each topic once its chunk is stored. MqttLink re-makes the
  remembered subscriptions after a reconnect, so a broker restart redelivers the outstanding
  chunks; if nothing arrives for ``stall_timeout_s`` the window is re-subscribed. A token
  bucket over received bytes delays new subscriptions to honour ``bandwidth_bps``. When the
  artifact has an ``http(s)`` url, missing chunks are first fetched with HTTP Range requests
  into the same store; any HTTP problem falls back to MQTT for what is still missing.

Publisher side (release job, tests): ``publish_artifact`` and ``clear_artifact``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from edge_agent.errors import FailedError, ManifestError
from edge_agent.fsutil import atomic_write_bytes, fsync_dir, sha256_file
from edge_agent.mqtt.link import MqttLink
from edge_agent.wire.protocol import DEFAULT_CHUNK_SIZE, Artifact, chunk_topic, iter_chunks, parse_chunk_topic

log = logging.getLogger(__name__)

_SHA = re.compile(r"^[0-9a-f]{64}$")
_CHUNK_FILE = re.compile(r"^(0|[1-9][0-9]*)\.chunk$")

ProgressCallback = Callable[[int, int], None]  # (chunks on disk, total chunks)


# -- errors ---------------------------------------------------------------------------
class TransferError(FailedError):
    """A transfer did not finish (timeout, stall, disk); transient: retrying resumes it."""


class TransferTimeout(TransferError):
    """``run(timeout_s=...)`` expired before every chunk was stored."""


class TransferStopped(TransferError):
    """The caller's stop event was set; chunks already stored are kept for the next run."""


class CorruptChunksError(TransferError):
    """Stored chunks failed their hash while assembling; they were deleted and must be fetched again."""

    def __init__(self, indices: list[int]) -> None:
        super().__init__(f"{len(indices)} stored chunk(s) failed verification and were dropped: {indices[:10]}")
        self.indices = indices


def check_artifact(artifact: Artifact) -> Artifact:
    """The consistency a device relies on before touching disk or the network (ManifestError if not)."""
    if not _SHA.match(str(artifact.sha256)) or not all(_SHA.match(str(c)) for c in artifact.chunks):
        raise ManifestError("artifact: sha256 values must be 64 lowercase hex digits")
    if artifact.size < 0 or artifact.chunk_size <= 0:
        raise ManifestError("artifact: size must be >= 0 and chunk_size > 0")
    if len(artifact.chunks) != max(1, -(-artifact.size // artifact.chunk_size)):
        raise ManifestError("artifact: size, chunk_size and the chunk list disagree")
    return artifact


# -- chunk store ------------------------------------------------------------------------
class ChunkStore:
    """Verified chunks of one artifact on disk, in ``root/<sha256>/``; survives kill -9.

    One process at a time per directory. Methods are thread-safe.
    """

    def __init__(self, root: str | os.PathLike[str], artifact: Artifact) -> None:
        self.artifact = check_artifact(artifact)
        self.root = Path(root)
        self.dir = self.root / artifact.sha256
        self.total = len(artifact.chunks)
        self.bad_chunks = 0  # put() calls rejected (hash or size mismatch)
        self.discarded_on_open: list[str] = []  # torn / stray files removed when opening
        self._lock = threading.Lock()
        self._have: set[int] = set()
        self._open()

    # -- layout ---------------------------------------------------------------------
    def expected_size(self, index: int) -> int:
        if not 0 <= index < self.total:
            raise IndexError(f"chunk {index} out of range 0..{self.total - 1}")
        if index < self.total - 1:
            return self.artifact.chunk_size
        return self.artifact.size - self.artifact.chunk_size * (self.total - 1)

    def chunk_path(self, index: int) -> Path:
        return self.dir / f"{index}.chunk"

    @property
    def default_output(self) -> Path:
        """Where ``Downloader`` assembles the artifact by default: ``root/<sha256>.<format>``."""
        return self.root / f"{self.artifact.sha256}.{self.artifact.format}"

    def _open(self) -> None:
        # An empty chunk (only in a zero-byte artifact) cannot be a retained message; it needs no file.
        self._have = {i for i in range(self.total) if self.expected_size(i) == 0}
        if not self.dir.is_dir():
            return
        for entry in os.scandir(self.dir):
            m = _CHUNK_FILE.match(entry.name)
            keep = False
            if m and entry.is_file(follow_symlinks=False):
                i = int(m.group(1))
                keep = i < self.total and i not in self._have and entry.stat().st_size == self.expected_size(i)
                if keep:
                    self._have.add(i)
            if not keep and not entry.is_dir(follow_symlinks=False):
                # Temp files of an interrupted write, truncated or foreign files: never trusted.
                self.discarded_on_open.append(entry.name)
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass
        if self.discarded_on_open:
            log.info(
                "chunk store %s: discarded %d torn/stray file(s): %s",
                self.dir,
                len(self.discarded_on_open),
                self.discarded_on_open[:5],
            )

    # -- queries ----------------------------------------------------------------------
    def have(self, index: int) -> bool:
        with self._lock:
            return index in self._have

    def missing(self) -> list[int]:
        with self._lock:
            return [i for i in range(self.total) if i not in self._have]

    def count(self) -> int:
        with self._lock:
            return len(self._have)

    @property
    def complete(self) -> bool:
        return self.count() == self.total

    @property
    def bytes_on_disk(self) -> int:
        """Bytes currently in the chunk directory (stored chunks plus any in-progress temp file)."""
        try:
            return sum(e.stat().st_size for e in os.scandir(self.dir) if e.is_file(follow_symlinks=False))
        except FileNotFoundError:
            return 0

    # -- mutation ---------------------------------------------------------------------
    def verify(self, index: int, data: bytes) -> bool:
        return (
            len(data) == self.expected_size(index) and hashlib.sha256(data).hexdigest() == self.artifact.chunks[index]
        )

    def put(self, index: int, data: bytes) -> bool:
        """Store chunk ``index`` if its size and sha256 match the artifact; a bad chunk is counted, never stored.

        Returns True when the chunk is (now) on disk. Raises TransferError if the disk write fails.
        """
        if not self.verify(index, data):
            with self._lock:
                self.bad_chunks += 1
            log.warning("chunk %d of %s rejected: size or sha256 mismatch", index, self.artifact.sha256[:12])
            return False
        if self.have(index):
            return True
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.chunk_path(index), data)  # temp + fsync + os.replace + fsync dir
        except OSError as exc:
            raise TransferError(f"cannot store chunk {index} in {self.dir}: {exc}") from exc
        with self._lock:
            self._have.add(index)
        return True

    def drop(self, index: int) -> None:
        with self._lock:
            if self.expected_size(index) == 0:
                return
            self._have.discard(index)
        try:
            os.unlink(self.chunk_path(index))
        except FileNotFoundError:
            pass

    def assemble(self, out_path: str | os.PathLike[str]) -> Path:
        """Concatenate the chunks into ``out_path`` atomically, verifying every chunk, the size and the sha256.

        A stored chunk that no longer matches its hash is dropped and CorruptChunksError names it
        (fetch it again, then assemble again). If every chunk matches but the whole does not, the
        artifact description itself is inconsistent: ManifestError.
        """
        missing = self.missing()
        if missing:
            raise TransferError(f"cannot assemble {self.artifact.sha256[:12]}: {len(missing)} chunk(s) missing")
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        whole = hashlib.sha256()
        size = 0
        corrupt: list[int] = []
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                for i in range(self.total):
                    if self.expected_size(i) == 0:
                        data = b""
                    else:
                        try:
                            data = self.chunk_path(i).read_bytes()
                        except FileNotFoundError:
                            data = None
                    if data is None or not self.verify(i, data):
                        corrupt.append(i)
                        continue
                    if not corrupt:
                        fh.write(data)
                        whole.update(data)
                        size += len(data)
                if not corrupt:
                    fh.flush()
                    os.fsync(fh.fileno())
            if corrupt:
                for i in corrupt:
                    self.drop(i)
                raise CorruptChunksError(corrupt)
            if size != self.artifact.size or whole.hexdigest() != self.artifact.sha256:
                raise ManifestError(
                    f"artifact {self.artifact.sha256[:12]}: every chunk verifies but the whole is "
                    f"{size} bytes with sha256 {whole.hexdigest()[:12]}: the artifact description is inconsistent"
                )
            os.replace(tmp, out)
            fsync_dir(out.parent)
        except OSError as exc:
            raise TransferError(f"cannot assemble {out}: {exc}") from exc
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        return out

    def discard(self) -> None:
        """Delete the chunk directory (after a successful install, or when the artifact is superseded)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        with self._lock:
            self._have = {i for i in range(self.total) if self.expected_size(i) == 0}

    def __repr__(self) -> str:
        return f"ChunkStore({str(self.dir)!r}, {self.count()}/{self.total})"


# -- rate limiting -----------------------------------------------------------------
class _TokenBucket:
    """Bytes per second with a burst of ``burst`` bytes; ``take`` may go into debt."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.t = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now

    def wait_time(self, n: int) -> float:
        """Seconds until ``n`` bytes may be committed (0 if now)."""
        self._refill()
        need = min(float(n), self.burst)
        return 0.0 if self.tokens >= need else (need - self.tokens) / self.rate

    def take(self, n: int) -> None:
        self._refill()
        self.tokens -= n


# -- downloader ----------------------------------------------------------------------------
@dataclass
class TransferStats:
    """What one ``Downloader.run`` did. Updated on the downloader's thread only."""

    total: int = 0  # chunks in the artifact
    already_had: int = 0  # chunks on disk when the run started
    chunks_received: int = 0  # chunks verified and stored by this run (any transport)
    duplicates: int = 0  # chunk messages that arrived when the chunk was already stored
    bad_chunks: int = 0  # chunks that failed their size/sha256 check (never stored)
    bytes_received: int = 0  # payload bytes that arrived (stored, duplicate and bad alike)
    bytes_stored: int = 0  # payload bytes of the stored chunks
    resubscribes: int = 0  # stall recoveries: outstanding window subscribed again
    corrupt_on_disk: int = 0  # stored chunks that failed verification at assembly and were refetched
    http_chunks: int = 0  # chunks obtained over HTTP(S) Range requests
    http_errors: int = 0  # HTTP failures that made the run fall back to MQTT
    elapsed: float = 0.0  # seconds
    receipts: dict[int, int] = field(default_factory=dict)  # chunk index -> MQTT messages received for it

    @property
    def rate_bps(self) -> float:
        return self.bytes_received / self.elapsed if self.elapsed > 0 else 0.0


class Downloader:
    """Fetch the missing chunks of ``store.artifact`` through ``link`` and assemble the artifact.

    ``window``: chunk subscriptions outstanding at once. ``bandwidth_bps``: average limit in
    bytes/s over received payload bytes (granularity: one chunk). ``stall_timeout_s``: with
    subscriptions outstanding and nothing arriving for this long, subscribe the window again.
    ``out_path``: assembled artifact (default ``store.default_output``). ``keep_chunks``: keep
    the chunk directory after a successful assembly (default: delete it; the verified artifact
    file makes a later run return immediately). ``use_http``: try ``artifact.url`` first.

    One Downloader per artifact per link (the link keys handlers by topic).
    """

    def __init__(
        self,
        link: MqttLink,
        store: ChunkStore,
        *,
        window: int = 8,
        bandwidth_bps: float | None = None,
        stall_timeout_s: float = 30,
        on_progress: ProgressCallback | None = None,
        out_path: str | os.PathLike[str] | None = None,
        keep_chunks: bool = False,
        use_http: bool = True,
        http_timeout_s: float = 30,
    ) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        if bandwidth_bps is not None and bandwidth_bps <= 0:
            raise ValueError("bandwidth_bps must be > 0 (or None for no limit)")
        if stall_timeout_s <= 0:
            raise ValueError("stall_timeout_s must be > 0")
        self.link = link
        self.store = store
        self.artifact = store.artifact
        self.window = window
        self.bandwidth_bps = bandwidth_bps
        self.stall_timeout_s = stall_timeout_s
        self.on_progress = on_progress
        self.out_path = Path(out_path) if out_path is not None else store.default_output
        self.keep_chunks = keep_chunks
        self.use_http = use_http
        self.http_timeout_s = http_timeout_s
        self.stats = TransferStats(total=store.total)
        self._queue: queue.SimpleQueue[tuple[int, bytes]] = queue.SimpleQueue()
        self._running = threading.Lock()
        self._t0: float | None = None
        self._bucket: _TokenBucket | None = None

    # -- public -----------------------------------------------------------------------
    def progress(self) -> tuple[int, int]:
        """(chunks on disk, total chunks); safe from any thread."""
        return self.store.count(), self.store.total

    def run(self, stop: threading.Event | None = None, timeout_s: float | None = None) -> Path:
        """Block until every chunk is stored; assemble and return the artifact path.

        Raises TransferStopped (``stop`` set), TransferTimeout, TransferError (disk) or
        ManifestError (inconsistent artifact description). Stored chunks are kept in every
        case, so the next run resumes.
        """
        if not self._running.acquire(blocking=False):
            raise RuntimeError("Downloader.run is already running")
        self._t0 = time.monotonic()
        deadline = None if timeout_s is None else self._t0 + timeout_s
        self.stats = TransferStats(total=self.store.total, already_had=self.store.count())
        self._bucket = (
            None if self.bandwidth_bps is None else _TokenBucket(self.bandwidth_bps, burst=self.artifact.chunk_size)
        )
        try:
            if self.out_path.is_file() and sha256_file(self.out_path) == self.artifact.sha256:
                log.info("artifact %s already assembled at %s", self.artifact.sha256[:12], self.out_path)
                return self._finish(self.out_path)
            for _attempt in range(3):
                if self.use_http and self.artifact.url and not self.store.complete:
                    self._fetch_http(stop, deadline)
                if not self.store.complete:
                    self._fetch_mqtt(stop, deadline)
                try:
                    return self._finish(self.store.assemble(self.out_path))
                except CorruptChunksError as exc:
                    log.warning("%s; fetching them again", exc)
                    self.stats.corrupt_on_disk += len(exc.indices)
            raise TransferError(f"artifact {self.artifact.sha256[:12]}: stored chunks keep failing verification")
        finally:
            self.stats.elapsed = time.monotonic() - self._t0
            self._running.release()

    # -- internals ---------------------------------------------------------------------
    def _finish(self, path: Path) -> Path:
        if not self.keep_chunks:
            self.store.discard()
        return path

    def _check(self, stop: threading.Event | None, deadline: float | None) -> None:
        if stop is not None and stop.is_set():
            have, total = self.progress()
            raise TransferStopped(f"transfer of {self.artifact.sha256[:12]} stopped at {have}/{total} chunks")
        if deadline is not None and time.monotonic() >= deadline:
            have, total = self.progress()
            raise TransferTimeout(f"transfer of {self.artifact.sha256[:12]} timed out at {have}/{total} chunks")

    def _stored(self, index: int, n: int) -> None:
        self.stats.chunks_received += 1
        self.stats.bytes_stored += n
        if self.on_progress is not None:
            try:
                self.on_progress(*self.progress())
            except Exception:
                log.exception("progress callback failed")

    def _on_chunk(self, topic: str, payload: bytes, retained: bool) -> None:
        """paho network thread: hand the payload over, nothing else."""
        parsed = parse_chunk_topic(topic)
        if parsed is None or parsed[0] != self.artifact.sha256 or not 0 <= parsed[1] < self.store.total:
            return
        if not payload:  # an empty retained payload deletes the chunk (clear_artifact); nothing to store
            log.debug("chunk %s cleared on the broker", topic)
            return
        self._queue.put((parsed[1], bytes(payload)))

    def _fetch_mqtt(self, stop: threading.Event | None, deadline: float | None) -> None:
        sha = self.artifact.sha256
        pending = deque(self.store.missing())
        outstanding: set[int] = set()
        bucket = self._bucket
        last_activity = time.monotonic()
        connects = self.link.connects

        def unsubscribe(i: int) -> None:
            outstanding.discard(i)
            self.link.unsubscribe(chunk_topic(sha, i))

        try:
            while pending or outstanding:
                self._check(stop, deadline)
                # Issue subscriptions for missing chunks while the window and the byte budget allow.
                wait = 0.2
                while pending and len(outstanding) < self.window:
                    i = pending[0]
                    if self.store.have(i):
                        pending.popleft()
                        continue
                    if bucket is not None:
                        w = bucket.wait_time(self.store.expected_size(i))
                        if w > 0:
                            wait = min(wait, w)
                            break
                        bucket.take(self.store.expected_size(i))
                    pending.popleft()
                    outstanding.add(i)
                    self.link.subscribe(chunk_topic(sha, i), self._on_chunk, qos=1)
                    last_activity = time.monotonic()
                if not outstanding and not pending:
                    break
                # Take what arrived (disk I/O happens here, on this thread).
                try:
                    item: tuple[int, bytes] | None = self._queue.get(timeout=max(wait, 0.001))
                except queue.Empty:
                    item = None
                while item is not None:
                    last_activity = time.monotonic()
                    i, payload = item
                    self.stats.receipts[i] = self.stats.receipts.get(i, 0) + 1
                    self.stats.bytes_received += len(payload)
                    if self.store.have(i):
                        self.stats.duplicates += 1
                        if bucket is not None:
                            bucket.take(len(payload))
                        if i in outstanding:
                            unsubscribe(i)
                    elif self.store.put(i, payload):
                        self._stored(i, len(payload))
                        if i in outstanding:
                            unsubscribe(i)
                    else:
                        # Stay subscribed: a corrected (re-published) chunk arrives live.
                        self.stats.bad_chunks += 1
                        if bucket is not None:
                            bucket.take(len(payload))
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        item = None
                # Stall handling: the link re-subscribes after a reconnect by itself; otherwise ask again.
                now = time.monotonic()
                if self.link.connects != connects:
                    connects, last_activity = self.link.connects, now
                elif outstanding and now - last_activity > self.stall_timeout_s:
                    log.warning(
                        "transfer of %s stalled for %.0fs at %d/%d chunks; re-subscribing %d chunk(s)",
                        sha[:12],
                        now - last_activity,
                        self.store.count(),
                        self.store.total,
                        len(outstanding),
                    )
                    self.stats.resubscribes += 1
                    for i in sorted(outstanding):
                        self.link.subscribe(chunk_topic(sha, i), self._on_chunk, qos=1)
                    last_activity = now
        finally:
            for i in list(outstanding):
                unsubscribe(i)

    # -- HTTP(S) Range transport ---------------------------------------------------
    def _fetch_http(self, stop: threading.Event | None, deadline: float | None, max_run: int = 64) -> None:
        """Fetch runs of consecutive missing chunks with Range requests; on any HTTP problem, leave the rest to MQTT."""
        url = self.artifact.url or ""
        if urlparse(url).scheme not in ("http", "https"):
            return
        missing = self.store.missing()
        runs: list[list[int]] = []
        for i in missing:
            if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < max_run:
                runs[-1].append(i)
            else:
                runs.append([i])
        try:
            for run in runs:
                self._check(stop, deadline)
                if self._http_run(run, url, stop, deadline):
                    return  # the server sent the whole body: every chunk was offered
        except TransferError:
            raise
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            self.stats.http_errors += 1
            log.warning("HTTP transfer from %s failed (%s); continuing over MQTT", url, exc)

    def _http_run(self, run: list[int], url: str, stop: threading.Event | None, deadline: float | None) -> bool:
        cs = self.artifact.chunk_size
        start = run[0] * cs
        end = start + sum(self.store.expected_size(i) for i in run) - 1
        self._http_wait(self.store.expected_size(run[0]), stop, deadline)
        req = urllib.request.Request(url, headers={"Range": f"bytes={start}-{end}", "User-Agent": "edgefleet-agent"})
        timeout = (
            self.http_timeout_s if deadline is None else max(0.1, min(self.http_timeout_s, deadline - time.monotonic()))
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if resp.status == 206:
                content_range = resp.headers.get("Content-Range", "")
                if not content_range.startswith(f"bytes {start}-{end}/"):
                    raise ValueError(f"unexpected Content-Range {content_range!r} for bytes={start}-{end}")
                indices, whole = run, False
            elif resp.status == 200:  # Range ignored: the whole artifact follows; keep what is missing
                indices, whole = list(range(self.store.total)), True
            else:
                raise ValueError(f"unexpected HTTP status {resp.status}")
            for n, i in enumerate(indices):
                size = self.store.expected_size(i)
                if n:
                    self._http_wait(size, stop, deadline)
                data = _read_exact(resp, size)
                if len(data) != size:
                    raise ValueError(f"short read at chunk {i}: {len(data)} of {size} bytes")
                if self._bucket is not None:
                    self._bucket.take(size)
                self.stats.bytes_received += size
                if self.store.have(i):
                    continue  # only reachable for a whole-body (200) response
                if self.store.put(i, data):
                    self.stats.http_chunks += 1
                    self._stored(i, size)
                else:
                    self.stats.bad_chunks += 1  # MQTT will fetch it
        return whole

    def _http_wait(self, size: int, stop: threading.Event | None, deadline: float | None) -> None:
        while self._bucket is not None:
            w = self._bucket.wait_time(size)
            if w <= 0:
                return
            self._check(stop, deadline)
            time.sleep(min(w, 0.1))
        self._check(stop, deadline)


def _read_exact(resp, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        part = resp.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


# -- publisher (cloud release job, tests) ------------------------------------------
def publish_artifact(
    link: MqttLink,
    blob: bytes,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    url: str | None = None,
    timeout_s: float = 60.0,
    parallel: int = 16,
) -> Artifact:
    """Publish ``blob`` as retained QoS 1 chunk messages and wait for every PUBACK; return its Artifact.

    A zero-byte artifact publishes nothing (an empty retained payload would be a deletion);
    devices need no message for it. Publishing the same blob again is harmless (same topics).
    """
    artifact = Artifact.from_blob(blob, chunk_size, url=url)
    chunks = [(i, data) for i, data in iter_chunks(blob, chunk_size) if data]
    _publish_all(link, [(chunk_topic(artifact.sha256, i), data) for i, data in chunks], timeout_s, parallel)
    log.info("published artifact %s: %d bytes in %d retained chunk(s)", artifact.sha256[:12], len(blob), len(chunks))
    return artifact


def clear_artifact(link: MqttLink, artifact: Artifact, *, timeout_s: float = 60.0, parallel: int = 16) -> None:
    """Delete the retained chunks of a superseded artifact (empty retained payloads), waiting for PUBACKs."""
    check_artifact(artifact)
    topics = [(chunk_topic(artifact.sha256, i), b"") for i in range(len(artifact.chunks))]
    _publish_all(link, topics, timeout_s, parallel)
    log.info("cleared artifact %s (%d chunk topic(s))", artifact.sha256[:12], len(topics))


def _publish_all(link: MqttLink, messages: list[tuple[str, bytes]], timeout_s: float, parallel: int) -> None:
    if not messages:
        return
    if not link.wait_connected(timeout_s):
        raise TransferError(f"not connected to broker {link.host}:{link.port} after {timeout_s}s")

    def one(msg: tuple[str, bytes]) -> None:
        link.publish(msg[0], msg[1], retain=True, qos=1, wait_s=timeout_s)

    # PUBACK waits in parallel: one round trip per chunk would make a long-RTT upload crawl.
    with ThreadPoolExecutor(
        max_workers=max(1, min(parallel, len(messages))), thread_name_prefix="publish-artifact"
    ) as pool:
        for fut in [pool.submit(one, m) for m in messages]:
            fut.result()


__all__ = [
    "ChunkStore",
    "CorruptChunksError",
    "Downloader",
    "TransferError",
    "TransferStats",
    "TransferStopped",
    "TransferTimeout",
    "check_artifact",
    "clear_artifact",
    "publish_artifact",
]
