"""What ``cloud-batch score`` reads: one reader per kind of input, all checked before any work starts.

A reader turns ``--input PATH`` into :class:`InputRows`: the row count, a key per row (entity id,
row index or file name), an input fingerprint, and ``chunk(start, stop)``, a picklable slice that a
worker turns into model inputs with ``feeds()``. Tabular and NumPy inputs are checked in the driver
before any work, a block at a time; image chunks carry file names and are decoded in the workers
(``images.py``). ``readers.py`` lists the readers; a video reader is one more entry there.

Checked rows are not held by the driver: a chunk says where they lie (``StoredRows``), and the
workers map them there (``local.py``). That is the input file itself when it already holds the
model's float32 rows (the NumPy reader, ``npfiles.py``, finds them), else the scratch rows that the
reader converted them into (``RowSink``; tabular inputs, and arrays of another dtype).

Every refusal is an ``InputError`` naming what is wrong (file, column, row).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import xxhash

from cloud_batch.errors import InputError
from edge_agent.wire.model.manifest import Manifest, TensorSpec

TABLE_SUFFIXES = (".parquet", ".pq", ".csv")
ARRAY_SUFFIXES = (".npy", ".npz")
HASH_BLOCK = 1 << 20
BLOCK_BYTES = 8 << 20  # rows that a reader converts are read, checked and converted about this much at a time
FINGERPRINT_ALGORITHM = "xxh3-128"
MAX_SHOWN = 5
FLOAT32 = np.dtype(np.float32)  # the model's real-valued rows, as every reader hands them over


def rows_per_block(row_bytes: int) -> int:
    """How many rows of ``row_bytes`` bytes (as read, before converting) make a block of ``BLOCK_BYTES``."""
    return max(1, BLOCK_BYTES // max(1, row_bytes))


@dataclass(frozen=True)
class InputOptions:
    """How rows become model inputs: the key column, ``--map``, ``--features`` and ``--strict``."""

    registry_dir: Path
    entity_key: str | None = None
    mapping: Mapping[str, Sequence[str]] = field(default_factory=dict)
    features: str | None = None  # "SET" or "SET@VERSION"
    strict: bool = False
    scratch: Path | None = None  # where a reader may keep converted rows (``RowSink``); None: the temp dir
    progress: bool = False  # a reader may show a bar while it reads a large input


@dataclass(frozen=True)
class RowNumbers:
    """The keys of an input keyed by row number: rows ``start`` to ``stop - 1``, made into an array only
    where a chunk is scored (``key_array``), so the driver never holds a key per row."""

    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, rows: slice) -> RowNumbers:
        start, stop, _ = rows.indices(len(self))
        return RowNumbers(self.start + start, self.start + max(start, stop))


Keys = np.ndarray | RowNumbers  # one key per row: entity ids or file names, or row numbers


def key_array(keys: Keys) -> np.ndarray:
    """``keys`` as an array (row numbers as int64)."""
    return np.arange(keys.start, keys.stop, dtype=np.int64) if isinstance(keys, RowNumbers) else keys


def repeated_keys(keys: Keys) -> int:
    """How many keys repeat an earlier one (row numbers never do)."""
    return 0 if isinstance(keys, RowNumbers) else len(keys) - len(set(keys.tolist()))


class Chunk(Protocol):
    """A slice of the input that a worker can turn into model inputs (picklable)."""

    @property
    def keys(self) -> Keys: ...

    def feeds(self) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class StoredRows:
    """Checked rows that lie in ``file`` from ``offset`` on as the model's float32 rows (C order, ``shape``)."""

    file: str
    offset: int
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:])) * FLOAT32.itemsize

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def rows(self, start: int, stop: int) -> StoredRows:
        return StoredRows(self.file, self.offset + start * self.row_bytes, (stop - start, *self.shape[1:]))

    def read(self) -> np.ndarray:
        count = int(np.prod(self.shape))
        return np.fromfile(self.file, FLOAT32, count, offset=self.offset).reshape(self.shape)


@dataclass
class ArrayChunk:
    """Rows already checked: real-valued arrays per model input, held (``arrays``, as Ray is sent them) or in a
    file (``stored``: the input itself or its scratch rows)."""

    keys: Keys
    arrays: dict[str, np.ndarray]
    stored: dict[str, StoredRows] = field(default_factory=dict)

    def feeds(self) -> dict[str, np.ndarray]:
        return {**self.arrays, **{name: rows.read() for name, rows in self.stored.items()}}

    def loaded(self) -> ArrayChunk:
        """This chunk with its stored rows read: for workers that may not see the input file (Ray)."""
        return ArrayChunk(self.keys, self.feeds()) if self.stored else self


@dataclass
class InputRows:
    """A checked input: ``n`` rows, their keys (column ``key_name``), and slices of it for the workers."""

    kind: str
    n: int
    key_name: str
    keys: Keys
    fingerprint: str
    slicer: Callable[[int, int], Chunk]
    skipped: list[str] = field(default_factory=list)  # inputs left out (undecodable images), listed
    identity: dict[str, object] = field(default_factory=dict)  # what else decides the rows (features version)
    scratch: Path | None = None  # a directory of converted rows the chunks point into, removed by ``close``

    def chunk(self, start: int, stop: int) -> Chunk:
        return self.slicer(start, stop)

    def close(self) -> None:
        """Remove the scratch rows (once no chunk is read any more)."""
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


class RowSink:
    """Checked rows appended, a block at a time, to one float32 file per model input in ``directory`` (made
    here; None: a new temporary one).

    ``close(n)`` gives each input's rows as ``StoredRows`` for the workers to map; ``discard`` removes them.
    """

    def __init__(self, directory: Path | None) -> None:
        self._files: dict[str, tuple[BinaryIO, tuple[int, ...]]] = {}
        self._open = ExitStack()
        with self._room(directory or Path(tempfile.gettempdir())):
            if directory is None:
                directory = Path(tempfile.mkdtemp(prefix="edgefleet-rows-"))
            directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory

    def write(self, name: str, rows: np.ndarray) -> None:
        """Append ``rows`` ([k, ...] float32) to input ``name``'s file."""
        with self._room(self.dir):
            if name not in self._files:
                new = self._open.enter_context(open(self.dir / f"{len(self._files)}.f32", "wb"))  # noqa: SIM115 (until close)
                self._files[name] = (new, tuple(rows.shape[1:]))
            fh, shape = self._files[name]
            if tuple(rows.shape[1:]) != shape:
                raise InputError(
                    f"input {name!r}: rows of shape {list(rows.shape[1:])} after rows of shape {list(shape)}"
                )
            fh.write(np.ascontiguousarray(rows, dtype=FLOAT32).data.cast("B"))

    @staticmethod
    @contextmanager
    def _room(where: Path) -> Iterator[None]:
        """A full disk or a read-only directory, as a clear error."""
        try:
            yield
        except OSError as exc:
            raise InputError(
                f"cannot keep the input's converted rows in {where}: {exc} (they take 4 bytes per value the model reads)"
            ) from exc

    def close(self, n: int) -> dict[str, StoredRows]:
        """Every input's ``n`` rows, where they lie."""
        with self._room(self.dir):
            self._open.close()  # flushes the last writes
        return {name: StoredRows(str(fh.name), 0, (n, *shape)) for name, (fh, shape) in self._files.items()}

    def discard(self) -> None:
        with suppress(OSError):  # a flush that fails on a full disk: the files go anyway
            self._open.close()
        shutil.rmtree(self.dir, ignore_errors=True)


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
    h: xxhash.xxh3_128 | None = None
    block = bytearray(HASH_BLOCK)
    for f in files:
        h = new_fingerprint(f, root, f.stat().st_size, h)
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(block):
                h.update(memoryview(block)[:n])
    return fingerprint_digest(h or xxhash.xxh3_128())


def new_fingerprint(f: Path, root: Path, size: int, h: xxhash.xxh3_128 | None = None) -> xxhash.xxh3_128:
    """The fingerprint's hash (``h``, or a new one) after file ``f``'s name and size; its bytes come next."""
    h = h or xxhash.xxh3_128()
    h.update(f"{f.relative_to(root) if f != root else f.name}\0{size}\0".encode())
    return h


def fingerprint_digest(h: xxhash.xxh3_128) -> str:
    return f"{FINGERPRINT_ALGORITHM}:{h.hexdigest()}"


def shown(items: Sequence[object]) -> str:
    head = ", ".join(repr(i) for i in list(items)[:MAX_SHOWN])
    return head + (f" and {len(items) - MAX_SHOWN} more" if len(items) > MAX_SHOWN else "")


def files_in(path: Path, suffixes: Sequence[str]) -> list[Path]:
    """``path`` itself, or the files with ``suffixes`` directly in the directory ``path`` (sorted by name)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def check_finite(arr: np.ndarray, what: str, columns: Sequence[str] | None = None, *, first_row: int = 0) -> None:
    """InputError naming the first row (1-based, counted from ``first_row``) and column of a NaN or infinity in ``arr`` ([N, ...])."""
    if arr.dtype.kind in "iub" or np.isfinite(arr.sum(dtype=np.float64)):
        return  # one pass, no temporaries: a float64 sum is finite iff every value is (or, rarely, it overflowed)
    bad = ~np.isfinite(arr.reshape(len(arr), -1))
    if bad.any():
        r, c = (int(i) for i in np.argwhere(bad)[0])
        col = repr(columns[c]) if columns is not None else f"element {c}"
        kind = "NaN" if np.isnan(arr.reshape(len(arr), -1)[r, c]) else "an infinite value"
        n = int(bad.sum())
        raise InputError(
            f"{what}: {kind} in row {first_row + r + 1}, column {col} ({n} non-finite value{'s' if n > 1 else ''}); "
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


def require_rows(lengths: set[int], path: Path) -> int:
    if len(lengths) != 1:
        raise InputError(f"{path}: the model's inputs have different row counts {sorted(lengths)}")
    n = lengths.pop()
    if n == 0:
        raise InputError(f"{path} is empty: no rows to score")
    return n


def stored_rows(
    kind: str,
    key_name: str,
    keys: Keys,
    fp: str,
    stored: Mapping[str, StoredRows],
    *,
    identity: Mapping[str, object] | None = None,
    scratch: Path | None = None,
) -> InputRows:
    """InputRows over checked rows that lie in files: a chunk is a slice of the keys and of every ``StoredRows``."""

    def slicer(start: int, stop: int) -> Chunk:
        return ArrayChunk(keys[start:stop], {}, {k: rows.rows(start, stop) for k, rows in stored.items()})

    return InputRows(kind, len(keys), key_name, keys, fp, slicer, identity=dict(identity or {}), scratch=scratch)
