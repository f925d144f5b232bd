"""Chunked artifact transfer over a real mosquitto (tests/broker.py): resume, broker restarts, bad chunks.

No mocks: every test publishes retained chunks to a real broker and downloads them with a real
MqttLink into a real ChunkStore. Timing is only used as generous timeouts, except the bandwidth
test, which checks the limiter's effect (elapsed >= 0.8 * size / limit).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest

from cloud_batch.fleetops.publish import clear_artifact, publish_artifact
from edge_agent.errors import (
    CorruptChunksError,
    FailedError,
    ManifestError,
    TransferError,
    TransferStopped,
    TransferTimeout,
)
from edge_agent.fsutil import sha256_file
from edge_agent.mqtt.chunks import ChunkStore
from edge_agent.mqtt.download import Downloader
from edge_agent.mqtt.link import MqttLink
from edge_agent.wire.protocol import Artifact
from edge_agent.wire.topics import ROOT, chunk_topic
from tests.broker import Broker
from tests.support.env import REPO

KIB = 1024


def wait_until(pred: Callable[[], bool], timeout: float = 20.0, interval: float = 0.01, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")


def blob_of(size: int, seed: int = 0) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32) + os.urandom(size % 32)


def chunk_of(blob: bytes, art: Artifact, i: int) -> bytes:
    return blob[i * art.chunk_size : (i + 1) * art.chunk_size]


@pytest.fixture
def mk_link(broker: Broker):
    made: list[MqttLink] = []

    def make() -> MqttLink:
        link = MqttLink(broker.url, min_backoff_s=0.5, max_backoff_s=2)
        link.start()
        assert link.wait_connected(10), "link did not connect"
        made.append(link)
        return link

    yield make
    for link in made:
        link.stop()


class Background(threading.Thread):
    """``Downloader.run`` on a thread, keeping its result or exception."""

    def __init__(self, dl: Downloader, **kwargs) -> None:
        super().__init__(daemon=True)
        self.dl, self.kwargs = dl, kwargs
        self.result: Path | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.dl.run(**self.kwargs)
        except BaseException as exc:
            self.error = exc

    def wait(self, timeout: float = 30) -> Path:
        self.join(timeout)
        assert not self.is_alive(), f"download still running after {timeout}s: {self.dl.progress()}"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def journal_records(chunk_dir: Path) -> int:
    """Whole records in a chunk store's verified-chunk journal (white-box: what a crash would keep)."""
    try:
        return (chunk_dir / "journal").stat().st_size // 8
    except FileNotFoundError:
        return 0


def chunk_handlers(link: MqttLink) -> list[str]:
    """Chunk topics the link still remembers (white-box: subscriptions must be dropped when done)."""
    return [t for t in link._handlers if t.startswith(f"{ROOT}/artifacts/")]


# -- end to end -----------------------------------------------------------------------
def test_end_to_end_download(mk_link, tmp_path: Path) -> None:
    pub, dev = mk_link(), mk_link()
    blob = os.urandom(1_500_000)
    art = publish_artifact(pub, blob, 64 * KIB)
    assert art == Artifact.from_blob(blob, 64 * KIB) and len(art.chunks) == 23

    store = ChunkStore(tmp_path / "chunks", art)
    assert store.missing() == list(range(23)) and not store.complete
    seen: list[tuple[int, int]] = []
    dl = Downloader(dev, store, on_progress=lambda have, total: seen.append((have, total)))
    path = dl.run(timeout_s=30)

    assert path == store.default_output and path.read_bytes() == blob
    s = dl.stats
    assert (s.chunks_received, s.duplicates, s.bad_chunks, s.bytes_received) == (23, 0, 0, len(blob))
    assert s.receipts == {i: 1 for i in range(23)} and s.elapsed > 0
    assert seen == [(n, 23) for n in range(1, 24)]
    assert not store.dir.exists(), "chunks are deleted once the verified artifact exists"
    assert chunk_handlers(dev) == [], "every chunk topic was unsubscribed"

    # A second run finds the verified artifact and fetches nothing.
    again = Downloader(dev, ChunkStore(tmp_path / "chunks", art))
    assert again.run(timeout_s=5) == path and again.stats.chunks_received == 0 and again.stats.receipts == {}


# -- resume after kill -9 ------------------------------------------------------------
AGENT = """
import json, sys
from pathlib import Path
from edge_agent.mqtt.link import MqttLink
from edge_agent.wire.protocol import Artifact
from edge_agent.fsutil import sha256_file
from edge_agent.mqtt.chunks import ChunkStore
from edge_agent.mqtt.download import Downloader
url, root, art, bps = sys.argv[1], sys.argv[2], Artifact(**json.loads(sys.argv[3])), float(sys.argv[4])
link = MqttLink(url)
link.start()
Downloader(link, ChunkStore(Path(root), art), bandwidth_bps=bps).run(timeout_s=60)
print("finished")
"""


def test_resume_after_agent_kill9(broker: Broker, mk_link, tmp_path: Path) -> None:
    pub = mk_link()
    blob = os.urandom(1_500_000)
    art = publish_artifact(pub, blob, 64 * KIB)
    total = len(art.chunks)
    root = tmp_path / "chunks"
    chunk_dir = root / art.sha256

    proc = subprocess.Popen(
        [sys.executable, "-c", AGENT, broker.url, str(root), json.dumps(asdict(art)), "600000"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(
            lambda: journal_records(chunk_dir) >= total // 2 or proc.poll() is not None,
            timeout=30,
            interval=0.005,
            what="half the chunks on disk",
        )
        assert proc.poll() is None, f"agent exited early: {proc.communicate()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL and b"finished" not in out

    store = ChunkStore(root, art)
    already, missing_before = store.count(), store.missing()
    assert total // 2 <= already < total
    dev = mk_link()
    dl = Downloader(dev, store)
    assert dl.run(timeout_s=30).read_bytes() == blob
    s = dl.stats
    assert s.already_had == already
    assert s.chunks_received == total - already, "exactly the missing chunks were fetched"
    assert s.duplicates == 0 and s.bad_chunks == 0
    assert s.receipts == {i: 1 for i in missing_before}, "only missing chunks were subscribed, each once"


# -- broker restarts mid-transfer --------------------------------------------------
@pytest.mark.parametrize("how", ["restart", "sigkill"])
def test_broker_restart_mid_transfer(broker: Broker, mk_link, tmp_path: Path, how: str) -> None:
    pub, dev = mk_link(), mk_link()
    blob = os.urandom(1_500_000)
    art = publish_artifact(pub, blob, 64 * KIB)
    total = len(art.chunks)
    if how == "sigkill":
        time.sleep(1.6)  # mosquitto persists retained messages on autosave (every 1 s) or clean shutdown only
    store = ChunkStore(tmp_path / "chunks", art)
    window = 8
    dl = Downloader(dev, store, window=window, bandwidth_bps=500_000, stall_timeout_s=60)
    bg = Background(dl, timeout_s=60)
    bg.start()
    wait_until(lambda: store.count() >= 0.4 * total, timeout=30, what="40% of the chunks")
    had_before = {i for i in range(total) if store.have(i)}
    assert len(had_before) < total, "the transfer must still be running when the broker goes away"
    if how == "restart":
        broker.restart()  # SIGTERM: retained chunks are saved, then a fresh broker on the same port and store
    else:
        assert broker.proc is not None
        broker.proc.kill()  # SIGKILL: only the last autosave survives
        broker.proc.wait(10)
        broker.start()

    assert bg.wait(45).read_bytes() == blob
    s = dl.stats
    assert dev.connects >= 2, "the device reconnected"
    assert s.chunks_received == total and s.bad_chunks == 0
    assert all(s.receipts[i] == 1 for i in had_before), "a chunk stored before the restart was fetched again"
    # Only chunks subscribed but not yet stored when the broker went away can come twice (redelivery).
    assert s.duplicates == sum(c - 1 for c in s.receipts.values()) <= window
    assert chunk_handlers(dev) == []


# -- corrupted chunk ------------------------------------------------------------------
def test_corrupted_chunk_rejected_until_republished(mk_link, tmp_path: Path) -> None:
    pub, dev = mk_link(), mk_link()
    blob = os.urandom(1_000_000)
    art = publish_artifact(pub, blob, 64 * KIB)
    total, k = len(art.chunks), 5
    good = chunk_of(blob, art, k)
    pub.publish(chunk_topic(art.sha256, k), os.urandom(len(good)), retain=True, qos=1, wait_s=10)

    store = ChunkStore(tmp_path / "chunks", art)
    dl = Downloader(dev, store, stall_timeout_s=60)
    bg = Background(dl, timeout_s=30)
    bg.start()
    wait_until(lambda: dl.stats.bad_chunks == 1 and store.count() == total - 1, what="all but the bad chunk")
    time.sleep(0.5)
    assert bg.is_alive() and not store.have(k) and not store.default_output.exists()
    assert k not in store.committed(), "a bad chunk is never journaled"
    start = k * art.chunk_size
    assert os.pread(os.open(store.data_path, os.O_RDONLY), len(good), start) == bytes(len(good)), "nor written"

    pub.publish(chunk_topic(art.sha256, k), good, retain=True, qos=1, wait_s=10)
    assert bg.wait(20).read_bytes() == blob
    s = dl.stats
    assert (s.bad_chunks, s.chunks_received, s.duplicates, s.receipts[k]) == (1, total, 0, 2)
    assert store.bad_chunks == 1


# -- stall recovery ---------------------------------------------------------------------
def test_stall_resubscribes_lost_subscription(mk_link, tmp_path: Path) -> None:
    """The broker forgets a subscription the link still remembers; the stall timer asks again."""
    pub, dev = mk_link(), mk_link()
    blob = os.urandom(300_000)
    art = Artifact.from_blob(blob, 64 * KIB)
    k = 2
    for i in range(len(art.chunks)):
        if i != k:
            pub.publish(chunk_topic(art.sha256, i), chunk_of(blob, art, i), retain=True, qos=1, wait_s=10)
    store = ChunkStore(tmp_path / "chunks", art)
    dl = Downloader(dev, store, stall_timeout_s=0.5)
    bg = Background(dl, timeout_s=30)
    bg.start()
    wait_until(lambda: store.count() == len(art.chunks) - 1, what="all chunks but the unpublished one")
    for topic in chunk_handlers(dev):  # white-box: the broker-side subscription (chunk k's, or the wildcard) is lost
        dev._client.unsubscribe(topic)
    time.sleep(0.2)
    pub.publish(chunk_topic(art.sha256, k), chunk_of(blob, art, k), retain=True, qos=1, wait_s=10)
    assert bg.wait(20).read_bytes() == blob
    assert dl.stats.resubscribes >= 1 and dl.stats.receipts[k] == 1


# -- bandwidth ------------------------------------------------------------------------------
def test_bandwidth_limit_honoured(mk_link, tmp_path: Path) -> None:
    pub, dev = mk_link(), mk_link()
    blob = os.urandom(1 * 1024 * KIB)
    art = publish_artifact(pub, blob, 32 * KIB)
    limit = 512 * KIB
    dl = Downloader(dev, ChunkStore(tmp_path / "chunks", art), bandwidth_bps=limit)
    assert dl.run(timeout_s=30).read_bytes() == blob
    assert dl.stats.elapsed >= len(blob) / limit * 0.8, dl.stats
    assert dl.stats.chunks_received == len(art.chunks)


# -- crash leftovers in the chunk directory ----------------------------------------
def test_torn_journal_stray_files_and_rotten_chunks_are_refetched(mk_link, tmp_path: Path) -> None:
    pub, dev = mk_link(), mk_link()
    blob = os.urandom(700_000)
    art = publish_artifact(pub, blob, 64 * KIB)
    total = len(art.chunks)
    root = tmp_path / "chunks"
    first = ChunkStore(root, art)
    for i in range(4):
        assert first.put(i, chunk_of(blob, art, i))
    assert not first.put(4, b"x" * 10) and first.bad_chunks == 1 and not first.have(4)
    first.close()  # group commit: journal names 0, 1, 2, 3
    assert first.committed() == [0, 1, 2, 3] and journal_records(first.dir) == 4
    # What a kill -9 / power loss / rot could leave behind:
    records = first.journal_path.read_bytes()
    first.journal_path.write_bytes(records[0:8] + records[24:32] + records[8:13])  # 0, 3, then a torn record
    (first.dir / ".data.k3j2h1.tmp").write_bytes(chunk_of(blob, art, 2)[:5000])  # a stray temp file
    (first.dir / "99.chunk").write_bytes(b"stray")
    with open(first.data_path, "r+b") as fh:  # right size, wrong bytes: caught at assembly
        fh.seek(3 * art.chunk_size)
        fh.write(os.urandom(64 * KIB))

    store = ChunkStore(root, art)
    assert sorted(store.discarded_on_open) == [".data.k3j2h1.tmp", "99.chunk", "journal[16:21]"]
    assert [i for i in range(4) if store.have(i)] == [0, 3]
    assert store.bytes_on_disk == 2 * 64 * KIB and journal_records(store.dir) == 2
    assert store.journal_path.stat().st_size == 16, "the torn tail was cut off"

    dl = Downloader(dev, store)
    assert dl.run(timeout_s=30).read_bytes() == blob
    s = dl.stats
    assert s.already_had == 2 and s.corrupt_on_disk == 1
    assert s.chunks_received == total - 1, "everything but chunk 0 (chunk 3 again after failing at assembly)"
    assert 0 not in s.receipts and s.receipts[3] == 1 and s.duplicates == 0


def test_a_data_file_of_the_wrong_size_is_not_trusted(tmp_path: Path) -> None:
    blob = os.urandom(200_000)
    art = Artifact.from_blob(blob, 64 * KIB)
    first = ChunkStore(tmp_path, art)
    assert first.put(0, chunk_of(blob, art, 0))
    first.close()
    with open(first.data_path, "r+b") as fh:
        fh.truncate(1000)  # e.g. a file from another artifact layout
    store = ChunkStore(tmp_path, art)
    assert sorted(store.discarded_on_open) == ["data", "journal"] and store.count() == 0


STORE_WRITER = """
import json, os, sys
from pathlib import Path
from edge_agent.fsutil import sha256_file
from edge_agent.mqtt.chunks import ChunkStore
from edge_agent.wire.protocol import Artifact
root, art, blob_path = Path(sys.argv[1]), Artifact(**json.loads(sys.argv[2])), sys.argv[3]
blob = Path(blob_path).read_bytes()
store = ChunkStore(root, art, commit_bytes=2 * art.chunk_size)
order = list(range(len(art.chunks)))[::-1]  # out of order: the hash prefix is read back from disk
print("ready", flush=True)
while True:
    for i in order:
        store.put(i, blob[i * art.chunk_size : (i + 1) * art.chunk_size])
        print("committed", len(store.committed()), flush=True)
    print("discard", flush=True)
    store.discard()
"""


def test_kill9_during_group_commits_never_loses_or_tears_a_journaled_chunk(tmp_path: Path) -> None:
    """SIGKILL a writer at random moments of pwrite / fdatasync / journal append; every journaled chunk verifies."""
    blob = os.urandom(40 * 16 * KIB + 123)
    art = Artifact.from_blob(blob, 16 * KIB)
    (tmp_path / "blob").write_bytes(blob)
    root = tmp_path / "chunks"
    rng = random.Random(15)
    kept = 0
    for _ in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", STORE_WRITER, str(root), json.dumps(asdict(art)), str(tmp_path / "blob")],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        lines = [proc.stdout.readline() for _ in range(rng.randrange(1, 60))]
        proc.send_signal(signal.SIGKILL)
        lines += proc.stdout.read().splitlines(keepends=True)  # everything it printed before it died
        proc.wait(10)
        done = [ln.split() for ln in lines if ln.endswith("\n")]  # a line cut by the kill says nothing
        last = [ln for ln in done if ln[0] == "discard" or len(ln) == 2] or [["committed", "0"]]
        store = ChunkStore(root, art)
        committed = store.committed()
        if last[-1][0] == "committed":  # (a kill inside discard() may leave any part of the directory)
            assert len(committed) >= int(last[-1][1]), "a committed chunk was lost"
        for i in committed:  # nothing torn: every chunk the journal names is intact on disk
            assert store.verify(i, store._read(i)), f"journaled chunk {i} is torn"
        kept += len(committed)
        store.close()
    assert kept > 0, "the writer never committed a group: the test exercised nothing"
    # And a store reopened after the last kill still completes into the right artifact.
    store = ChunkStore(root, art)
    for i in store.missing():
        store.put(i, chunk_of(blob, art, i))
    assert store.assemble(tmp_path / "out.tar").read_bytes() == blob


def test_assemble_needs_every_chunk_verified_and_leaves_the_whole_digest_to_the_consumer(tmp_path: Path) -> None:
    blob = os.urandom(200_000)
    art = Artifact.from_blob(blob, 64 * KIB)
    store = ChunkStore(tmp_path, art)
    with pytest.raises(TransferError, match="missing"):
        store.assemble(tmp_path / "out.tar")
    # Chunks found in the journal (an earlier process wrote them) are read back and checked once:
    for i in range(len(art.chunks)):
        assert store.put(i, chunk_of(blob, art, i))
    store.close()
    with open(store.data_path, "r+b") as fh:  # chunk 1 rots on disk while the agent is down
        fh.seek(art.chunk_size + 100)
        fh.write(b"rot")
    reopened = ChunkStore(tmp_path, art)
    assert reopened.complete
    with pytest.raises(CorruptChunksError) as err:
        reopened.assemble(tmp_path / "out.tar")
    assert err.value.indices == [1] and reopened.missing() == [1] and reopened.committed() == [0, 2, 3]
    assert not (tmp_path / "out.tar").exists()
    assert reopened.put(1, chunk_of(blob, art, 1))
    assert reopened.assemble(tmp_path / "out.tar").read_bytes() == blob
    # Chunk hashes that verify but do not compose the declared whole: assembly does not hash the whole
    # (the update machine's verifying step does, once: tests/test_ota.py "whole-artifact sha256 mismatch").
    liar = Artifact(hashlib.sha256(b"other").hexdigest(), art.size, art.chunk_size, art.chunks)
    lstore = ChunkStore(tmp_path, liar)
    for i in range(len(art.chunks)):
        assert lstore.put(i, chunk_of(blob, art, i))
    out = lstore.assemble(tmp_path / "liar.tar")
    assert out.read_bytes() == blob and sha256_file(out) != liar.sha256
    assert not lstore.dir.exists() and lstore.missing() == list(range(len(art.chunks)))
    with pytest.raises(ManifestError):
        ChunkStore(tmp_path, Artifact("../../etc", 1, 1, [art.chunks[0]]))
    with pytest.raises(ManifestError):
        ChunkStore(tmp_path, Artifact(art.sha256, art.size, art.chunk_size, art.chunks[:-1]))


def test_zero_byte_artifact(mk_link, tmp_path: Path) -> None:
    art = publish_artifact(mk_link(), b"", 64 * KIB)  # publishes nothing: an empty retained payload deletes
    store = ChunkStore(tmp_path, art)
    assert store.complete
    assert Downloader(mk_link(), store).run(timeout_s=5).read_bytes() == b""


# -- stop and timeout ---------------------------------------------------------------------
def test_timeout_and_stop_keep_progress(mk_link, tmp_path: Path) -> None:
    pub, dev = mk_link(), mk_link()
    blob = os.urandom(300_000)
    art = Artifact.from_blob(blob, 64 * KIB)
    pub.publish(chunk_topic(art.sha256, 0), chunk_of(blob, art, 0), retain=True, qos=1, wait_s=10)
    store = ChunkStore(tmp_path, art)
    dl = Downloader(dev, store)
    with pytest.raises(TransferTimeout) as exc:
        dl.run(timeout_s=1)
    assert isinstance(exc.value, FailedError) and "1/5" in str(exc.value)
    assert store.have(0) and chunk_handlers(dev) == []

    stop = threading.Event()
    bg = Background(Downloader(dev, store), stop=stop)
    bg.start()
    time.sleep(0.3)
    stop.set()
    with pytest.raises(TransferStopped):
        bg.wait(5)
    assert store.have(0) and chunk_handlers(dev) == []


# -- publisher --------------------------------------------------------------------------
def retained_chunks(link: MqttLink, sha: str, timeout: float = 10) -> dict[int, bytes]:
    """The retained chunks a fresh subscriber gets for ``sha``; a marker published after the
    SUBSCRIBE on the same connection arrives after every retained message, so none is missed."""
    got: dict[int, bytes] = {}
    done = threading.Event()
    marker = f"{ROOT}/artifacts/{sha}/end-marker-{os.getpid()}"

    def on(topic: str, payload: bytes, retained: bool) -> None:
        if topic == marker:
            done.set()
        elif payload:
            got[int(topic.rsplit("/", 1)[1])] = payload

    link.subscribe(f"{ROOT}/artifacts/{sha}/#", on)
    link.publish(marker, b"end", qos=1)
    assert done.wait(timeout), "marker never arrived"
    link.unsubscribe(f"{ROOT}/artifacts/{sha}/#")
    return got


def test_publish_and_clear_artifact(mk_link) -> None:
    pub = mk_link()
    blob = os.urandom(500_000)
    art = publish_artifact(pub, blob, 64 * KIB, url="https://cdn.example/a.tar")
    assert art.url == "https://cdn.example/a.tar" and art.size == len(blob)
    got = retained_chunks(mk_link(), art.sha256)
    assert b"".join(got[i] for i in sorted(got)) == blob and sorted(got) == list(range(len(art.chunks)))

    clear_artifact(pub, art)
    assert retained_chunks(mk_link(), art.sha256) == {}


# -- HTTP(S) Range transport --------------------------------------------------------
class ArtifactServer(http.server.ThreadingHTTPServer):
    """A real local HTTP server for one blob: ``mode`` = range (206), full (ignores Range) or error (503)."""

    def __init__(self, blob: bytes, mode: str) -> None:
        self.blob, self.mode, self.ranges = blob, mode, []
        super().__init__(("127.0.0.1", 0), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/artifact.tar"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ArtifactServer

    def do_GET(self) -> None:
        srv = self.server
        if srv.mode == "error":
            self.send_error(503)
            return
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if srv.mode == "range" and m:
            a, b = int(m.group(1)), min(int(m.group(2)), len(srv.blob) - 1)
            srv.ranges.append((a, b))
            body = srv.blob[a : b + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{len(srv.blob)}")
        else:
            body = srv.blob
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("mode", ["range", "full"])
def test_http_fetches_only_missing_chunks(mk_link, tmp_path: Path, mode: str) -> None:
    blob = os.urandom(1_000_000)
    srv = ArtifactServer(blob, mode)
    try:
        art = Artifact.from_blob(blob, 64 * KIB, url=srv.url)  # nothing on MQTT: HTTP must do it all
        total = len(art.chunks)
        store = ChunkStore(tmp_path, art)
        for i in range(0, total, 3):
            store.put(i, chunk_of(blob, art, i))
        already = store.count()
        dl = Downloader(mk_link(), store)
        assert dl.run(timeout_s=30).read_bytes() == blob
        s = dl.stats
        assert s.http_chunks == s.chunks_received == total - already and s.receipts == {} and s.http_errors == 0
        if mode == "range":  # one request per run of consecutive missing chunks, nothing already on disk
            cs = art.chunk_size
            runs = [(i * cs, min((i + 2) * cs, len(blob)) - 1) for i in range(1, total, 3)]
            assert srv.ranges == runs
    finally:
        srv.close()


def test_http_failure_falls_back_to_mqtt(mk_link, tmp_path: Path) -> None:
    blob = os.urandom(500_000)
    srv = ArtifactServer(blob, "error")
    try:
        art = publish_artifact(mk_link(), blob, 64 * KIB, url=srv.url)
        dl = Downloader(mk_link(), ChunkStore(tmp_path, art))
        assert dl.run(timeout_s=30).read_bytes() == blob
        s = dl.stats
        assert s.http_errors == 1 and s.http_chunks == 0 and s.chunks_received == len(art.chunks)
        assert s.receipts == {i: 1 for i in range(len(art.chunks))}
    finally:
        srv.close()
