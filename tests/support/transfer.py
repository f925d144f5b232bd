"""Helpers for the chunked-transfer tests: blobs and chunks, a downloader on a thread, white-box looks at a store.

Shared by ``tests/test_transfer.py``, ``tests/test_transfer_crash.py``, ``tests/test_transfer_http.py`` and
``tests/test_chunk_sink.py``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from edge_agent.mqtt.download import Downloader
from edge_agent.mqtt.link import MqttLink
from edge_agent.wire.protocol import Artifact
from edge_agent.wire.topics import chunk_topic, parse_chunk_topic

KIB = 1024


def blob_of(size: int, seed: int = 0) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32) + os.urandom(size % 32)


def chunk_of(blob: bytes, art: Artifact, i: int) -> bytes:
    return blob[i * art.chunk_size : (i + 1) * art.chunk_size]


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
    return [t for t in link._handlers if parse_chunk_topic(t.replace("+", "0")) is not None]


def publish_with_bad_chunk(
    pub: MqttLink, size: int, k: int, bad_size: int | None = None
) -> tuple[bytes, Artifact, bytes]:
    """Publish a random artifact of 64 KiB chunks whose chunk ``k`` is garbage on the broker (of the good one's
    size, or ``bad_size`` bytes): (blob, artifact, good chunk k)."""
    from cloud_batch.fleetops.publish import publish_artifact

    blob = os.urandom(size)
    art = publish_artifact(pub, blob, 64 * KIB)
    good = chunk_of(blob, art, k)
    pub.publish(chunk_topic(art.sha256, k), os.urandom(bad_size or len(good)), retain=True, qos=1, wait_s=10)
    return blob, art, good
