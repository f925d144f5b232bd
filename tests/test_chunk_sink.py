"""The chunk sink (edge_agent/mqtt/sink.py): a real helper process, a real mosquitto, real files.

Every test starts the helper as the agent does (``python -m edge_agent.mqtt.sink``), publishes
retained chunks to the test's broker and downloads them through it. What is checked is what the
in-process path promises (tests/test_transfer.py, tests/test_transfer_crash.py): the bytes, the
counts, a bad chunk never written nor journaled, and what a crash keeps, here the helper's crash
and the agent's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_batch.fleetops.publish import publish_artifact
from edge_agent.errors import TransferError, TransferTimeout
from edge_agent.mqtt.chunks import ChunkStore
from edge_agent.mqtt.download import Downloader
from edge_agent.mqtt.sink import ChunkSink
from edge_agent.wire.artifact import Artifact
from edge_agent.wire.topics import chunk_topic
from tests.broker import Broker
from tests.support.transfer import KIB, Background, chunk_handlers, chunk_of, journal_records, publish_with_bad_chunk
from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sink() -> Iterator[ChunkSink]:
    s = ChunkSink()
    yield s
    s.close()


def _through(sink: ChunkSink, dev, root: Path, art: Artifact, blob: bytes) -> Downloader:
    """A download through ``sink``, checked: the artifact's bytes, stored by the helper."""
    dl = Downloader(dev, ChunkStore(root, art), sink=sink)
    assert dl.run(timeout_s=30).read_bytes() == blob and dl.stats.via_sink
    return dl


def _gone(pid: int) -> bool:
    """The process has exited (no entry, or a zombie nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_sink_download_is_the_artifact(sink: ChunkSink, mk_link, tmp_path: Path) -> None:
    pub, dev = mk_link(), mk_link()
    blob = os.urandom(1_500_000)
    art = publish_artifact(pub, blob, 64 * KIB)
    total = len(art.chunks)
    seen: list[tuple[int, int]] = []
    store = ChunkStore(tmp_path / "chunks", art)
    dl = Downloader(dev, store, sink=sink, on_progress=lambda have, n: seen.append((have, n)))
    path = dl.run(timeout_s=30)

    assert path == store.default_output and path.read_bytes() == blob
    s = dl.stats
    assert s.via_sink and (s.chunks_received, s.bad_chunks, s.bytes_received) == (total, 0, len(blob))
    assert seen[-1] == (total, total) and seen == sorted(seen)
    assert not store.dir.exists() and store.count() == 0, "chunks deleted; the agent's store read the directory again"
    assert chunk_handlers(dev) == [] and sink.alive

    # The helper serves the next transfer too (its ring and ack pipe reused).
    blob2 = os.urandom(700_000)
    art2 = publish_artifact(pub, blob2, 32 * KIB)
    _through(sink, dev, tmp_path / "chunks", art2, blob2)


def test_sink_never_writes_a_bad_chunk(sink: ChunkSink, mk_link, tmp_path: Path) -> None:
    pub, dev = mk_link(), mk_link()
    k = 5
    blob, art, good = publish_with_bad_chunk(pub, 1_000_000, k, bad_size=100)  # short: counted as it arrived
    total = len(art.chunks)
    store = ChunkStore(tmp_path / "chunks", art, commit_interval_s=0.05)
    dl = Downloader(dev, store, sink=sink, stall_timeout_s=60)
    bg = Background(dl, timeout_s=30)
    bg.start()
    wait_for(lambda: dl.stats.bad_chunks == 1 and dl.progress()[0] == total - 1, what="all but the bad chunk")
    wait_for(lambda: journal_records(store.dir) == total - 1, what="the good chunks journaled")
    assert k not in ChunkStore(tmp_path / "chunks", art).committed(), "a bad chunk is never journaled"
    fd = os.open(store.data_path, os.O_RDONLY)
    try:
        assert os.pread(fd, len(good), k * art.chunk_size) == bytes(len(good)), "nor written"
    finally:
        os.close(fd)

    pub.publish(chunk_topic(art.sha256, k), good, retain=True, qos=1, wait_s=10)
    assert bg.wait(20).read_bytes() == blob
    s = dl.stats
    assert s.via_sink and (s.bad_chunks, s.chunks_received, s.receipts[k]) == (1, total, 2)
    assert s.bytes_received == len(blob) + 100


def test_a_killed_sink_fails_the_transfer_and_the_next_one_resumes(sink: ChunkSink, mk_link, tmp_path: Path) -> None:
    """kill -9 of the helper mid-transfer: a TransferError; what it journaled is kept and not fetched again."""
    pub, dev = mk_link(), mk_link()
    blob = os.urandom(1_200_000)
    art = Artifact.from_blob(blob, 64 * KIB)
    total, half = len(art.chunks), len(art.chunks) // 2
    for i in range(half):
        pub.publish(chunk_topic(art.sha256, i), chunk_of(blob, art, i), retain=True, qos=1, wait_s=10)
    store = ChunkStore(tmp_path / "chunks", art, commit_interval_s=0.05)
    dl = Downloader(dev, store, sink=sink, stall_timeout_s=60)
    bg = Background(dl, timeout_s=30)
    bg.start()
    wait_for(lambda: dl.progress()[0] == half, what="the published half")
    wait_for(lambda: journal_records(store.dir) == half, what="the half journaled by the helper")
    sink.kill()
    with pytest.raises(TransferError, match="chunk sink is gone"):
        bg.wait(10)
    assert not sink.alive and store.committed() == list(range(half)), "the agent's store read the journal"
    assert sink.session(store) is None, "a dead sink takes no transfer"

    for i in range(half, total):
        pub.publish(chunk_topic(art.sha256, i), chunk_of(blob, art, i), retain=True, qos=1, wait_s=10)
    again = Downloader(dev, store, sink=sink)
    assert again.run(timeout_s=30).read_bytes() == blob
    assert again.stats.already_had == half and again.stats.chunks_received == total - half
    assert not again.stats.via_sink, "a resumed download is stored in the agent"


AGENT = """
import json, sys
from pathlib import Path
from edge_agent.mqtt.chunks import ChunkStore
from edge_agent.mqtt.download import Downloader
from edge_agent.mqtt.link import MqttLink
from edge_agent.mqtt.sink import ChunkSink
from edge_agent.wire.artifact import artifact_from_dict
url, root, art = sys.argv[1], sys.argv[2], artifact_from_dict(json.loads(sys.argv[3]))
link = MqttLink(url)
link.start()
sink = ChunkSink()
print(sink.pid, flush=True)
Downloader(link, ChunkStore(Path(root), art, commit_interval_s=0.05), sink=sink).run(timeout_s=60)
"""


def test_kill9_of_the_agent_mid_transfer_ends_the_sink_and_keeps_the_journal(
    broker: Broker, mk_link, tmp_path: Path
) -> None:
    """The agent dies with half the chunks in: its helper exits too, and a new agent resumes from the journal."""
    pub = mk_link()
    blob = os.urandom(1_200_000)
    art = Artifact.from_blob(blob, 64 * KIB)
    total, half = len(art.chunks), len(art.chunks) // 2
    for i in range(half):
        pub.publish(chunk_topic(art.sha256, i), chunk_of(blob, art, i), retain=True, qos=1, wait_s=10)
    root = tmp_path / "chunks"
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, broker.url, str(root), json.dumps(art.to_dict())],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert agent.stdout is not None
        helper = int(agent.stdout.readline())
        wait_for(lambda: journal_records(root / art.sha256) == half, what="the published half journaled")
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        wait_for(lambda: _gone(helper), timeout=10, what="the helper to exit with the agent")
    finally:
        agent.kill()
        agent.wait()

    for i in range(half, total):
        pub.publish(chunk_topic(art.sha256, i), chunk_of(blob, art, i), retain=True, qos=1, wait_s=10)
    dl = Downloader(mk_link(), ChunkStore(root, art))
    assert dl.run(timeout_s=30).read_bytes() == blob
    assert dl.stats.already_had == half and set(dl.stats.receipts) == set(range(half, total))


def test_a_store_the_helper_cannot_create_is_a_transfer_error(sink: ChunkSink, mk_link, tmp_path: Path) -> None:
    pub, dev = mk_link(), mk_link()
    blob = os.urandom(200_000)
    art = publish_artifact(pub, blob, 64 * KIB)
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(TransferError, match="cannot create"):
        Downloader(dev, ChunkStore(tmp_path / "file" / "chunks", art), sink=sink).run(timeout_s=10)
    assert sink.alive, "the helper survives a refused store"
    _through(sink, dev, tmp_path / "chunks", art, blob)


def test_a_busy_sink_leaves_the_download_in_the_agent(sink: ChunkSink, mk_link, tmp_path: Path) -> None:
    pub, dev = mk_link(), mk_link()
    blob = os.urandom(300_000)
    art = publish_artifact(pub, blob, 64 * KIB)
    other = ChunkStore(tmp_path / "other", Artifact.from_blob(b"x" * 1000, 64 * KIB))
    held = sink.session(other)
    assert held is not None
    try:
        dl = Downloader(dev, ChunkStore(tmp_path / "chunks", art), sink=sink)
        assert dl.run(timeout_s=10).read_bytes() == blob and not dl.stats.via_sink
    finally:
        held.close()
    assert sink.session(other) is not None, "a closed session frees the helper"


def test_a_full_ring_waits_for_the_helper(mk_link, tmp_path: Path) -> None:
    """A ring of 4 slots for 23 chunks: the paho thread waits for freed slots, nothing is lost or reordered."""
    pub, dev = mk_link(), mk_link()
    blob = os.urandom(1_500_000)
    art = publish_artifact(pub, blob, 64 * KIB)
    small = ChunkSink(ring_bytes=4 * 64 * KIB)
    try:
        dl = _through(small, dev, tmp_path / "chunks", art, blob)
        assert dl.stats.chunks_received == len(art.chunks) == 23
        big = Artifact.from_blob(os.urandom(3 * 128 * KIB), 128 * KIB)
        assert small.session(ChunkStore(tmp_path / "big", big)) is None, "chunks too large for 4 slots: in the agent"
    finally:
        small.close()


def test_a_timed_out_sink_transfer_keeps_what_it_stored(sink: ChunkSink, mk_link, tmp_path: Path) -> None:
    pub, dev = mk_link(), mk_link()
    blob = os.urandom(300_000)
    art = Artifact.from_blob(blob, 64 * KIB)
    pub.publish(chunk_topic(art.sha256, 0), chunk_of(blob, art, 0), retain=True, qos=1, wait_s=10)
    store = ChunkStore(tmp_path, art)
    with pytest.raises(TransferTimeout, match="1/5"):
        Downloader(dev, store, sink=sink).run(timeout_s=1)
    assert store.committed() == [0] and chunk_handlers(dev) == [], "the helper journaled it as it closed"
    assert sink.alive and sink.session(store) is not None, "and is free for the next transfer"


def test_a_failed_assembly_keeps_every_chunk(sink: ChunkSink, mk_link, tmp_path: Path) -> None:
    pub, dev = mk_link(), mk_link()
    blob = os.urandom(500_000)
    art = publish_artifact(pub, blob, 64 * KIB)
    (tmp_path / "file").write_text("not a directory")
    store = ChunkStore(tmp_path / "chunks", art)
    with pytest.raises(TransferError, match="cannot assemble"):
        Downloader(dev, store, sink=sink, out_path=tmp_path / "file" / "a.tar").run(timeout_s=10)
    assert store.committed() == list(range(len(art.chunks))), "the helper journaled the last group as it closed"
    again = Downloader(dev, store, sink=sink)
    assert again.run(timeout_s=10).read_bytes() == blob
    assert again.stats.already_had == len(art.chunks) and again.stats.receipts == {}


def test_keep_chunks_through_the_sink_journals_them_all(sink: ChunkSink, mk_link, tmp_path: Path) -> None:
    pub, dev = mk_link(), mk_link()
    blob = os.urandom(400_000)
    art = publish_artifact(pub, blob, 64 * KIB)
    store = ChunkStore(tmp_path / "chunks", art)
    dl = Downloader(dev, store, sink=sink, keep_chunks=True)
    assert dl.run(timeout_s=10).read_bytes() == blob and dl.stats.via_sink
    assert store.committed() == list(range(len(art.chunks))) and store.data_path.stat().st_size == len(blob)


def test_a_refused_store_still_frees_every_slot(tmp_path: Path) -> None:
    """8 chunks into a 4-slot ring whose helper could not open the store: the helper frees each slot anyway,
    so the paho thread (here: this test) never blocks on a full ring; the transfer then fails with the reason."""
    blob = os.urandom(8 * 64 * KIB)
    art = Artifact.from_blob(blob, 64 * KIB)
    (tmp_path / "file").write_text("not a directory")
    small = ChunkSink(ring_bytes=4 * 64 * KIB)
    try:
        session = small.session(ChunkStore(tmp_path / "file" / "chunks", art))
        assert session is not None
        putter = threading.Thread(target=lambda: [session.put(i, chunk_of(blob, art, i)) for i in range(8)])
        putter.start()
        putter.join(10)
        assert not putter.is_alive(), "put() blocked on a ring the helper never freed"
        with pytest.raises(TransferError, match="cannot create"):
            session.results(5)
        session.close()
        assert small.alive
    finally:
        small.close()
