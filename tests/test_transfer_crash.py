"""Chunked artifact transfer across crashes: an agent killed with kill -9 resumes, and a chunk store recovers.

A real mosquitto and real subprocesses: torn journals, stray files and rotten chunks are refetched, a
kill -9 during group commits never loses or tears a journaled chunk, and ``assemble`` needs every chunk.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from cloud_batch.fleetops.publish import publish_artifact
from edge_agent.errors import CorruptChunksError, ManifestError, TransferError
from edge_agent.fsutil import sha256_file
from edge_agent.mqtt.chunks import ChunkStore
from edge_agent.mqtt.download import Downloader
from edge_agent.wire.protocol import Artifact
from tests.broker import Broker
from tests.support.env import REPO
from tests.support.transfer import KIB, chunk_of, journal_records
from tests.support.wait import wait_for

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
        wait_for(
            lambda: journal_records(chunk_dir) >= total // 2 or proc.poll() is not None,
            timeout=30,
            step=0.005,
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


def test_assemble_journals_the_last_group_only_when_the_chunks_are_kept(tmp_path: Path) -> None:
    """The last group is fdatasynced either way; its records are written only if the journal outlives assembly."""
    blob = os.urandom(200_000)
    art = Artifact.from_blob(blob, 64 * KIB)
    total = len(art.chunks)
    stores = {}
    for name in ("kept", "moved"):  # no group commit before assembly: all chunks are the last group
        stores[name] = ChunkStore(tmp_path / name, art, commit_bytes=1 << 30, commit_interval_s=3600)
        for i in range(total):
            assert stores[name].put(i, chunk_of(blob, art, i))
    assert stores["kept"].assemble(tmp_path / "kept.tar", keep=True).read_bytes() == blob
    assert ChunkStore(tmp_path / "kept", art).committed() == list(range(total)), "a kept store resumes whole"
    assert stores["moved"].assemble(tmp_path / "moved.tar").read_bytes() == blob
    assert stores["moved"].commits == 1 and not stores["moved"].dir.exists(), "one data-only fdatasync, then rename"


def test_zero_byte_artifact(mk_link, tmp_path: Path) -> None:
    art = publish_artifact(mk_link(), b"", 64 * KIB)  # publishes nothing: an empty retained payload deletes
    store = ChunkStore(tmp_path, art)
    assert store.complete
    assert Downloader(mk_link(), store).run(timeout_s=5).read_bytes() == b""
