"""Verified chunks of one artifact on disk, resumable across kill -9 (device side).

The wire contract is in ``wire/protocol.py``: the release job publishes an artifact as RETAINED
chunk messages on ``chunk_topic(sha256, index)`` and describes it in the signed release as an
``Artifact`` (whole sha256, size, chunk size, sha256 of every chunk).

``ChunkStore`` keeps one file per verified chunk in ``root/<sha256>/<index>.chunk``. Every chunk
is hash-checked before it is written (temp file, fsync, ``os.replace``), so a kill -9 never
leaves a torn file that looks valid. On open, stray temp files and chunk files of the wrong size
are deleted; chunk hashes are checked again while assembling (a chunk that rotted on disk is
dropped and fetched again). ``download.Downloader`` fills the store over MQTT or HTTP(S).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from edge_agent.errors import CorruptChunksError, ManifestError, TransferError
from edge_agent.fsutil import atomic_write_bytes, fsync_dir
from edge_agent.wire.protocol import Artifact, check_artifact

log = logging.getLogger(__name__)

_CHUNK_FILE = re.compile(r"^(0|[1-9][0-9]*)\.chunk$")


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
