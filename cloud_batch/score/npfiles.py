"""``.npy`` and ``.npz`` input for ``cloud-batch score``: one array per model input, keyed by row index.

An array stored plain (an ``.npy``, or an ``.npz`` member written without compression, as
``np.savez`` does) is located from its headers alone. When every input's array already is the
model's float32 rows (native order, C order, the right row width), the driver never loads them: one
sequential pass over the file, a block of whole rows at a time, computes the input fingerprint and
checks that every value is finite, and the chunks say where the rows lie (``StoredRows``) for the
workers to map. With the keys as row numbers (``RowNumbers``), the driver's memory then stays at one
block whatever the file's size.

Otherwise (an array to convert, such as float64, or a non-finite value, whose row and column are
then named) every array is checked and the ones to convert are converted into scratch rows
(``RowSink``) that the workers map; arrays that already are the model's rows in place are still
handed over as ``StoredRows``. A plain C-order array is read a block of rows at a time, so the
driver's memory stays at a block here too; only a compressed member, a Fortran-order array or a 3.0
header is loaded whole. Nothing is unpickled. As with any batch engine reading files in place, the
input must not change while it is scored.
"""

from __future__ import annotations

import itertools
import os
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cloud_batch.errors import InputError
from cloud_batch.score.inputs import (
    ARRAY_SUFFIXES,
    FLOAT32,
    HASH_BLOCK,
    InputOptions,
    InputRows,
    RowNumbers,
    RowSink,
    StoredRows,
    as_input,
    check_finite,
    fingerprint_digest,
    fingerprint_soon,
    new_fingerprint,
    require_rows,
    row_width,
    rows_per_block,
    stored_rows,
)
from edge_agent.wire.model.manifest import Manifest, TensorSpec
from edge_agent.wire.npy import NPY_ERRORS, NpyHeader, read_header

ZIP_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # signature, 5 shorts, crc and sizes, name and extra lengths
ZIP_LOCAL_SIGNATURE = b"PK\x03\x04"


@dataclass(frozen=True)
class Member:
    """One array of the file: its key, and for a plain one its header and first data byte (else None)."""

    key: str
    header: NpyHeader | None
    offset: int
    info: zipfile.ZipInfo | None = None  # an .npz member


class NumpyReader:
    """``.npy`` (a single-input model) or ``.npz`` (one array per input name); keyed by row index."""

    kind = "numpy"

    def matches(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() in ARRAY_SUFFIXES

    def read(self, path: Path, manifest: Manifest, options: InputOptions) -> InputRows:
        if options.entity_key or options.mapping or options.features:
            raise InputError("--entity-key, --map and --features apply to tabular inputs (Parquet/CSV), not .npy/.npz")
        names = [s.name for s in manifest.inputs]
        if path.suffix.lower() == ".npy" and len(names) != 1:
            raise InputError(f"{manifest.name} has inputs {names}; give an .npz with one array per input")
        try:
            members = locate(path, names[0])
        except NPY_ERRORS as exc:
            raise InputError(f"cannot read {path}: {exc}") from exc
        keys = [m.key for m in members]
        if sorted(keys) != sorted(names) or len(set(keys)) != len(keys):
            raise InputError(f"{path.name}: arrays {sorted(keys)} do not match the model's inputs {names}")
        by_key = {m.key: m for m in members}
        in_place = {s.name: _in_place(path, by_key[s.name], s) for s in manifest.inputs}
        stored = {k: v for k, v in in_place.items() if v is not None}
        fp = _scan(path, list(stored.values())) if len(stored) == len(names) else None
        if fp is None:  # something to convert, or a non-finite value to name
            return self._load(path, manifest, by_key, in_place, options)
        n = require_rows({s.shape[0] for s in stored.values()}, path)
        return stored_rows(self.kind, "row", RowNumbers(0, n), fp, stored)

    def _load(
        self, path: Path, manifest: Manifest, members: dict[str, Member], in_place: dict[str, StoredRows | None],
        options: InputOptions,
    ) -> InputRows:  # fmt: skip
        """Every array checked (naming a non-finite value's row and column) and converted into scratch rows;
        those ``in_place`` (already the model's rows in the file) are checked and handed over where they lie.

        A plain C-order array is read a block of rows at a time; any other (compressed, Fortran order, a
        3.0 header) is loaded whole, as ``np.load`` loads it, then converted.
        """
        fp = fingerprint_soon([path], path)
        stored: dict[str, StoredRows] = {}
        lengths: set[int] = set()
        sink = RowSink(options.scratch)
        try:
            for spec in manifest.inputs:
                member, at, what = members[spec.name], in_place[spec.name], f"{path.name}[{spec.name!r}]"
                count = 0
                for first, rows in _row_blocks(path, member):
                    if rows.dtype.kind not in "fiu" or rows.ndim == 0:
                        raise InputError(f"{what}: dtype {rows.dtype} is not numeric rows")
                    check_finite(rows, what, first_row=first)
                    if at is None:
                        sink.write(spec.name, as_input(spec, rows, what))
                    count = first + len(rows)
                lengths.add(count)
                if at is not None:
                    stored[spec.name] = at
            n = require_rows(lengths, path)
            stored |= sink.close(n)
        except BaseException:
            sink.discard()
            raise
        return stored_rows(self.kind, "row", RowNumbers(0, n), fp(), stored, scratch=sink.dir)


def _row_blocks(path: Path, member: Member) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of ``member``: a plain C-order array a block (``rows_per_block``) at a time, read
    from its offset (for an ``.npz`` member, without the zip CRC pass); anything else loaded whole, once.

    The driver never maps the input: a long-lived process holding a map of a user's file dies (SIGBUS)
    if the file is rewritten in place. Bad files raise InputError.
    """
    h = member.header
    try:
        if h is None or h.fortran or not h.shape:
            yield 0, _load_whole(path, member)
            return
        row = int(np.prod(h.shape[1:]))
        step = rows_per_block(row * h.dtype.itemsize)
        with open(path, "rb") as fh:
            fh.seek(member.offset)
            for first in range(0, h.shape[0], step):
                k = min(step, h.shape[0] - first)
                data = np.fromfile(fh, h.dtype, k * row)
                if data.size != k * row:
                    raise InputError(f"cannot read {path}: it ended in row {first + 1} (changed while read?)")
                yield first, data.reshape((k, *h.shape[1:]))
            if h.shape[0] == 0:
                yield 0, np.empty(h.shape, h.dtype)
    except NPY_ERRORS as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


def _load_whole(path: Path, member: Member) -> np.ndarray:
    """A member that is not a plain C-order array, as ``np.load`` reads it."""
    if member.header is not None:  # plain, in Fortran order (or a 0-d array)
        with open(path, "rb") as fh:
            fh.seek(member.offset)
            count = int(np.prod(member.header.shape))
            data = np.fromfile(fh, member.header.dtype, count) if count else np.empty(0, member.header.dtype)
        return data.reshape(member.header.shape, order="F" if member.header.fortran else "C")
    if member.info is None:
        return np.asarray(np.load(path, allow_pickle=False))
    with zipfile.ZipFile(path) as zf, zf.open(member.info) as fh:
        return np.asarray(np.lib.format.read_array(fh, allow_pickle=False))


def _in_place(path: Path, member: Member, spec: TensorSpec) -> StoredRows | None:
    """Where ``member`` lies as ``spec``'s float32 rows, unconverted; None if it must be loaded."""
    h = member.header
    dims = spec.shape[1:]
    if h is None or h.fortran or h.dtype != FLOAT32 or not h.shape or any(d < 0 for d in dims):
        return None
    if int(np.prod(h.shape[1:])) != row_width(spec):
        return None  # as_input words the mismatch
    return StoredRows(str(path), member.offset, (h.shape[0], *dims))


def _scan(path: Path, stored: list[StoredRows]) -> str | None:
    """One pass over the file: its fingerprint; None when a stored array holds a non-finite value (or
    two arrays overlap, as only a crafted ``.npz`` makes them: loaded and checked one by one)."""
    regions = sorted((s.offset, s.offset + s.nbytes, s.row_bytes) for s in stored)
    if any(a[1] > b[0] for a, b in itertools.pairwise(regions)):
        return None
    step = max([HASH_BLOCK, *(r for _, _, r in regions)])
    buf = memoryview(bytearray(step))
    size = path.stat().st_size
    h = new_fingerprint(path, path, size)
    with open(path, "rb", buffering=0) as fh:
        pos = 0
        for start, end, row_bytes in [*regions, (size, size, 1)]:
            for lo, hi, rows in ((pos, start, False), (start, end, True)):  # the bytes between, then the rows
                block = step // row_bytes * row_bytes if rows else step
                while lo < hi:
                    n = min(block, hi - lo)
                    got = fh.readinto(buf[:n])
                    if got != n:
                        raise InputError(
                            f"cannot read {path}: it ended at byte {lo + (got or 0)} (changed while read?)"
                        )
                    h.update(buf[:n])
                    # a float64 sum is finite iff every value is (float32 values cannot overflow it)
                    if rows and not np.isfinite(np.frombuffer(buf[:n], FLOAT32).sum(dtype=np.float64)):
                        return None
                    lo += n
            pos = end
    return fingerprint_digest(h)


def locate(path: Path, npy_name: str) -> list[Member]:
    """The arrays of an ``.npy`` (named ``npy_name``) or ``.npz``, from their headers alone; bad files
    raise one of ``NPY_ERRORS``."""
    with open(path, "rb") as fh:
        if path.suffix.lower() == ".npy":
            return [_plain(fh, 0, os.fstat(fh.fileno()).st_size, path.name, npy_name)]
        with zipfile.ZipFile(fh) as zf:
            return [_npz_member(fh, info) for info in zf.infolist()]


def _npz_member(fh: BinaryIO, info: zipfile.ZipInfo) -> Member:
    name, key = info.filename, info.filename.removesuffix(".npy")
    if info.flag_bits & 0x1:
        raise ValueError(f"member {name!r} is encrypted")
    if not name.endswith(".npy"):
        raise ValueError(f"member {name!r} is not an .npy array")
    if info.compress_type != zipfile.ZIP_STORED:
        return Member(key, None, 0, info)
    fh.seek(info.header_offset)
    head = fh.read(ZIP_LOCAL_HEADER.size)
    fields = ZIP_LOCAL_HEADER.unpack(head) if len(head) == ZIP_LOCAL_HEADER.size else (b"",)
    if fields[0] != ZIP_LOCAL_SIGNATURE:
        raise ValueError(f"member {name!r}: no local header at offset {info.header_offset}")
    start = info.header_offset + ZIP_LOCAL_HEADER.size + fields[-2] + fields[-1]
    return _plain(fh, start, info.file_size, name, key, info)


def _plain(fh: BinaryIO, start: int, size: int, name: str, key: str, info: zipfile.ZipInfo | None = None) -> Member:
    """The ``.npy`` whose bytes lie at ``start`` (``size`` bytes): its header and first data byte (header
    None for a version other than 1.0/2.0: loaded as ``np.load`` loads it)."""
    fh.seek(start)
    header = read_header(fh)
    if header is None:
        return Member(key, None, 0, info)
    if header.dtype.hasobject:
        raise ValueError(f"{name!r} holds Python objects, which are not loaded")
    offset = fh.tell()
    if offset + int(np.prod(header.shape)) * header.dtype.itemsize > start + size:
        raise ValueError(f"{name!r}: {header.shape} of {header.dtype} do not fit its {size} bytes")
    return Member(key, header, offset, info)
