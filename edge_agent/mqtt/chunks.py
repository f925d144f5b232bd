"""Verified chunks of one artifact on disk, resumable across kill -9 and power loss (device side).

The wire contract is in ``wire/protocol.py``: the release job publishes an artifact as RETAINED
chunk messages on ``chunk_topic(sha256, index)`` and describes it in the signed release as an
``Artifact`` (whole sha256, size, chunk size, sha256 of every chunk).

``ChunkStore`` keeps, in ``root/<sha256>/``:

- ``data``: one file of the artifact's size; a chunk is written at its offset (``pwrite``) only
  after its size and sha256 match the artifact;
- ``journal``: the verified-chunk journal (``journal.py``), 8-byte records appended in groups.

A group commit is ``fdatasync(data)``, then append the group's records, then ``fdatasync(journal)``,
so the journal never names a chunk whose bytes could be missing after a crash or power loss. A
kill -9 loses at most the uncommitted groups (``commit_bytes`` / ``commit_interval_s``; ``put``
waits while two groups' worth are pending): those chunks are simply fetched again. On open, a
torn or foreign journal tail is cut off, a data file of the wrong size and stray files deleted.
Creating the data file fsyncs no directory: the journal's first append does, which makes the data
file's entry durable too (before it, no record names a chunk).

Assembly needs every chunk, each verified: a chunk received by this object was hash-checked in
memory before its ``pwrite``; a chunk found in the journal (written by an earlier process) is read
back and hash-checked once, and one that rotted on disk is dropped and fetched again
(CorruptChunksError). Then the data file is fsynced and renamed into place: no copy. That last
``fdatasync`` runs alongside a group commit still in progress, and neither appends to the journal
(it is deleted with the directory right after the rename): a crash before the rename loses only
the last group's records, as one a moment earlier would have. The store does **not** hash the
whole artifact: the chunk hashes prove every byte, and the one whole sha256 check is the
consumer's (the update machine's verifying step, before anything is unpacked), so each byte is
hashed twice, not three times. ``download.Downloader`` fills the store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import BinaryIO

from edge_agent.errors import CorruptChunksError, TransferError
from edge_agent.fsutil import atomic_write_bytes, fsync_dir
from edge_agent.mqtt.journal import Journal, open_data
from edge_agent.wire.artifact import Artifact, check_artifact

log = logging.getLogger(__name__)

DATA_FILE = "data"
JOURNAL_FILE = "journal"
DEFAULT_COMMIT_BYTES = 4 << 20  # verified bytes per group commit
DEFAULT_COMMIT_INTERVAL_S = 0.5  # ... or this long after the oldest uncommitted chunk


class ChunkStore:
    """Verified chunks of one artifact in ``root/<sha256>/{data,journal}``; survives kill -9.

    One process at a time per directory. Methods are thread-safe. ``have()`` counts chunks
    written but not yet committed (they survive kill -9 in the page cache, but the journal only
    names them after the next group commit).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        artifact: Artifact,
        *,
        commit_bytes: int = DEFAULT_COMMIT_BYTES,
        commit_interval_s: float = DEFAULT_COMMIT_INTERVAL_S,
    ) -> None:
        self.artifact = check_artifact(artifact)
        self.root = Path(root)
        self.dir = self.root / artifact.sha256
        self.total = len(artifact.chunks)
        self.commit_bytes = commit_bytes
        self.commit_interval_s = commit_interval_s
        self.bad_chunks = 0  # put() calls rejected (hash or size mismatch)
        self.commits = 0  # group commits done by this object
        self.discarded_on_open: list[str] = []  # stray files / torn journal tail removed when opening
        self._lock = threading.RLock()
        self._journal = Journal(self.dir / JOURNAL_FILE, [bytes.fromhex(h)[:4] for h in artifact.chunks])
        self._have: set[int] = set()
        self._journaled: set[int] = set()  # what the journal names (a crash keeps exactly these)
        self._checked: set[int] = set()  # held chunks whose bytes this object verified (in memory or read back)
        self._wake = threading.Condition()  # guards the pending group; put() wakes the committer ~twice a group
        self._pending: list[int] = []  # stored, not yet committed (the next group), oldest first
        self._pending_bytes, self._pending_since = 0, 0.0  # since: when the oldest pending chunk was stored
        self._stopping = False
        self._moving = False  # assemble() is about to rename the data file: no more journal appends
        self._worker: threading.Thread | None = None
        self._worker_error: OSError | None = None
        self._fh: BinaryIO | None = None
        self._open()

    # -- layout ---------------------------------------------------------------------
    def expected_size(self, index: int) -> int:
        if not 0 <= index < self.total:
            raise IndexError(f"chunk {index} out of range 0..{self.total - 1}")
        if index < self.total - 1:
            return self.artifact.chunk_size
        return self.artifact.size - self.artifact.chunk_size * (self.total - 1)

    @property
    def data_path(self) -> Path:
        return self.dir / DATA_FILE

    @property
    def journal_path(self) -> Path:
        return self.dir / JOURNAL_FILE

    @property
    def default_output(self) -> Path:
        """Where ``Downloader`` assembles the artifact by default: ``root/<sha256>.<format>``."""
        return self.root / f"{self.artifact.sha256}.{self.artifact.format}"

    def _empty(self) -> set[int]:  # an empty chunk (zero-byte artifact) is never a retained message
        return {i for i in range(self.total) if self.expected_size(i) == 0}

    def _open(self) -> None:
        self._have = self._empty()
        if not self.dir.is_dir():
            return
        for entry in os.scandir(self.dir):
            if entry.name not in (DATA_FILE, JOURNAL_FILE) and not entry.is_dir(follow_symlinks=False):
                self._discard_file(entry.name)  # temp or foreign files: never trusted
        data_ok = self.data_path.is_file() and self.data_path.stat().st_size == self.artifact.size
        if not data_ok:
            for name in (DATA_FILE, JOURNAL_FILE):
                if (self.dir / name).exists():
                    self._discard_file(name)
            return
        indices, good, size = self._journal.load()
        self._have.update(indices)
        self._journaled.update(indices)
        if good != size:  # a torn append (kill -9 / power loss) or garbage: cut off
            self.discarded_on_open.append(f"{JOURNAL_FILE}[{good}:{size}]")
        if self.discarded_on_open:
            log.info("chunk store %s: discarded %s", self.dir, self.discarded_on_open[:5])

    def _discard_file(self, name: str) -> None:
        self.discarded_on_open.append(name)
        (self.dir / name).unlink(missing_ok=True)

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
        """Bytes of the verified chunks held (committed or pending)."""
        with self._lock:
            return sum(self.expected_size(i) for i in self._have)

    def committed(self) -> list[int]:
        """Chunk indices the journal names (what a crash right now would keep), sorted."""
        with self._lock:
            return sorted(self._journaled)

    # -- mutation ---------------------------------------------------------------------
    def verify(self, index: int, data: bytes | memoryview) -> bool:
        return len(data) == self.expected_size(index) and self.artifact.chunk_matches(index, data)

    def put(self, index: int, data: bytes | memoryview) -> bool:
        """Store chunk ``index`` if its size and sha256 match the artifact; a bad chunk is counted, never stored.

        Returns True when the chunk is (now) held. The group commit runs on a background thread,
        overlapped with receiving. Raises TransferError if a disk write or an earlier commit failed.
        """
        if not self.verify(index, data):
            with self._lock:
                self.bad_chunks += 1
            log.warning("chunk %d of %s rejected: size or sha256 mismatch", index, self.artifact.sha256[:12])
            return False
        with self._lock:
            self._raise_worker_error()
            if index in self._have:
                return True
            try:
                os.pwrite(self._file().fileno(), data, index * self.artifact.chunk_size)
            except OSError as exc:
                raise TransferError(f"cannot store chunk {index} in {self.dir}: {exc}") from exc
            self._have.add(index)
            self._checked.add(index)
        with self._wake:  # not under self._lock: the committer must get in between two puts
            worker = self._worker
            while self._pending_bytes >= 2 * self.commit_bytes and worker is not None and worker.is_alive():
                self._wake.wait(0.05)  # the committer fell behind (a busy CPU): bound what a crash loses
            self._pending.append(index)
            self._pending_bytes += len(data)
            if len(self._pending) == 1:  # the committer starts its commit_interval_s clock
                self._pending_since = time.monotonic()
                self._start_worker()
                self._wake.notify_all()
            elif self._pending_bytes >= self.commit_bytes:
                self._wake.notify_all()
        return True

    def prepare(self) -> None:
        """Create the data file and start the committer before chunks arrive (``put`` does it otherwise).

        Off the receive path: preallocation and a thread start cost up to a few ms on a busy CPU.
        """
        with self._lock:
            try:
                self._file()
            except OSError as exc:
                raise TransferError(f"cannot create {self.data_path}: {exc}") from exc
        with self._wake:
            self._start_worker()

    def _raise_worker_error(self) -> None:
        if self._worker_error is not None:
            exc, self._worker_error = self._worker_error, None
            raise TransferError(f"cannot commit chunks in {self.dir}: {exc}") from exc

    def _start_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._run_worker, name=f"chunks-{self.artifact.sha256[:8]}")
            self._worker.daemon = True
            self._worker.start()

    def _run_worker(self) -> None:
        """Background: commit the pending group when it is big (commit_bytes) or old (commit_interval_s).

        It wakes when a group starts and when it is full, not once per chunk: the receiving threads
        keep the CPU. On ``_stopping`` it exits and leaves what is pending to ``_stop_worker``.
        """
        while True:
            with self._wake:
                while not self._stopping and self._pending_bytes < self.commit_bytes:
                    if not self._pending:
                        self._wake.wait()
                        continue
                    left = self._pending_since + self.commit_interval_s - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                if self._stopping:
                    return
                group = self._pending
                self._pending, self._pending_bytes = [], 0
                self._wake.notify_all()
            self._commit(group)

    def _commit(self, indices: list[int], journal: bool = True) -> None:
        """Group commit: fdatasync the data, then append and fdatasync the journal records.

        ``journal=False``: the data only (the data file is renamed away next). A disk error is kept
        and raised by the next ``put`` or ``close`` (as TransferError).
        """
        with self._lock:
            indices = [i for i in indices if i in self._have]  # not dropped meanwhile
        if not indices:
            return
        try:
            os.fdatasync(self._file().fileno())
            journal = journal and not self._moving  # a commit in progress when assemble() began: data only
            if journal:
                self._journal.append(indices)
        except OSError as exc:
            with self._lock:
                self._worker_error = exc
            return
        with self._lock:
            if journal:
                self._journaled.update(indices)
            self.commits += 1

    def _file(self) -> BinaryIO:
        """The data file, created and preallocated at the artifact's size on first use."""
        with self._lock:
            if self._fh is None:
                self._fh = open_data(self.data_path, self.artifact.size)
            return self._fh

    def _read(self, index: int) -> bytes:
        return os.pread(self._file().fileno(), self.expected_size(index), index * self.artifact.chunk_size)

    def _stop_worker(self, journal: bool = True) -> None:
        """Stop the worker and commit what is pending here (never called with the lock held).

        ``journal=False`` (the data file is renamed away next): the pending group's ``fdatasync``
        runs at once, alongside a commit in progress (whose journal append is then skipped),
        instead of after it.
        """
        worker = self._worker
        with self._wake:
            self._stopping, self._moving = True, not journal
            self._wake.notify_all()
            group, self._pending, self._pending_bytes = self._pending, [], 0
        if not journal:
            self._commit(group, journal=False)
            group = []
        if worker is not None and worker.is_alive():
            worker.join()
        with self._wake:
            group += self._pending
            self._pending, self._pending_bytes = [], 0
            self._stopping, self._moving, self._worker = False, False, None
        self._commit(group, journal)

    def drop(self, index: int) -> None:
        """Forget chunk ``index`` (it failed verification): rewrite the journal without it."""
        self._stop_worker()
        with self._lock:
            if self.expected_size(index) == 0 or index not in self._have:
                return
            self._have.discard(index)
            self._journaled.discard(index)
            self._checked.discard(index)
            self._journal.rewrite(sorted(self._journaled))

    def assemble(self, out_path: str | os.PathLike[str], *, keep: bool = False) -> Path:
        """Move the complete data file to ``out_path`` (fsynced; copied when ``keep``); every chunk verified.

        Chunks this object did not verify itself (found in the journal on open) are read back
        and checked first: one that no longer matches its hash is dropped and CorruptChunksError
        names it (fetch it again, then assemble again). The whole-artifact sha256 is not checked
        here (see the module docstring): the caller checks it once, before using the file.
        """
        out = Path(out_path)
        missing = self.missing()
        if missing:
            raise TransferError(f"cannot assemble {self.artifact.sha256[:12]}: {len(missing)} chunk(s) missing")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if self.artifact.size == 0:
                atomic_write_bytes(out, b"")
                return out
            self._check_on_disk()
            self._stop_worker(journal=keep)  # every chunk fdatasync'd; the last group journaled only if kept
            self._raise_worker_error()
            if keep:
                tmp = out.with_name(f".{out.name}.tmp")
                shutil.copyfile(self.data_path, tmp)
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, out)
            else:
                self.close()
                os.replace(self.data_path, out)
                self.discard()
            fsync_dir(out.parent)
        except OSError as exc:
            raise TransferError(f"cannot assemble {out}: {exc}") from exc
        return out

    def _check_on_disk(self) -> None:
        """Read back and hash-check the held chunks this object has not verified; drop the rotten ones."""
        with self._lock:
            unchecked = sorted(self._have - self._checked)
        corrupt = [i for i in unchecked if self.expected_size(i) and not self.verify(i, self._read(i))]
        for i in corrupt:
            self.drop(i)
        with self._lock:
            self._checked.update(i for i in unchecked if i in self._have)
        if corrupt:
            raise CorruptChunksError(corrupt)

    def close(self) -> None:
        """Commit what is pending and close the data file (the next put reopens it)."""
        self._stop_worker()
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            self._raise_worker_error()

    def reload(self) -> None:
        """Read the directory again, as a new object would (after the chunk sink, another process, wrote it)."""
        self.close()
        with self._lock:
            self._journaled, self._checked = set(), set()
            self._open()

    def discard(self) -> None:
        """Delete the chunk directory (after a successful install, or when the artifact is superseded)."""
        with contextlib.suppress(TransferError):  # a failed commit no longer matters
            self.close()
        with self._lock:
            shutil.rmtree(self.dir, ignore_errors=True)
            self._have, self._journaled, self._checked, self._worker_error = self._empty(), set(), set(), None

    def __repr__(self) -> str:
        return f"ChunkStore({str(self.dir)!r}, {self.count()}/{self.total})"
