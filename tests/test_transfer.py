"""Chunked artifact transfer over a real mosquitto (tests/broker.py): download, broker restarts, bad chunks.

No mocks: every test publishes retained chunks to a real broker and downloads them with a real
MqttLink into a real ChunkStore. Timing is only used as generous timeouts, except the bandwidth
test, which checks the limiter's effect (elapsed >= 0.8 * size / limit). Crash recovery is in
``test_transfer_crash.py``, publishing and the HTTP transport in ``test_transfer_http.py``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from cloud_batch.fleetops.publish import publish_artifact
from edge_agent.errors import FailedError, TransferStopped, TransferTimeout
from edge_agent.mqtt.chunks import ChunkStore
from edge_agent.mqtt.download import Downloader
from edge_agent.wire.protocol import Artifact
from edge_agent.wire.topics import chunk_topic
from tests.broker import Broker
from tests.support.transfer import KIB, Background, chunk_handlers, chunk_of, publish_with_bad_chunk
from tests.support.wait import wait_for


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
    wait_for(lambda: store.count() >= 0.4 * total, timeout=30, what="40% of the chunks")
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
    k = 5
    blob, art, good = publish_with_bad_chunk(pub, 1_000_000, k)
    total = len(art.chunks)

    store = ChunkStore(tmp_path / "chunks", art)
    dl = Downloader(dev, store, stall_timeout_s=60)
    bg = Background(dl, timeout_s=30)
    bg.start()
    wait_for(lambda: dl.stats.bad_chunks == 1 and store.count() == total - 1, what="all but the bad chunk")
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
    wait_for(lambda: store.count() == len(art.chunks) - 1, what="all chunks but the unpublished one")
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
