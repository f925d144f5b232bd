"""Feature sets: build snapshot bundles into the registry, push them to a fleet (``cloud-batch features``).

A batch job turns long histories (or a precomputed table) into one row of numbers per entity;
``build`` writes that as a feature bundle (``edge_agent.wire.bundle``) and ``push`` publishes it as a
signed Release of kind ``features``, retained on the feature topics devices subscribe to.

Registry layout, beside the models in the same registry directory::

    DIR/features/.lock                                       flock held while a bundle is written
    DIR/features/SET/V/                                      snapshot of SET version V (immutable)
    DIR/features/SET/V.delta-from-V0/                        delta V0 -> V for everyone
    DIR/features/SET/V.partitions/<by>-<key>/                one partition's snapshot of V
    DIR/features/SET/V.partitions/<by>-<key>.delta-from-V0/  that partition's delta V0 -> V

Every directory holds ``bundle.json`` + ``data.npz`` and is built in a hidden temp dir, then
renamed into place. A snapshot version is immutable: building it again is a no-op when the
content is the same and an error when it differs. Deltas and partition bundles are derived from
the snapshots and kept so that pushing a version again publishes the *same bytes*: ``data.npz``
embeds its write time, and a device refuses a second, different bundle of a version it holds.
A derived bundle is rewritten only when what it is derived from changed (a new partition map).

Push order (as ``release.release``): every input is checked and every bundle built and signed
before connecting; then the retained releases of the set are read, every artifact's chunks
published (for a delta also the snapshot it falls back to), then the signed releases, and last
the superseded artifacts' chunks are cleared.

Partitions: ``--partition-map`` (CSV ``entity,partition`` with ``device:<id>`` or ``group:<name>``)
splits the entities; each partition gets its own bundle and release on
``features_topic(fleet, SET, by, key)``. Every entity of V must be mapped. For a partition's
delta the base is the partition bundle V0 was pushed as (what those devices hold); when there is
none, V0 split by the current map. Entities removed since V0 that the map does not place are
deleted in every partition's delta (deleting an absent id is a no-op on a device). A partition
whose map entries name no entity of V gets an empty snapshot (its devices drop the set's rows).
Retained releases of the set on topics this push does not touch are left alone and listed.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_datetime64_any_dtype, is_float_dtype, is_numeric_dtype

from cloud_batch.errors import InputError, RegistryError
from cloud_batch.fleetops.fleet import DEFAULT_CONNECT_TIMEOUT_S, BrokerError, FleetView, open_link, publish_doc
from cloud_batch.fleetops.keys import load_signing_key
from cloud_batch.fleetops.release import clear_superseded, make_release_id, publish_chunks, sign_release
from cloud_batch.progress import Reporter
from cloud_batch.registry.models import Registry, _publishable
from edge_agent.errors import EdgeError
from edge_agent.fsutil import fsync_dir, fsync_tree, locked
from edge_agent.wire.bundle import (
    DTYPES,
    STALE_POLICIES,
    Bundle,
    BundleInfo,
    BundleRejected,
    read_bundle,
    read_info,
    write_bundle,
)
from edge_agent.wire.manifest import parse_version
from edge_agent.wire.protocol import (
    DEFAULT_CHUNK_SIZE,
    ROOT,
    Artifact,
    Release,
    check_segment,
    decode,
    features_topic,
    pack_dir,
)

log = logging.getLogger(__name__)

FEATURES_DIR = "features"
DELTA_MARK = ".delta-from-"
PARTITIONS_SUFFIX = ".partitions"
ALL: tuple[str, str] = ("all", "all")
PROGRESS_MIN_BYTES = 8 << 20  # CSVs from this size are read in chunks behind a progress bar
PROGRESS_MIN_ROWS = 200_000  # tables from this many rows get status lines while they are checked
CSV_CHUNK_ROWS = 100_000
MAX_SHOWN = 5  # offending names listed in an error


# -- the feature registry ---------------------------------------------------------------------
class FeatureRegistry:
    """Feature-set versions under ``DIR/features`` (see the module docstring for the layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.base = self.root / FEATURES_DIR

    def sets(self) -> list[str]:
        if not self.base.is_dir():
            return []
        return sorted(
            p.name for p in self.base.iterdir() if p.is_dir() and not p.name.startswith(".") and self.versions(p.name)
        )

    def versions(self, set_name: str) -> list[str]:
        """Snapshot versions of ``set_name``, oldest first (numeric order)."""
        d = self.base / set_name
        if not d.is_dir():
            return []
        found = []
        for p in d.iterdir():
            if p.name.startswith(".") or not (p / "bundle.json").is_file():
                continue
            try:
                found.append((parse_version(p.name), p.name))
            except EdgeError:
                continue  # derived bundles (V.delta-from-V0) and partition folders
        return [name for _, name in sorted(found)]

    def snapshot_path(self, set_name: str, version: str) -> Path:
        return self.base / set_name / version

    def delta_path(self, set_name: str, version: str, base_version: str) -> Path:
        return self.base / set_name / f"{version}{DELTA_MARK}{base_version}"

    def partition_path(
        self, set_name: str, version: str, partition: tuple[str, str], base_version: str | None = None
    ) -> Path:
        name = f"{partition[0]}-{partition[1]}" + (f"{DELTA_MARK}{base_version}" if base_version else "")
        return self.base / set_name / f"{version}{PARTITIONS_SUFFIX}" / name

    def read(self, set_name: str, version: str) -> Bundle:
        """The snapshot of ``set_name`` ``version``, fully validated; RegistryError if absent or broken."""
        path = self.snapshot_path(set_name, version)
        if not (path / "bundle.json").is_file():
            if not self.versions(set_name):
                raise RegistryError(
                    f"feature set {set_name!r} is not in the registry {self.root} "
                    f"(sets: {self.sets() or 'none'}); build it with `cloud-batch features build`"
                )
            raise RegistryError(
                f"feature set {set_name!r} has no version {version!r} in {self.root} "
                f"(versions: {self.versions(set_name)})"
            )
        try:
            bundle = read_bundle(path)
        except BundleRejected as exc:
            raise RegistryError(f"{path} is not a valid feature bundle: {exc}") from exc
        info = bundle.info
        if (info.set, info.version, info.kind) != (set_name, version, "snapshot"):
            raise RegistryError(
                f"{path}: its bundle.json says {info.set} {info.version} ({info.kind}), "
                f"not the snapshot {set_name} {version}"
            )
        return bundle

    def locked(self) -> AbstractContextManager[None]:
        """An exclusive lock on the feature registry (one writer publishes a directory at a time)."""
        return locked(self.base / ".lock")


# -- a table of features -------------------------------------------------------------------
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


@dataclass
class BuildResult:
    """What ``build`` did: ``created`` is False when the same content was already registered."""

    set: str
    version: str
    path: Path
    info: BundleInfo
    created: bool
    source: str = ""

    def summary(self) -> str:
        what = "built" if self.created else "already built (same content, nothing written)"
        return (
            f"{what}: feature set {self.set} version {self.version} -> {self.path}\n"
            f"  {self.info.rows:,} entities ({self.info.entity_key}) x {len(self.info.features)} features "
            f"({self.info.features[0].dtype}), bundle {self.info.id}"
            + (f"\n  from {self.source}" if self.source else "")
        )


def read_table(path: str | Path, *, text_columns: Sequence[str] = (), progress: bool = True) -> pd.DataFrame:
    """A CSV (``pandas.read_csv``) or Parquet (``pandas.read_parquet``) file as a frame.

    ``text_columns`` are read as strings from a CSV (entity ids like ``007`` keep their zeros).
    CSVs of ``PROGRESS_MIN_BYTES`` and more are read in chunks behind a progress bar.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"input file not found: {p}")
    name = p.name.lower()
    if name.endswith((".parquet", ".pq")):
        if importlib.util.find_spec("pyarrow") is None and importlib.util.find_spec("fastparquet") is None:
            raise InputError(
                f"reading {p} needs pyarrow, which is not installed: `pip install pyarrow` (or export the table as CSV)"
            )
        try:
            return pd.read_parquet(p)
        except (OSError, ValueError, ImportError) as exc:
            raise InputError(f"cannot read {p} as Parquet: {exc}") from exc
    if not name.endswith(".csv"):
        raise InputError(f"unsupported input {p}: use a .csv or .parquet file")
    dtype = {c: str for c in text_columns}
    try:
        size = p.stat().st_size
        if not progress or size < PROGRESS_MIN_BYTES:
            return pd.read_csv(p, dtype=dtype)
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        parts = []
        with (
            open(p, "rb") as fh,
            Progress(
                TextColumn("[bold]reading {task.description}"),
                BarColumn(),
                DownloadColumn(),
                TimeRemainingColumn(),
                console=Reporter().console,
                transient=True,
            ) as bar,
        ):
            task = bar.add_task(p.name, total=size)
            for chunk in pd.read_csv(fh, dtype=dtype, chunksize=CSV_CHUNK_ROWS):
                parts.append(chunk)
                bar.update(task, completed=fh.tell())
        return pd.concat(parts, ignore_index=True) if parts else pd.read_csv(p, dtype=dtype)
    except pd.errors.EmptyDataError as exc:
        raise InputError(f"{p} is empty (no header row)") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise InputError(f"cannot read {p} as CSV: {exc}") from exc


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
        raise InputError(f"{source} has no entity column {entity_key!r} (columns: {_shown(columns)})")
    if event_ts_col is not None:
        if event_ts_col not in columns:
            raise InputError(f"{source} has no event-ts column {event_ts_col!r} (columns: {_shown(columns)})")
        if event_ts_col == entity_key:
            raise InputError(f"the event-ts column {event_ts_col!r} cannot also be the entity column")
    if len(set(columns)) != len(columns):
        raise InputError(
            f"{source} has duplicate column names {_shown(sorted({c for c in columns if columns.count(c) > 1}))}"
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
                f"{source}: columns {_shown(floats)} hold floats; they cannot be int64 features "
                "(use --dtype float32 or float64)"
            )
        values = df[feature_cols].to_numpy(dtype=np.int64)
    else:
        raw = df[feature_cols].to_numpy(dtype=np.float64)
        _no_missing(raw, entities, feature_cols, source, "missing value (NaN)")
        with np.errstate(over="ignore"):  # reported below, naming the entity
            values = raw.astype(DTYPES[dtype])
        _no_missing(values, entities, feature_cols, source, f"value too large for {dtype}")
    if event_ts_col is None:
        event_ts = np.full(len(entities), time.time() if now is None else float(now), dtype="<f8")
    else:
        event_ts = _event_times(df[event_ts_col], entities, event_ts_col, source)
    return FeatureTable(
        entities, event_ts, values, tuple(feature_cols), entity_key, dtype, event_ts_col is not None, source
    )


def _shown(names: Sequence[Any]) -> str:
    items = [repr(n) for n in list(names)[:MAX_SHOWN]]
    more = len(names) - MAX_SHOWN
    return ", ".join(items) + (f" and {more} more" if more > 0 else "")


def _describe_column(col: pd.Series) -> str:
    sample = col.dropna()
    return f"dtype {col.dtype}" + (f", e.g. {sample.iloc[0]!r}" if len(sample) else "")


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


def _no_missing(values: np.ndarray, entities: np.ndarray, names: Sequence[str], source: str, what: str) -> None:
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
            f"{source}: event time {col.iloc[i]!r} of entity {str(entities[i])!r} (row {i + 1}, column "
            f"{name!r}) is not a time at or after 1970 (epoch seconds or ISO-8601)"
        )
    return ts


# -- recipes: features computed from raw history -----------------------------------------------
Recipe = Callable[..., FeatureTable]


def maintenance_recipe(
    *,
    history: str | Path | pd.DataFrame | None = None,
    as_of: str | pd.Timestamp | None = None,
    seed: int = 0,
    n_assets: int = 200,
    days: int = 60,
    registry_dir: str | Path | None = None,
    reporter: Reporter | None = None,
) -> FeatureTable:
    """Per-asset aggregates (``maintenance_features.asset_features``) of a sensor history.

    The history is ``history`` (a frame, CSV or Parquet with ``maintenance_data``'s columns) or,
    without it, ``maintenance_data.generate(n_assets, days, seed)`` (the defaults are the data
    the shipped maintenance model was trained on). ``as_of`` defaults to the newest reading and
    is every row's event time. When ``registry_dir`` holds a ``maintenance`` model, its
    ``asset_features`` feature names must be the recipe's.
    """
    from cloud_batch.train.maintenance_data import generate
    from cloud_batch.train.maintenance_features import FEATURE_NAMES, asset_features

    reporter = reporter or Reporter(enabled=False)
    if registry_dir is not None:
        _check_model_features(registry_dir, FEATURE_NAMES)
    if history is None:
        reporter.status(f"generating the synthetic history: {n_assets} assets x {days} days (seed {seed})")
        df = generate(n_assets=n_assets, days=days, seed=seed)
        source = f"recipe maintenance: maintenance_data.generate(n_assets={n_assets}, days={days}, seed={seed})"
    elif isinstance(history, pd.DataFrame):
        df, source = history, "recipe maintenance: the given history"
    else:
        df = read_table(history, text_columns=("asset_id", "event"), progress=reporter.enabled)
        source = f"recipe maintenance: {history}"
        if "timestamp" in df.columns:
            try:
                ts = pd.to_datetime(df["timestamp"], format="ISO8601")
            except (ValueError, TypeError) as exc:
                raise InputError(f"{history}: column 'timestamp' is not ISO-8601 times: {exc}") from exc
            df["timestamp"] = ts.dt.tz_convert("UTC").dt.tz_localize(None) if ts.dt.tz is not None else ts
        if "event" in df.columns:
            df["event"] = df["event"].fillna("")
    if "timestamp" not in df.columns:
        raise InputError("sensor history lacks columns ['timestamp']")
    if as_of is None:
        as_of_ts = pd.Timestamp(df["timestamp"].max())
    else:
        try:
            as_of_ts = pd.Timestamp(as_of)
        except (ValueError, TypeError) as exc:
            raise InputError(f"--as-of {as_of!r} is not a time (e.g. 2024-02-29T23:00)") from exc
        if as_of_ts.tzinfo is not None:
            as_of_ts = as_of_ts.tz_convert("UTC").tz_localize(None)
    reporter.status(f"computing asset_features as of {as_of_ts} over {len(df):,} readings")
    feats = asset_features(df, as_of_ts)
    if tuple(feats.columns) != FEATURE_NAMES:  # asset_features promises this; a device depends on it
        raise InputError(f"asset_features returned columns {list(feats.columns)}, expected {list(FEATURE_NAMES)}")
    entities = np.array([str(i) for i in feats.index], dtype=str)
    epoch = float((as_of_ts.tz_localize("UTC") - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1))
    values = feats.to_numpy(dtype=np.float32)
    _no_missing(values, entities, FEATURE_NAMES, source, "missing value (NaN)")
    return FeatureTable(
        entities,
        np.full(len(entities), epoch, dtype="<f8"),
        values,
        FEATURE_NAMES,
        "asset_id",
        "float32",
        True,
        f"{source}, as of {as_of_ts}",
    )


def _check_model_features(registry_dir: str | Path, names: Sequence[str]) -> None:
    """A registered maintenance model must take exactly these features, in this order."""
    registry = Registry(registry_dir)
    try:
        latest = registry.latest("maintenance")
        if latest is None:
            return
        expected = registry.manifest("maintenance", latest).extra.get("feature_names", {}).get("asset_features")
    except (RegistryError, AttributeError):
        return  # no readable maintenance model: nothing to check against
    if expected is not None and list(expected) != list(names):
        raise InputError(
            f"the recipe's features {list(names)} are not the asset_features the registered maintenance "
            f"model {latest} expects ({list(expected)}); devices would feed it the wrong columns"
        )


RECIPES: dict[str, Recipe] = {"maintenance": maintenance_recipe}


# -- build -----------------------------------------------------------------------------------
def check_version(version: str, what: str = "version") -> str:
    try:
        parse_version(version)
    except EdgeError as exc:
        raise InputError(f"{what}: {exc}") from exc
    return version


def check_set(set_name: str) -> str:
    try:
        return check_segment(set_name, "feature set name")
    except EdgeError as exc:
        raise InputError(str(exc)) from exc


def _check_build_options(ttl_s: float | None, stale_policy: str, dtype: str) -> None:
    if ttl_s is not None and (
        isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not math.isfinite(ttl_s) or ttl_s <= 0
    ):
        raise InputError(f"ttl {ttl_s!r} s must be a positive number of seconds")
    if stale_policy not in STALE_POLICIES:
        raise InputError(f"stale policy {stale_policy!r} is not one of {list(STALE_POLICIES)}")
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {list(DTYPES)}")


def build(
    registry_dir: str | Path,
    set_name: str,
    version: str,
    *,
    source: str | Path | None = None,
    entity_key: str | None = None,
    recipe: str | None = None,
    history: str | Path | None = None,
    as_of: str | None = None,
    seed: int = 0,
    n_assets: int = 200,
    days: int = 60,
    ttl_s: float | None = None,
    stale_policy: str = "reject",
    event_ts_col: str | None = None,
    dtype: str = "float32",
    progress: bool = True,
    now: float | None = None,
) -> BuildResult:
    """Build snapshot ``version`` of ``set_name`` from a file (``source`` + ``entity_key``) or a ``recipe``.

    Raises InputError for bad inputs and RegistryError when the version exists with other content;
    nothing is written in either case.
    """
    check_set(set_name)
    check_version(version)
    _check_build_options(ttl_s, stale_policy, dtype)
    if (source is None) == (recipe is None):
        raise InputError("give exactly one of --from FILE (with --entity-key) or --recipe NAME")
    reporter = Reporter(enabled=progress)
    if source is not None:
        if not entity_key:
            raise InputError("--from needs --entity-key COL (the column that names each entity)")
        if history is not None or as_of is not None:
            raise InputError("--history and --as-of are options of --recipe, not of --from")
        frame = read_table(source, text_columns=(entity_key,), progress=progress)
        if len(frame) >= PROGRESS_MIN_ROWS:
            reporter.status(f"checking {len(frame):,} rows x {frame.shape[1]} columns of {source}")
        table = table_from_frame(frame, entity_key, event_ts_col=event_ts_col, dtype=dtype, now=now, source=str(source))
    else:
        if recipe not in RECIPES:
            raise InputError(f"unknown recipe {recipe!r}; recipes: {', '.join(sorted(RECIPES))}")
        if entity_key is not None or event_ts_col is not None:
            raise InputError(f"--entity-key and --event-ts-col are options of --from; recipe {recipe} defines its own")
        if dtype != "float32":
            raise InputError(f"recipe {recipe} produces float32 features (the model's input); drop --dtype")
        table = RECIPES[recipe](
            history=history,
            as_of=as_of,
            seed=seed,
            n_assets=n_assets,
            days=days,
            registry_dir=registry_dir,
            reporter=reporter,
        )
    reporter.status(f"writing {len(table.entities):,} entities x {len(table.features)} features")
    return write_snapshot(registry_dir, set_name, version, table, ttl_s=ttl_s, stale_policy=stale_policy)


def write_snapshot(
    registry_dir: str | Path,
    set_name: str,
    version: str,
    table: FeatureTable,
    *,
    ttl_s: float | None = None,
    stale_policy: str = "reject",
) -> BuildResult:
    """Write ``table`` as snapshot ``version`` (temp dir, then rename); a no-op if the same content is there.

    Without explicit event times (``table.explicit_ts`` False) the timestamps are not compared:
    rebuilding the same values is a no-op and the registered version keeps its times.
    """
    check_set(set_name)
    check_version(version)
    _check_build_options(ttl_s, stale_policy, table.dtype)
    reg = FeatureRegistry(registry_dir)
    target = reg.snapshot_path(set_name, version)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        try:
            write_bundle(
                work,
                set_name,
                version,
                "snapshot",
                table.entities,
                table.event_ts,
                table.values,
                table.features,
                ttl_s=ttl_s,
                stale_policy=stale_policy,
                entity_key=table.entity_key,
                dtype=table.dtype,
            )
            staged = read_bundle(work)
        except BundleRejected as exc:
            raise InputError(f"{table.source or 'the input'}: {exc}") from exc
        _publishable(work)
        fsync_tree(work)
        with reg.locked():
            if target.exists():
                try:
                    old = read_bundle(target)
                except BundleRejected as exc:
                    raise RegistryError(
                        f"{set_name} version {version} exists at {target} but is unreadable: {exc}"
                    ) from exc
                diffs = bundle_differences(old, staged, event_ts=table.explicit_ts)
                if diffs:
                    raise RegistryError(
                        f"feature set {set_name} version {version} already exists in {reg.root} with different content "
                        f"({'; '.join(diffs)}); versions are immutable, build a new version "
                        f"(next free: {_next_version(reg.versions(set_name))})"
                    )
                return BuildResult(set_name, version, target, old.info, False, table.source)
            os.rename(work, target)
            fsync_dir(target.parent)
        log.info("features %s: built %s %s (%d rows)", staged.info.id, set_name, version, staged.info.rows)
        return BuildResult(set_name, version, target, read_info(target), True, table.source)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _next_version(versions: list[str]) -> str:
    return str(parse_version(versions[-1])[0] + 1) if versions else "1"


def bundle_differences(a: Bundle, b: Bundle, *, event_ts: bool = True) -> list[str]:
    """What differs between two bundles' content (``created_at`` and the npz bytes aside); [] if nothing."""
    ia, ib = a.info, b.info
    out = [
        f"{k} {getattr(ia, k)!r} != {getattr(ib, k)!r}"
        for k in ("set", "version", "kind", "base_version", "entity_key", "ttl_s", "stale_policy")
        if getattr(ia, k) != getattr(ib, k)
    ]
    if ia.features != ib.features:
        out.append("features/dtype")
    if dict(ia.partition) != dict(ib.partition):
        out.append(f"partition {dict(ia.partition)} != {dict(ib.partition)}")
    if not np.array_equal(a.entities, b.entities):
        out.append(f"entities ({len(a.entities)} vs {len(b.entities)})")
    elif ia.features == ib.features and not np.array_equal(a.values, b.values):
        out.append(f"values of {int((a.values != b.values).any(axis=1).sum())} entities")
    elif event_ts and not np.array_equal(a.event_ts, b.event_ts):
        out.append("event timestamps")
    if not np.array_equal(a.deleted, b.deleted):
        out.append("deleted entities")
    return out


# -- deltas and partitions -----------------------------------------------------------------
@dataclass
class Rows:
    """Arrays of one bundle's upserts (sorted by entity) and deletions."""

    entities: np.ndarray
    event_ts: np.ndarray
    values: np.ndarray
    deleted: np.ndarray = field(default_factory=lambda: np.empty(0, dtype="<U1"))

    @classmethod
    def of(cls, bundle: Bundle) -> Rows:
        return cls(bundle.entities, bundle.event_ts, bundle.values, bundle.deleted)

    def take(self, mask: np.ndarray) -> Rows:
        return Rows(self.entities[mask], self.event_ts[mask], self.values[mask])


def compute_delta(base: Rows, new: Rows) -> Rows:
    """Upserts (new entities, or a row whose values or event_ts changed) and deletions (gone since base)."""
    in_base = np.isin(new.entities, base.entities, assume_unique=True)
    changed = ~in_base
    if in_base.any():
        common = new.entities[in_base]
        idx = np.searchsorted(base.entities, common)  # base.entities is sorted (read_bundle)
        diff = (base.values[idx] != new.values[in_base]).any(axis=1) | (base.event_ts[idx] != new.event_ts[in_base])
        changed[np.flatnonzero(in_base)[diff]] = True
    deleted = np.setdiff1d(base.entities, new.entities, assume_unique=True)
    out = new.take(changed)
    out.deleted = deleted if len(deleted) else np.empty(0, dtype="<U1")
    return out


def read_partition_map(path: str | Path) -> dict[str, tuple[str, str]]:
    """``entity,partition`` CSV → {entity: (by, key)} where partition is ``device:<id>`` or ``group:<name>``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"partition map not found: {p}")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as exc:
        raise InputError(f"partition map {p} is empty (expected the header entity,partition)") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise InputError(f"cannot read partition map {p}: {exc}") from exc
    cols = [str(c).strip() for c in df.columns]
    if cols[:2] != ["entity", "partition"] or len(cols) != 2:
        raise InputError(f"partition map {p}: expected the columns entity,partition, got {','.join(cols)}")
    if df.empty:
        raise InputError(f"partition map {p} has no rows")
    out: dict[str, tuple[str, str]] = {}
    for row, (entity, part) in enumerate(zip(df.iloc[:, 0].tolist(), df.iloc[:, 1].tolist()), start=2):
        entity, part = entity.strip(), part.strip()
        where = f"partition map {p} line {row}"
        if not entity:
            raise InputError(f"{where}: empty entity")
        by, sep, key = part.partition(":")
        if not sep or by not in ("device", "group"):
            raise InputError(f"{where}: partition {part!r} for entity {entity!r} must be device:<id> or group:<name>")
        try:
            check_segment(key, f"{by} name")
        except EdgeError as exc:
            raise InputError(f"{where}: {exc}") from exc
        if entity in out:
            raise InputError(
                f"{where}: entity {entity!r} is mapped twice ({out[entity][0]}:{out[entity][1]} and {part})"
            )
        out[entity] = (by, key)
    return out


def split_by_partition(
    entities: np.ndarray, mapping: Mapping[str, tuple[str, str]]
) -> dict[tuple[str, str], np.ndarray]:
    """{partition: boolean mask over ``entities``}; entities the map does not place are left out."""
    labels = np.array([f"{b}:{k}" for b, k in (mapping.get(str(e), ("", "")) for e in entities.tolist())], dtype=object)
    parts = sorted(set(mapping.values()))
    return {part: labels == f"{part[0]}:{part[1]}" for part in parts}


# -- push ----------------------------------------------------------------------------------
@dataclass
class PlannedRelease:
    """One partition's signed release and the bundle directories it ships."""

    partition: tuple[str, str]
    topic: str
    bundle_dir: Path
    info: BundleInfo
    blob: bytes
    release: Release
    signed: dict[str, Any]
    fallback_dir: Path | None = None
    fallback_blob: bytes | None = None


@dataclass
class PushResult:
    """What ``push`` published and cleared."""

    set: str
    version: str
    fleet: str
    releases: list[PlannedRelease]
    cleared: list[str] = field(default_factory=list)  # sha256 of artifacts whose chunks were deleted
    other_topics: list[str] = field(default_factory=list)  # retained releases of this set not touched

    def summary(self) -> str:
        lines = [
            f"pushed feature set {self.set} {self.version} to fleet {self.fleet}: "
            f"{len(self.releases)} release{'s' if len(self.releases) != 1 else ''}"
        ]
        for r in self.releases:
            a, info = r.release.artifact, r.info
            what = (
                f"delta from {info.base_version}: {info.rows:,} upserts, {info.deletes:,} deletions"
                if info.kind == "delta"
                else f"snapshot: {info.rows:,} entities"
            )
            lines.append(f"  {r.topic}  {r.release.release_id}")
            lines.append(
                f"    {what}; artifact {a.sha256[:12]}… {a.size:,} bytes in {len(a.chunks)} chunk(s)"
                + (
                    f"; fallback snapshot {r.release.fallback.sha256[:12]}… {r.release.fallback.size:,} bytes"
                    if r.release.fallback
                    else ""
                )
            )
        if self.cleared:
            lines.append(
                f"  cleared {len(self.cleared)} superseded artifact(s): "
                + ", ".join(s[:12] + "…" for s in self.cleared)
            )
        for t in self.other_topics:
            lines.append(f"  note: {t} still holds an older release of {self.set} (not part of this push)")
        return "\n".join(lines)


def push(
    registry_dir: str | Path,
    set_name: str,
    version: str,
    fleet: str,
    key_path: str | Path,
    broker_url: str,
    *,
    delta_from: str | None = None,
    partition_map: str | Path | Mapping[str, tuple[str, str]] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    publish_timeout_s: float = 60.0,
) -> PushResult:
    """Publish snapshot ``version`` of ``set_name`` (or a delta from ``delta_from``) to ``fleet``.

    Raises InputError / RegistryError for bad inputs (nothing published), BrokerUnreachableError
    when the broker cannot be reached, BrokerError when it does not acknowledge a publish.
    """
    # 1. Everything local first: a bad input must publish nothing.
    try:
        check_segment(fleet, "fleet")
    except EdgeError as exc:
        raise InputError(str(exc)) from exc
    check_set(set_name)
    check_version(version)
    if delta_from is not None:
        check_version(delta_from, "--delta-from")
        if parse_version(delta_from) >= parse_version(version):
            raise InputError(f"--delta-from {delta_from} is not older than version {version}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise InputError(f"chunk size {chunk_size!r} must be a positive number of bytes")
    reg = FeatureRegistry(registry_dir)
    if not reg.root.is_dir():
        raise RegistryError(f"registry {reg.root} does not exist")
    snapshot = reg.read(set_name, version)
    base = reg.read(set_name, delta_from) if delta_from is not None else None
    if base is not None:
        _check_delta_compatible(base.info, snapshot.info)
    mapping = (
        read_partition_map(partition_map)
        if isinstance(partition_map, (str, Path))
        else dict(partition_map)
        if partition_map is not None
        else None
    )
    key = load_signing_key(key_path)

    plans = _plan(reg, snapshot, base, mapping)
    now = time.time()
    releases: list[PlannedRelease] = []
    for part, bundle_dir, fallback_dir in plans:
        blob = _pack(bundle_dir)
        fallback_blob = _pack(fallback_dir) if fallback_dir is not None else None
        rel = Release(
            release_id=features_release_id(set_name, version, part, now),
            fleet=fleet,
            name=set_name,
            version=version,
            artifact=Artifact.from_blob(blob, chunk_size),
            kind="features",
            partition={"by": part[0], "key": part[1]},
            fallback=Artifact.from_blob(fallback_blob, chunk_size) if fallback_blob is not None else None,
        )
        signed = sign_release(rel, key)
        releases.append(
            PlannedRelease(
                part,
                features_topic(fleet, set_name, *part),
                bundle_dir,
                read_info(bundle_dir),
                blob,
                rel,
                signed,
                fallback_dir,
                fallback_blob,
            )
        )
    for r in releases:
        log.info(
            "release %s: feature set %s %s (%s) for %s/%s, %d bytes",
            r.release.release_id,
            set_name,
            version,
            r.info.kind,
            *r.partition,
            len(r.blob),
        )

    result = PushResult(set_name, version, fleet, releases)
    with open_link(broker_url, connect_timeout_s) as link:
        # 2. What this push supersedes: every retained release of the set, on any partition topic.
        previous = _retained_releases(link, fleet, set_name, timeout_s=min(5.0, connect_timeout_s))

        # 3. Every artifact's chunks (the fallback snapshots too) before any release points at them.
        published: set[str] = set()
        for r in releases:
            shipped = ((r.fallback_blob, r.release.fallback, "fallback"), (r.blob, r.release.artifact, r.info.kind))
            for blob, art, label in shipped:
                if blob is None or art is None or art.sha256 in published:
                    continue
                got = publish_chunks(
                    link,
                    blob,
                    chunk_size,
                    publish_timeout_s,
                    progress,
                    f"{set_name} {version} {r.partition[0]}/{r.partition[1]} {label}",
                )
                if (got.sha256, got.chunks) != (art.sha256, art.chunks):
                    raise BrokerError(
                        f"release {r.release.release_id}: the published chunks do not match the signed "
                        "artifact description"
                    )
                published.add(art.sha256)

        # 4. The signed releases, retained.
        for r in releases:
            publish_doc(link, r.topic, r.signed, wait_s=publish_timeout_s)

        # 5. Superseded artifacts: referenced by a replaced release and by no release still retained.
        new_topics = {r.topic for r in releases}
        keep = {a.sha256 for r in releases for a in (r.release.artifact, r.release.fallback) if a is not None}
        keep |= {
            a.sha256
            for t, rel in previous.items()
            if t not in new_topics
            for a in (rel.artifact, rel.fallback)
            if a is not None
        }
        result.other_topics = sorted(t for t in previous if t not in new_topics)
        for r in releases:
            old = previous.get(r.topic)
            if old is None:
                continue
            for art in (old.artifact, old.fallback):
                if art is not None and art.sha256 not in keep:
                    clear_superseded(link, art, r.release.release_id, old.release_id, publish_timeout_s)
                    keep.add(art.sha256)  # cleared once
                    result.cleared.append(art.sha256)
    return result


def features_release_id(set_name: str, version: str, partition: tuple[str, str], now: float | None = None) -> str:
    """Readable and unique per topic and millisecond: ``asset_features-3-device.cam-7-20250101T120000.123Z``."""
    rid = make_release_id(set_name, version, now)
    if partition == ALL:
        return rid
    prefix = f"{set_name}-{version}-"
    return f"{prefix}{partition[0]}.{partition[1]}-{rid[len(prefix) :]}"


def _pack(path: Path) -> bytes:
    try:
        return pack_dir(path)
    except OSError as exc:
        raise RegistryError(f"cannot read {path}: {exc}") from exc


def _check_delta_compatible(base: BundleInfo, new: BundleInfo) -> None:
    if base.features != new.features or base.entity_key != new.entity_key:
        raise InputError(
            f"cannot compute a delta from {base.set} {base.version} to {new.version}: the feature list, "
            "dtype or entity key changed; push the snapshot (omit --delta-from)"
        )


def _plan(
    reg: FeatureRegistry, snapshot: Bundle, base: Bundle | None, mapping: Mapping[str, tuple[str, str]] | None
) -> list[tuple[tuple[str, str], Path, Path | None]]:
    """(partition, bundle dir, fallback snapshot dir) per release; derived bundles are written here."""
    info = snapshot.info
    snapshot_path = reg.snapshot_path(info.set, info.version)
    if mapping is None:
        if base is None:
            return [(ALL, snapshot_path, None)]
        delta = compute_delta(Rows.of(base), Rows.of(snapshot))
        path = reg.delta_path(info.set, info.version, base.info.version)
        _ensure_derived(reg, path, info, "delta", delta, base_version=base.info.version, partition=None)
        return [(ALL, path, snapshot_path)]

    masks = split_by_partition(snapshot.entities, mapping)
    placed = np.zeros(len(snapshot.entities), dtype=bool)
    for m in masks.values():
        placed |= m
    if not placed.all():
        missing = snapshot.entities[~placed]
        raise InputError(
            f"the partition map does not place {len(missing)} of the {len(placed)} entities of "
            f"{info.set} {info.version}: {_shown([str(e) for e in missing])}; add them (every entity "
            "needs a partition)"
        )
    now_rows = Rows.of(snapshot)
    base_rows = Rows.of(base) if base is not None else None
    unplaced_gone = np.empty(0, dtype="<U1")
    base_masks: dict[tuple[str, str], np.ndarray] = {}
    if base is not None:
        base_masks = split_by_partition(base.entities, mapping)
        in_map = np.zeros(len(base.entities), dtype=bool)
        for m in base_masks.values():
            in_map |= m
        unplaced_gone = base.entities[~in_map]  # not in V (every entity of V is placed)
    plans = []
    for part, mask in masks.items():
        pdict = {"by": part[0], "key": part[1]}
        snap_path = reg.partition_path(info.set, info.version, part)
        _ensure_derived(reg, snap_path, info, "snapshot", now_rows.take(mask), base_version=None, partition=pdict)
        if base is None or base_rows is None:
            plans.append((part, snap_path, None))
            continue
        pushed_base = reg.partition_path(info.set, base.info.version, part)
        prev = _read_derived(pushed_base, base.info.version, "snapshot", pdict)
        if prev is not None and prev.info.features == info.features and prev.info.entity_key == info.entity_key:
            delta = compute_delta(Rows.of(prev), now_rows.take(mask))
        else:
            delta = compute_delta(base_rows.take(base_masks[part]), now_rows.take(mask))
            if len(unplaced_gone):
                delta.deleted = np.union1d(delta.deleted, unplaced_gone)
        delta_path = reg.partition_path(info.set, info.version, part, base.info.version)
        _ensure_derived(reg, delta_path, info, "delta", delta, base_version=base.info.version, partition=pdict)
        plans.append((part, delta_path, snap_path))
    return plans


def _read_derived(path: Path, version: str, kind: str, partition: Mapping[str, Any] | None) -> Bundle | None:
    if not (path / "bundle.json").is_file():
        return None
    try:
        b = read_bundle(path)
    except BundleRejected:
        return None
    if (
        b.info.version != version
        or b.info.kind != kind
        or dict(b.info.partition) != dict(partition or {"by": None, "key": None})
    ):
        return None
    return b


def _ensure_derived(
    reg: FeatureRegistry,
    path: Path,
    like: BundleInfo,
    kind: str,
    rows: Rows,
    *,
    base_version: str | None,
    partition: Mapping[str, str] | None,
) -> Bundle:
    """Write a derived bundle at ``path`` unless the same content is already there (then keep its bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        try:
            write_bundle(
                work,
                like.set,
                like.version,
                kind,
                rows.entities,
                rows.event_ts,
                rows.values,
                like.features,
                ttl_s=like.ttl_s,
                stale_policy=like.stale_policy,
                base_version=base_version,
                deleted=rows.deleted,
                entity_key=like.entity_key,
                partition=partition,
            )
            staged = read_bundle(work)
        except BundleRejected as exc:
            raise RegistryError(f"cannot write {path}: {exc}") from exc
        _publishable(work)
        fsync_tree(work)
        with reg.locked():
            if path.exists():
                try:
                    old = read_bundle(path)
                    if not bundle_differences(old, staged):
                        return old
                except BundleRejected:
                    pass  # broken: replace it
                retired = path.with_name(f".old-{path.name}-{uuid.uuid4().hex[:8]}")
                os.rename(path, retired)
                os.rename(work, path)
                shutil.rmtree(retired, ignore_errors=True)
                log.info("features %s: rewrote %s (its inputs changed)", staged.info.id, path)
            else:
                os.rename(work, path)
            fsync_dir(path.parent)
        return read_bundle(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _retained_releases(link: Any, fleet: str, set_name: str, timeout_s: float) -> dict[str, Release]:
    """Topic → the retained, parseable Release on every partition topic of ``set_name``."""
    filt = f"{ROOT}/fleets/{fleet}/features/{set_name}/+/+"
    found: dict[str, Release] = {}

    def on_release(topic: str, payload: bytes, retained: bool) -> None:
        if not payload:
            found.pop(topic, None)
            return
        try:
            found[topic] = Release.from_dict(decode(payload, "release"))
        except EdgeError as exc:
            log.warning("%s: ignoring an unreadable retained release: %s", topic, exc)

    link.subscribe(filt, on_release, qos=0)
    try:
        # FleetView's probe comes back after the retained messages of every earlier subscription
        # on the same connection, ours included.
        FleetView(link, fleet, devices=False).sync(timeout_s=timeout_s)
    finally:
        link.unsubscribe(filt)
    return dict(found)


__all__ = [
    "RECIPES",
    "BuildResult",
    "FeatureRegistry",
    "FeatureTable",
    "PushResult",
    "Rows",
    "build",
    "bundle_differences",
    "compute_delta",
    "features_release_id",
    "maintenance_recipe",
    "push",
    "read_partition_map",
    "read_table",
    "split_by_partition",
    "table_from_frame",
    "write_snapshot",
]
