"""What ``cloud-batch score`` reads: one reader per kind of input, all checked before any work starts.

A reader turns ``--input PATH`` into :class:`InputRows`: the row count, a key per row (entity id,
row index or file name), an input fingerprint, and ``chunk(start, stop)``, a picklable slice that a
worker turns into model inputs with ``feeds()``. Tabular and NumPy inputs are checked whole in the
driver (their chunks carry arrays); image chunks carry file names and are decoded in the workers
(``images.py``). ``readers.py`` lists the readers; a video reader is one more entry there.

NumPy arrays stored plain (an ``.npy``, or an ``.npz`` member written without compression, as
``np.savez`` does) are read straight from their offset (no zip CRC pass): when an array already is the
model's float32 rows, its chunks say where they lie in the file (``ArrayChunk.stored``) and the workers
map them there (``local.py``), so the driver does not copy them again. Like any batch engine reading
files in place, this expects the input not to change while it is scored.

Every refusal is an ``InputError`` naming what is wrong (file, column, row).
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import xxhash

from cloud_batch.errors import InputError
from edge_agent.wire.model.manifest import Manifest, TensorSpec
from edge_agent.wire.npy import NPY_ERRORS, read_header

TABLE_SUFFIXES = (".parquet", ".pq", ".csv")
ARRAY_SUFFIXES = (".npy", ".npz")
HASH_BLOCK = 1 << 20
FINGERPRINT_ALGORITHM = "xxh3-128"
MAX_SHOWN = 5
ZIP_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # signature, 5 shorts, crc and sizes, name and extra lengths
ZIP_LOCAL_SIGNATURE = b"PK\x03\x04"


@dataclass(frozen=True)
class InputOptions:
    """How rows become model inputs: the key column, ``--map``, ``--features`` and ``--strict``."""

    registry_dir: Path
    entity_key: str | None = None
    mapping: Mapping[str, Sequence[str]] = field(default_factory=dict)
    features: str | None = None  # "SET" or "SET@VERSION"
    strict: bool = False


class Chunk(Protocol):
    """A slice of the input that a worker can turn into model inputs (picklable)."""

    keys: np.ndarray

    def feeds(self) -> dict[str, np.ndarray]: ...


@dataclass
class ArrayChunk:
    """Rows already checked: real-valued arrays per model input.

    ``stored[name] = (file, offset)``: that array's rows lie as they are (float32, C order) in
    ``file`` from ``offset`` on, so a worker can map them instead of receiving a copy.
    """

    keys: np.ndarray
    arrays: dict[str, np.ndarray]
    stored: dict[str, tuple[str, int]] = field(default_factory=dict)

    def feeds(self) -> dict[str, np.ndarray]:
        return self.arrays


@dataclass
class InputRows:
    """A checked input: ``n`` rows, their keys (column ``key_name``), and slices of it for the workers."""

    kind: str
    n: int
    key_name: str
    keys: np.ndarray
    fingerprint: str
    slicer: Callable[[int, int], Chunk]
    skipped: list[str] = field(default_factory=list)  # inputs left out (undecodable images), listed
    identity: dict[str, object] = field(default_factory=dict)  # what else decides the rows (features version)

    def chunk(self, start: int, stop: int) -> Chunk:
        return self.slicer(start, stop)


class Reader(Protocol):
    """One kind of input: ``matches`` a path, ``read``s and checks it."""

    kind: str

    def matches(self, path: Path) -> bool: ...

    def read(self, path: Path, manifest: Manifest, options: InputOptions) -> InputRows: ...


def fingerprint_soon(files: Sequence[Path], root: Path) -> Callable[[], str]:
    """Start :func:`fingerprint` in a thread (its reads and XXH3 release the GIL) while the reader checks the rows."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="fingerprint")
    future = pool.submit(fingerprint, files, root)
    pool.shutdown(wait=False)
    return future.result


def fingerprint(files: Sequence[Path], root: Path) -> str:
    """``xxh3-128:<hex>`` over every file's relative name, size and content, in order.

    It names the input for resuming and refusing a rerun, not for trust (the model's artifact is the
    sha256 that matters), so a fast non-cryptographic hash: XXH3 runs at memory speed, sha256 at
    ~1.5 GB/s with SHA extensions (55 ms of the driver's CPU per 1,000,000 maintenance rows).
    """
    h = xxhash.xxh3_128()
    block = bytearray(HASH_BLOCK)
    for f in files:
        h.update(f"{f.relative_to(root) if f != root else f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(block):
                h.update(memoryview(block)[:n])
    return f"{FINGERPRINT_ALGORITHM}:{h.hexdigest()}"


def shown(items: Sequence[object]) -> str:
    head = ", ".join(repr(i) for i in list(items)[:MAX_SHOWN])
    return head + (f" and {len(items) - MAX_SHOWN} more" if len(items) > MAX_SHOWN else "")


def files_in(path: Path, suffixes: Sequence[str]) -> list[Path]:
    """``path`` itself, or the files with ``suffixes`` directly in the directory ``path`` (sorted by name)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def check_finite(arr: np.ndarray, what: str, columns: Sequence[str] | None = None) -> None:
    """InputError naming the first row (1-based) and column of a NaN or infinity in ``arr`` ([N, ...])."""
    if arr.dtype.kind in "iub" or np.isfinite(arr.sum(dtype=np.float64)):
        return  # one pass, no temporaries: a float64 sum is finite iff every value is (or, rarely, it overflowed)
    bad = ~np.isfinite(arr.reshape(len(arr), -1))
    if bad.any():
        r, c = (int(i) for i in np.argwhere(bad)[0])
        col = repr(columns[c]) if columns is not None else f"element {c}"
        kind = "NaN" if np.isnan(arr.reshape(len(arr), -1)[r, c]) else "an infinite value"
        n = int(bad.sum())
        raise InputError(
            f"{what}: {kind} in row {r + 1}, column {col} ({n} non-finite value{'s' if n > 1 else ''}); "
            "the model takes finite numbers only: impute or drop those rows"
        )


def row_width(spec: TensorSpec) -> int:
    return int(np.prod([d for d in spec.shape[1:]])) if len(spec.shape) > 1 else 1


def as_input(spec: TensorSpec, arr: np.ndarray, what: str) -> np.ndarray:
    """``arr`` ([N, ...] numbers) shaped as ``spec``'s rows, in float32 real values (what the device receives)."""
    rows = (len(arr), *(d for d in spec.shape[1:]))
    if any(d < 0 for d in rows[1:]):
        return arr.astype(np.float32)
    if int(np.prod(arr.shape[1:])) != int(np.prod(rows[1:])):
        raise InputError(
            f"{what}: rows of shape {list(arr.shape[1:])} do not fit input {spec.name!r} {list(spec.shape)}"
        )
    return np.ascontiguousarray(arr.reshape(rows), dtype=np.float32)


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
        fp = fingerprint_soon([path], path)
        try:
            raw, offsets = load_arrays(path, names[0])
        except NPY_ERRORS as exc:
            raise InputError(f"cannot read {path}: {exc}") from exc
        missing, unknown = [n for n in names if n not in raw], [k for k in raw if k not in names]
        if missing or unknown:
            raise InputError(f"{path.name}: arrays {sorted(raw)} do not match the model's inputs {names}")
        arrays: dict[str, np.ndarray] = {}
        stored: dict[str, tuple[str, int]] = {}
        for spec in manifest.inputs:
            arr = raw[spec.name]
            what = f"{path.name}[{spec.name!r}]"
            if arr.dtype.kind not in "fiub" or arr.dtype.kind == "b" or arr.ndim == 0:
                raise InputError(f"{what}: dtype {arr.dtype} is not numeric rows")
            check_finite(arr, what)
            arrays[spec.name] = as_input(spec, arr, what)
            if spec.name in offsets and arr.size and arrays[spec.name].ctypes.data == arr.ctypes.data:
                stored[spec.name] = (str(path), offsets[spec.name])  # already the model's rows: mapped there
        n = require_rows({len(a) for a in arrays.values()}, path)
        return array_rows(self.kind, arrays, "row", np.arange(n, dtype=np.int64), fp(), stored=stored)


def load_arrays(path: Path, npy_name: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The arrays of an ``.npy`` (named ``npy_name``) or ``.npz``, and where the plain ones start in the file.

    A plain array is an ``.npy``, or an ``.npz`` member stored without compression (what ``np.savez``
    writes), with a 1.0/2.0 header: it is read straight from its offset (for a member, without the
    zip CRC pass) and its offset is returned, so workers can map it there. The driver itself never
    maps the input: a long-lived process holding a map of a user's file dies (SIGBUS) if the file is
    rewritten in place. Other members are read as ``np.load`` reads them. Nothing is unpickled. Bad
    files raise one of ``NPY_ERRORS``.
    """
    offsets: dict[str, int] = {}
    with open(path, "rb") as fh:
        if path.suffix.lower() == ".npy":
            size = os.fstat(fh.fileno()).st_size
            arr = _plain_read(fh, 0, size, path.name, offsets, npy_name)
            return {npy_name: arr if arr is not None else np.load(path, allow_pickle=False)}, offsets
        arrays = {}
        with zipfile.ZipFile(fh) as zf:
            for info in zf.infolist():
                key = info.filename.removesuffix(".npy")
                arrays[key] = _npz_member(zf, fh, info, offsets, key)
        return arrays, offsets


def _npz_member(
    zf: zipfile.ZipFile, fh: BinaryIO, info: zipfile.ZipInfo, offsets: dict[str, int], key: str
) -> np.ndarray:
    name = info.filename
    if info.flag_bits & 0x1:
        raise ValueError(f"member {name!r} is encrypted")
    if not name.endswith(".npy"):
        raise ValueError(f"member {name!r} is not an .npy array")
    if info.compress_type == zipfile.ZIP_STORED:
        fh.seek(info.header_offset)
        head = fh.read(ZIP_LOCAL_HEADER.size)
        fields = ZIP_LOCAL_HEADER.unpack(head) if len(head) == ZIP_LOCAL_HEADER.size else (b"",)
        if fields[0] != ZIP_LOCAL_SIGNATURE:
            raise ValueError(f"member {name!r}: no local header at offset {info.header_offset}")
        start = info.header_offset + ZIP_LOCAL_HEADER.size + fields[-2] + fields[-1]
        arr = _plain_read(fh, start, info.file_size, name, offsets, key)
        if arr is not None:
            return arr
    with zf.open(info) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def _plain_read(fh: BinaryIO, start: int, size: int, name: str, offsets: dict[str, int], key: str) -> np.ndarray | None:
    """The array whose ``.npy`` bytes lie at ``start`` (``size`` bytes), read from its data offset, which is
    recorded in ``offsets[key]``; None for a header other than 1.0/2.0 (read it as ``np.load`` does)."""
    fh.seek(start)
    header = read_header(fh)
    if header is None:
        return None
    shape, fortran, dtype = header
    if dtype.hasobject:
        raise ValueError(f"{name!r} holds Python objects, which are not loaded")
    offset, count = fh.tell(), int(np.prod(shape))
    if offset + count * dtype.itemsize > start + size:
        raise ValueError(f"{name!r}: {shape} of {dtype} do not fit its {size} bytes")
    data = np.fromfile(fh, dtype, count) if count else np.empty(0, dtype)
    offsets[key] = offset
    return data.reshape(shape, order="F" if fortran else "C")


def require_rows(lengths: set[int], path: Path) -> int:
    if len(lengths) != 1:
        raise InputError(f"{path}: the model's inputs have different row counts {sorted(lengths)}")
    n = lengths.pop()
    if n == 0:
        raise InputError(f"{path} is empty: no rows to score")
    return n


def array_rows(
    kind: str,
    arrays: dict[str, np.ndarray],
    key_name: str,
    keys: np.ndarray,
    fp: str,
    *,
    stored: Mapping[str, tuple[str, int]] | None = None,
    identity: Mapping[str, object] | None = None,
) -> InputRows:
    """InputRows over checked arrays: a chunk is a slice of every array (``stored``: see ``ArrayChunk``)."""
    row_bytes = {k: arrays[k][:1].nbytes for k in stored or {}}

    def slicer(start: int, stop: int) -> Chunk:
        at = {k: (file, offset + start * row_bytes[k]) for k, (file, offset) in (stored or {}).items()}
        return ArrayChunk(keys[start:stop], {k: v[start:stop] for k, v in arrays.items()}, at)

    return InputRows(kind, len(keys), key_name, keys, fp, slicer, identity=dict(identity or {}))
