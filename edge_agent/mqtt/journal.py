"""The verified-chunk journal of a ``ChunkStore``: which chunks of its data file are durable.

Fixed 8-byte records: the chunk index (u32, little-endian) and the first 4 bytes of the chunk's
sha256. ``ChunkStore`` appends a group's records only after ``fdatasync`` of the data they name,
and ``append`` fdatasyncs them in turn, so a record never names bytes a crash could lose. A torn
append (kill -9, power loss) or foreign bytes never match their chunk's tag: ``load`` stops at
the first such record and cuts the tail off. ``open_data`` opens (creating and preallocating)
the data file those records describe.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path
from typing import BinaryIO

from edge_agent.fsutil import atomic_write_bytes, fsync_dir

RECORD = struct.Struct("<I4s")  # chunk index, sha256(chunk)[:4]


class Journal:
    """Append-only records at ``path`` for an artifact whose chunk ``i`` has tag ``tags[i]``."""

    def __init__(self, path: Path, tags: list[bytes]) -> None:
        self.path = path
        self.tags = tags

    def load(self) -> tuple[list[int], int, int]:
        """(indices named by the valid prefix, its length, the file's length); a bad tail is cut off."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return [], 0, 0
        indices: list[int] = []
        good = 0
        for off in range(0, len(raw) - RECORD.size + 1, RECORD.size):
            index, tag = RECORD.unpack_from(raw, off)
            if index >= len(self.tags) or tag != self.tags[index]:
                break
            indices.append(index)
            good = off + RECORD.size
        if good != len(raw):
            with open(self.path, "r+b") as fh:
                fh.truncate(good)
                os.fsync(fh.fileno())
        return indices, good, len(raw)

    def append(self, indices: list[int]) -> None:
        """Append and fdatasync the records of ``indices`` (whose data is already durable)."""
        new = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"".join(RECORD.pack(i, self.tags[i]) for i in indices))
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if new:
            fsync_dir(self.path.parent)

    def rewrite(self, indices: list[int]) -> None:
        """Replace the journal (atomically) by the records of ``indices``, if it exists."""
        if self.path.exists():
            atomic_write_bytes(self.path, b"".join(RECORD.pack(i, self.tags[i]) for i in indices), 0o600)


def open_data(path: Path, size: int) -> BinaryIO:
    """Open the data file at ``path`` unbuffered, creating it (0600, preallocated to ``size``) if absent.

    No directory fsync: the journal's first append does it (before it, no record names a chunk).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    fh = open(path, "w+b" if new else "r+b", buffering=0)  # noqa: SIM115 (held open by the caller)
    if new:
        os.fchmod(fh.fileno(), 0o600)
        fh.truncate(size)
        try:  # reserve the blocks now: a full disk fails here, not half way through
            os.posix_fallocate(fh.fileno(), 0, size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                fh.close()
                raise
    return fh
