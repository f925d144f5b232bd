"""Fetch an artifact's missing chunks over MQTT (or HTTP(S) first) into a ``ChunkStore`` (device side).

A fresh download (nothing on disk, no bandwidth limit, at most ``WHOLE_MAX_BYTES``) subscribes
once to ``chunk_filter(sha256)``: the broker sends every retained chunk back to back, as fast as
a raw fetch. Otherwise ``Downloader`` subscribes to the *individual* topics of the missing chunks
only (a wildcard would make the broker resend every retained chunk, including those already on
disk), in a sliding window, and unsubscribes each topic once its chunk is stored. MqttLink re-makes the remembered
subscriptions after a reconnect, so a broker restart redelivers the outstanding chunks; if
nothing arrives for ``stall_timeout_s`` the window is re-subscribed. A token bucket over received
bytes delays new subscriptions to honour ``bandwidth_bps``. When the artifact has an ``http(s)``
url, missing chunks are first fetched with Range requests (``http_range``) into the same store;
any HTTP problem falls back to MQTT for what is still missing.

The publisher side lives with the cloud tools (``cloud_batch.fleetops.publish``): devices ship no
publisher code.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from edge_agent.errors import CorruptChunksError, TransferError, TransferStopped, TransferTimeout
from edge_agent.fsutil import sha256_file
from edge_agent.mqtt.chunks import ChunkStore
from edge_agent.mqtt.download_defaults import CHUNK_WINDOW, STALL_TIMEOUT_S
from edge_agent.mqtt.http_range import HTTP_ERRORS, fetch_run, runs_of
from edge_agent.mqtt.sink import ChunkSink, SinkSession
from edge_agent.mqtt.transfer import ChunkLink, Stall, TokenBucket, TransferStats
from edge_agent.wire.topics import chunk_filter, chunk_topic, parse_chunk_topic

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (chunks on disk, total chunks)
# A fresh download up to this size subscribes to all its chunks at once (the broker sends them
# back to back, as fast as a raw fetch); larger ones, resumed ones and rate-limited ones use the
# per-chunk window, so memory stays bounded and chunks already on disk are not sent again.
WHOLE_MAX_BYTES = 32 * 1024 * 1024


class Downloader:
    """Fetch the missing chunks of ``store.artifact`` through ``link`` and assemble the artifact.

    ``window``: chunk subscriptions outstanding at once. ``bandwidth_bps``: average limit in
    bytes/s over received payload bytes (granularity: one chunk). ``stall_timeout_s``: with
    subscriptions outstanding and nothing arriving for this long, subscribe the window again.
    ``out_path``: assembled artifact (default ``store.default_output``). ``keep_chunks``: keep
    the chunk directory after a successful assembly (default: delete it; an assembled file whose
    sha256 matches makes a later run return immediately). ``use_http``: try ``artifact.url`` first.
    ``sink``: a running chunk sink (``mqtt.sink``); a fresh download over MQTT alone is verified
    and written there, off this process's GIL, when it is free.

    One Downloader per artifact per link (the link keys handlers by topic).
    """

    def __init__(
        self,
        link: ChunkLink,
        store: ChunkStore,
        *,
        window: int = CHUNK_WINDOW,
        bandwidth_bps: float | None = None,
        stall_timeout_s: float = STALL_TIMEOUT_S,
        on_progress: ProgressCallback | None = None,
        out_path: str | os.PathLike[str] | None = None,
        keep_chunks: bool = False,
        use_http: bool = True,
        http_timeout_s: float = 30,
        sink: ChunkSink | None = None,
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
        self.sink = sink
        self._session: SinkSession | None = None
        self._sunk: set[int] = set()  # chunks the sink stored in this run
        self.stats = TransferStats(total=store.total)
        self._queue: queue.SimpleQueue[tuple[int, bytes]] = queue.SimpleQueue()
        self._running = threading.Lock()
        self._t0: float | None = None
        self._bucket: TokenBucket | None = None

    # -- public -----------------------------------------------------------------------
    def progress(self) -> tuple[int, int]:
        """(chunks on disk, total chunks); safe from any thread."""
        return (len(self._sunk) if self._session is not None else self.store.count()), self.store.total

    def run(self, stop: threading.Event | None = None, timeout_s: float | None = None) -> Path:
        """Block until every chunk is stored and verified; assemble and return the artifact path.

        Every chunk matched its sha256; the whole-artifact sha256 is the caller's check (the
        update machine's verifying step), so a description whose chunks do not compose
        ``artifact.sha256`` is caught there, before anything is unpacked. Raises TransferStopped
        (``stop`` set), TransferTimeout or TransferError (disk). Stored chunks are kept in every
        case, so the next run resumes.
        """
        if not self._running.acquire(blocking=False):
            raise RuntimeError("Downloader.run is already running")
        self._t0 = time.monotonic()
        deadline = None if timeout_s is None else self._t0 + timeout_s
        self.stats = TransferStats(total=self.store.total, already_had=self.store.count())
        self._bucket = (
            None if self.bandwidth_bps is None else TokenBucket(self.bandwidth_bps, burst=self.artifact.chunk_size)
        )
        try:
            if self.out_path.is_file() and sha256_file(self.out_path) == self.artifact.sha256:
                log.info("artifact %s already assembled at %s", self.artifact.sha256[:12], self.out_path)
                return self._finish(self.out_path)
            session = self._sink_session()
            if session is not None:
                return self._finish(self._run_sink(session, stop, deadline))
            if not self.store.complete:
                self.store.prepare()  # file and committer ready before the first chunk arrives
            for _attempt in range(3):
                if self.use_http and self.artifact.url and not self.store.complete:
                    self._fetch_http(stop, deadline)
                if not self.store.complete:
                    self._fetch_mqtt(stop, deadline)
                try:
                    return self._finish(self.store.assemble(self.out_path, keep=self.keep_chunks))
                except CorruptChunksError as exc:
                    log.warning("%s; fetching them again", exc)
                    self.stats.corrupt_on_disk += len(exc.indices)
            raise TransferError(f"artifact {self.artifact.sha256[:12]}: stored chunks keep failing verification")
        finally:
            self.stats.elapsed = time.monotonic() - self._t0
            try:
                self.store.close()  # commit what is pending; frees the data file's fd between runs
            except TransferError as exc:
                log.warning("%s", exc)  # the next run re-fetches what was not committed
            finally:
                self._running.release()

    # -- internals ---------------------------------------------------------------------
    def _sink_session(self) -> SinkSession | None:
        """A session of the chunk sink for a fresh download over MQTT alone, if it is free."""
        if self.sink is None or not self._whole_subscription() or (self.use_http and self.artifact.url):
            return None
        try:
            return self.sink.session(self.store)
        except TransferError as exc:
            log.warning("%s; storing the chunks in this process", exc)
            return None

    def _run_sink(self, session: SinkSession, stop: threading.Event | None, deadline: float | None) -> Path:
        """The whole subscription, chunks verified and written by the sink; it assembles them too."""
        sha = self.artifact.sha256
        outstanding = set(self.store.missing())
        self._sunk, self._session, self.stats.via_sink = set(), session, True
        self.link.subscribe(chunk_filter(sha), self._on_chunk, qos=1)
        watch = Stall(self.link, self.stall_timeout_s, self._resubscribe)
        try:
            while outstanding:
                self._check(stop, deadline)
                results = session.results(0.2)
                for i, stored in results:
                    size = self.store.expected_size(i)
                    self._count(i, 0)  # its bytes were counted as they arrived (_on_chunk)
                    if i in self._sunk:
                        self.stats.duplicates += 1
                    elif stored:
                        self._sunk.add(i)
                        outstanding.discard(i)
                        self._stored(i, size)
                    else:
                        self.stats.bad_chunks += 1
                watch.check(bool(results), bool(outstanding), lambda: [chunk_filter(sha)])
            return session.assemble(self.out_path, keep=self.keep_chunks)
        finally:
            self.link.unsubscribe(chunk_filter(sha))
            self._session = None
            session.close()

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
        session = self._session
        if session is not None:
            self.stats.bytes_received += len(payload)  # (the sink's answers carry indices, not sizes)
            session.put(parsed[1], payload)
        else:
            self._queue.put((parsed[1], bytes(payload)))

    def _whole_subscription(self) -> bool:
        """A fresh download (nothing held, no bandwidth limit, bounded size) takes one wildcard subscription."""
        return self.bandwidth_bps is None and self.store.count() == 0 and self.artifact.size <= WHOLE_MAX_BYTES

    def _fetch_mqtt(self, stop: threading.Event | None, deadline: float | None) -> None:
        sha = self.artifact.sha256
        whole = self._whole_subscription()
        pending = deque([] if whole else self.store.missing())
        outstanding: set[int] = set(self.store.missing()) if whole else set()
        if whole:
            self.link.subscribe(chunk_filter(sha), self._on_chunk, qos=1)
        watch = Stall(self.link, self.stall_timeout_s, self._resubscribe)
        try:
            while pending or outstanding:
                self._check(stop, deadline)
                wait, subscribed = self._fill_window(pending, outstanding)
                if not outstanding and not pending:
                    break
                # Take what arrived (disk I/O happens here, on this thread).
                try:
                    item: tuple[int, bytes] | None = self._queue.get(timeout=max(wait, 0.001))
                except queue.Empty:
                    item = None
                arrived = item is not None
                while item is not None:
                    if self._receive(*item) and item[0] in outstanding:
                        outstanding.discard(item[0])
                        if not whole:
                            self.link.unsubscribe(chunk_topic(sha, item[0]))
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        item = None
                watch.check(
                    subscribed or arrived,
                    bool(outstanding),
                    lambda: [chunk_filter(sha)] if whole else [chunk_topic(sha, i) for i in sorted(outstanding)],
                )
        finally:
            for topic in [chunk_filter(sha)] if whole else [chunk_topic(sha, i) for i in outstanding]:
                self.link.unsubscribe(topic)

    def _fill_window(self, pending: deque[int], outstanding: set[int]) -> tuple[float, bool]:
        """Subscribe to missing chunks while the window and the byte budget allow; (how long to wait, any new)."""
        wait, subscribed = 0.2, False
        while pending and len(outstanding) < self.window:
            i = pending[0]
            if self.store.have(i):
                pending.popleft()
                continue
            if self._bucket is not None:
                w = self._bucket.wait_time(self.store.expected_size(i))
                if w > 0:
                    wait = min(wait, w)
                    break
                self._bucket.take(self.store.expected_size(i))
            pending.popleft()
            outstanding.add(i)
            self.link.subscribe(chunk_topic(self.artifact.sha256, i), self._on_chunk, qos=1)
            subscribed = True
        return wait, subscribed

    def _receive(self, i: int, payload: bytes) -> bool:
        """Account for and store one chunk message; True when its subscription is no longer needed."""
        self._count(i, len(payload))
        if self.store.have(i):
            self.stats.duplicates += 1
            done = True
        elif self.store.put(i, payload):
            self._stored(i, len(payload))
            return True  # its bytes were budgeted when it was subscribed
        else:
            self.stats.bad_chunks += 1  # stay subscribed: a corrected (re-published) chunk arrives live
            done = False
        if self._bucket is not None:
            self._bucket.take(len(payload))
        return done

    def _count(self, i: int, n: int) -> None:
        self.stats.receipts[i] = self.stats.receipts.get(i, 0) + 1
        self.stats.bytes_received += n

    def _resubscribe(self, topics: list[str]) -> None:
        log.warning(
            "transfer of %s stalled for %.0fs at %d/%d chunks; re-subscribing %d topic(s)",
            self.artifact.sha256[:12],
            self.stall_timeout_s,
            self.store.count(),
            self.store.total,
            len(topics),
        )
        self.stats.resubscribes += 1
        for topic in topics:
            self.link.subscribe(topic, self._on_chunk, qos=1)

    # -- HTTP(S) Range transport ---------------------------------------------------
    def _fetch_http(self, stop: threading.Event | None, deadline: float | None) -> None:
        """Fetch runs of consecutive missing chunks with Range requests; on any HTTP problem, leave the rest to MQTT."""
        url = self.artifact.url or ""
        if urlparse(url).scheme not in ("http", "https"):
            return

        def timeout() -> float:
            left = None if deadline is None else deadline - time.monotonic()
            return self.http_timeout_s if left is None else max(0.1, min(self.http_timeout_s, left))

        try:
            for run in runs_of(self.store.missing()):
                self._check(stop, deadline)
                whole = fetch_run(
                    url,
                    self.store,
                    run,
                    timeout=timeout,
                    pace=lambda size: self._http_wait(size, stop, deadline),
                    accept=self._http_chunk,
                )
                if whole:
                    return  # the server sent the whole body: every chunk was offered
        except TransferError:
            raise
        except HTTP_ERRORS as exc:
            self.stats.http_errors += 1
            log.warning("HTTP transfer from %s failed (%s); continuing over MQTT", url, exc)

    def _http_chunk(self, i: int, data: bytes) -> None:
        if self._bucket is not None:
            self._bucket.take(len(data))
        self.stats.bytes_received += len(data)
        if self.store.have(i):
            return  # only reachable for a whole-body (200) response
        if self.store.put(i, data):
            self.stats.http_chunks += 1
            self._stored(i, len(data))
        else:
            self.stats.bad_chunks += 1  # MQTT will fetch it

    def _http_wait(self, size: int, stop: threading.Event | None, deadline: float | None) -> None:
        while self._bucket is not None:
            w = self._bucket.wait_time(size)
            if w <= 0:
                return
            self._check(stop, deadline)
            time.sleep(min(w, 0.1))
        self._check(stop, deadline)


__all__ = ["Downloader", "TransferStats"]
