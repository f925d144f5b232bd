"""Tables of features: read a CSV/Parquet file and check it into one row of numbers per entity.

Every problem is an InputError naming the column, entity or row, and nothing is written: values
must be finite numbers of one dtype, entity ids unique and non-empty, event times parseable.
``read_table`` reads a whole file; ``table_columns`` and ``table_blocks`` (its header, then some of its
columns a block at a time) are for readers that stream, such as ``cloud-batch score``'s.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_datetime64_any_dtype, is_float_dtype, is_numeric_dtype

from cloud_batch.errors import InputError
from cloud_batch.progress import Reporter
from edge_agent.errors import plain
from edge_agent.wire.bundle import DTYPES

PROGRESS_MIN_BYTES = 8 << 20  # CSVs from this size are read in chunks behind a progress bar
CSV_CHUNK_ROWS = 100_000
MAX_SHOWN = 5  # offending names listed in an error


@dataclass
class FeatureTable:
    """One row of feature values per entity, ready to become a bundle."""

    entities: np.ndarray  # <U, unique
    event_ts: np.ndarray  # f8 epoch seconds, one per entity
    values: np.ndarray  # [N, F] of ``dtype``
    features: tuple[str, ...]
    entity_key: str
    dtype: str = "float32"
    explicit_ts: bool = True  # False: event_ts is the build time, not part of the content
    source: str = ""  # where the rows came from, for the summary


def table_kind(path: Path) -> str:
    """``"parquet"`` or ``"csv"``, by suffix; InputError for a missing file, another suffix, or Parquet without pyarrow."""
    if not path.is_file():
        raise InputError(f"input file not found: {path}")
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        if importlib.util.find_spec("pyarrow") is None:
            raise InputError(
                f"reading {path} needs pyarrow, which is not installed: `pip install pyarrow` (or export the table as CSV)"
            )
        return "parquet"
    if not name.endswith(".csv"):
        raise InputError(f"unsupported input {path}: use a .csv or .parquet file")
    return "csv"


@contextmanager
def reading(path: Path, kind: str) -> Iterator[None]:
    """Turn what reading ``path`` as ``kind`` raises into an InputError naming the file."""
    try:
        yield
    except pd.errors.EmptyDataError as exc:
        raise InputError(f"{path} is empty (no header row)") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError, ImportError) as exc:
        raise InputError(f"cannot read {path} as {'Parquet' if kind == 'parquet' else 'CSV'}: {exc}") from exc


def read_table(path: str | Path, *, text_columns: Sequence[str] = (), progress: bool = True) -> pd.DataFrame:
    """A CSV (``pandas.read_csv``) or Parquet (``pandas.read_parquet``) file as a frame.

    ``text_columns`` are read as strings from a CSV (entity ids like ``007`` keep their zeros).
    CSVs of ``PROGRESS_MIN_BYTES`` and more are read in chunks behind a progress bar.
    """
    p = Path(path)
    kind = table_kind(p)
    with reading(p, kind):
        if kind == "parquet":
            return pd.read_parquet(p)
        dtype = {c: str for c in text_columns}
        size = p.stat().st_size
        if not progress or size < PROGRESS_MIN_BYTES:
            return pd.read_csv(p, dtype=dtype)
        parts = []
        with open(p, "rb") as fh, bytes_bar(p.name, size) as advance:
            for chunk in pd.read_csv(fh, dtype=dtype, chunksize=CSV_CHUNK_ROWS):
                parts.append(chunk)
                advance(fh.tell())
        return pd.concat(parts, ignore_index=True) if parts else pd.read_csv(p, dtype=dtype)


def table_columns(path: Path) -> list[str]:
    """The column names of a CSV/Parquet file, from its header or schema alone."""
    kind = table_kind(path)
    with reading(path, kind):
        if kind == "parquet":
            import pyarrow.parquet as pq

            return [str(c) for c in pq.read_schema(path).names]
        return [str(c) for c in pd.read_csv(path, nrows=0).columns]


def table_blocks(
    path: Path,
    columns: Sequence[str],
    *,
    text_columns: Sequence[str] = (),
    rows: int = CSV_CHUNK_ROWS,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """``columns`` of a CSV/Parquet file, up to ``rows`` rows at a time, front to back, as NumPy arrays.

    Memory: one block, and for Parquet the row group it lies in (decoded one at a time). A Parquet
    column goes straight from Arrow to NumPy (nulls as NaN, text as objects); a CSV block is parsed
    by pandas, ``text_columns`` as strings, as in ``read_table``. ``on_bytes(n)`` after each block:
    about how many of the file's bytes are behind it.
    """
    kind = table_kind(path)
    report = on_bytes or (lambda n: None)
    with reading(path, kind):
        if kind == "parquet":
            import pyarrow.parquet as pq

            size, done = path.stat().st_size, 0
            with pq.ParquetFile(path, pre_buffer=False) as pf:  # no read-ahead: a row group at a time
                total = max(1, pf.metadata.num_rows)
                for batch in pf.iter_batches(batch_size=rows, columns=list(columns), use_threads=False):
                    yield {c: batch.column(c).to_numpy(zero_copy_only=False) for c in columns}
                    done += batch.num_rows
                    report(size * done // total)
            return
        dtype = {c: str for c in text_columns if c in columns}
        with open(path, "rb") as fh, pd.read_csv(fh, usecols=list(columns), dtype=dtype, chunksize=rows) as reader:
            for frame in reader:
                yield {c: frame[c].to_numpy() for c in columns}
                report(fh.tell())


@contextmanager
def bytes_bar(label: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A transient "reading" bar over ``total`` bytes on stderr; yields ``advance(bytes done)``."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]reading {task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Reporter().console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.update(task, completed=n)


def table_from_frame(
    df: pd.DataFrame,
    entity_key: str,
    *,
    event_ts_col: str | None = None,
    dtype: str = "float32",
    now: float | None = None,
    source: str = "the input",
) -> FeatureTable:
    """Check a frame of precomputed features and turn it into arrays.

    ``entity_key`` names the entity column; every other column except ``event_ts_col`` is a
    feature and must be numeric. ``event_ts_col`` holds epoch seconds or ISO-8601 timestamps
    (naive ones are UTC); without it every row gets ``now``. InputError, naming the column and
    entity, for anything a device would refuse.
    """
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    columns = [str(c) for c in df.columns]
    if entity_key not in columns:
        raise InputError(f"{source} has no entity column {entity_key!r} (columns: {shown(columns)})")
    if event_ts_col is not None:
        if event_ts_col not in columns:
            raise InputError(f"{source} has no event-ts column {event_ts_col!r} (columns: {shown(columns)})")
        if event_ts_col == entity_key:
            raise InputError(f"the event-ts column {event_ts_col!r} cannot also be the entity column")
    if len(set(columns)) != len(columns):
        raise InputError(
            f"{source} has duplicate column names {shown(sorted({c for c in columns if columns.count(c) > 1}))}"
        )
    df = df.set_axis(columns, axis=1)
    if df.empty:
        raise InputError(f"{source} has no rows")
    feature_cols = [c for c in columns if c not in (entity_key, event_ts_col)]
    bad = [c for c in feature_cols if not is_numeric_dtype(df[c]) or is_bool_dtype(df[c])]
    if bad:
        detail = ", ".join(f"{c!r} ({_describe_column(df[c])})" for c in bad[:MAX_SHOWN])
        raise InputError(
            f"{source}: column{'s' if len(bad) > 1 else ''} {detail} "
            f"{'are' if len(bad) > 1 else 'is'} not numeric; features are numbers only: drop "
            f"{'them' if len(bad) > 1 else 'it'} or encode as numbers"
            + (" (event timestamps go in --event-ts-col)" if event_ts_col is None else "")
        )
    if not feature_cols:
        raise InputError(f"{source} has no feature columns besides {entity_key!r}")

    entities = _entity_ids(df[entity_key], entity_key, source)
    if dtype == "int64":
        floats = [c for c in feature_cols if is_float_dtype(df[c])]
        if floats:
            raise InputError(
                f"{source}: columns {shown(floats)} hold floats; they cannot be int64 features "
                "(use --dtype float32 or float64)"
            )
        values = df[feature_cols].to_numpy(dtype=np.int64)
    else:
        raw = df[feature_cols].to_numpy(dtype=np.float64)
        no_missing(raw, entities, feature_cols, source, "missing value (NaN)")
        with np.errstate(over="ignore"):  # reported below, naming the entity
            values = raw.astype(DTYPES[dtype])
        no_missing(values, entities, feature_cols, source, f"value too large for {dtype}")
    if event_ts_col is None:
        event_ts = np.full(len(entities), time.time() if now is None else float(now), dtype="<f8")
    else:
        event_ts = _event_times(df[event_ts_col], entities, event_ts_col, source)
    return FeatureTable(
        entities, event_ts, values, tuple(feature_cols), entity_key, dtype, event_ts_col is not None, source
    )


def shown(names: Sequence[Any]) -> str:
    items = [repr(n) for n in list(names)[:MAX_SHOWN]]
    more = len(names) - MAX_SHOWN
    return ", ".join(items) + (f" and {more} more" if more > 0 else "")


def _describe_column(col: pd.Series) -> str:
    sample = col.dropna()
    return f"dtype {col.dtype}" + (f", e.g. {plain(sample.iloc[0])!r}" if len(sample) else "")


def _entity_ids(col: pd.Series, entity_key: str, source: str) -> np.ndarray:
    if is_float_dtype(col) and col.notna().all():
        raise InputError(f"{source}: entity column {entity_key!r} holds floats; use integer or text ids")
    missing = col.isna().to_numpy()
    if missing.any():
        raise InputError(
            f"{source}: entity column {entity_key!r} is empty in row {int(np.argmax(missing)) + 1} "
            f"({int(missing.sum())} such rows); every row needs an entity id"
        )
    ids = col.astype(str).to_numpy()
    entities = np.array(ids.tolist(), dtype=str) if len(ids) else np.empty(0, dtype="<U1")
    empty = np.char.str_len(entities) == 0
    if empty.any():
        raise InputError(f"{source}: entity column {entity_key!r} is empty in row {int(np.argmax(empty)) + 1}")
    uniq, counts = np.unique(entities, return_counts=True)
    if (counts > 1).any():
        dups = uniq[counts > 1]
        first = str(dups[0])
        rows = (np.flatnonzero(entities == first) + 1).tolist()
        raise InputError(
            f"{source}: duplicate entity {first!r} in rows {rows[:MAX_SHOWN]} ({len(dups)} duplicated "
            f"id{'s' if len(dups) > 1 else ''}); a feature set has one row per entity"
        )
    return entities


def no_missing(values: np.ndarray, entities: np.ndarray, names: Sequence[str], source: str, what: str) -> None:
    finite = np.isfinite(values)
    if not finite.all():
        r, c = (int(i) for i in np.argwhere(~finite)[0])
        n = int((~finite).sum())
        raise InputError(
            f"{source}: {what} in column {names[c]!r} for entity {str(entities[r])!r} (row {r + 1}; "
            f"{n} such value{'s' if n > 1 else ''}); devices refuse NaN and infinity: impute in the "
            "batch job or leave the entity out"
        )


def _event_times(col: pd.Series, entities: np.ndarray, name: str, source: str) -> np.ndarray:
    if is_bool_dtype(col):
        raise InputError(f"{source}: event-ts column {name!r} holds booleans; use epoch seconds or ISO-8601 times")
    if is_numeric_dtype(col):
        ts = col.to_numpy(dtype=np.float64)
    else:
        if is_datetime64_any_dtype(col):
            parsed = pd.to_datetime(col, utc=True)
        else:
            parsed = pd.to_datetime(col, utc=True, errors="coerce", format="ISO8601")
            retry = parsed.isna() & col.notna()
            if retry.any():
                parsed[retry] = pd.to_datetime(col[retry], utc=True, errors="coerce", format="mixed")
        ts = ((parsed - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(
            dtype=np.float64, na_value=np.nan
        )
    bad = ~np.isfinite(ts) | (ts < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(
            f"{source}: event time {plain(col.iloc[i])!r} of entity {str(entities[i])!r} (row {i + 1}, column "
            f"{name!r}) is not a time at or after 1970 (epoch seconds or ISO-8601)"
        )
    return ts
