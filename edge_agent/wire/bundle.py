"""Feature bundles: the artifact that carries a feature set's values from the cloud to a device.

A bundle is a directory (the OTA transfer packs it with ``protocol.pack_dir``) holding two files::

    bundle.json   what the bundle is (below)
    data.npz      entities  <U  [N]     entity ids, unique, non-empty, sorted ascending when written here
                  event_ts  f8  [N]     epoch seconds of the data each row was computed from
                  values    dtype [N,F] one row per entity, columns in ``features`` order
                  deleted   <U  [M]     entity ids to drop (deltas only; absent or empty in snapshots)

``bundle.json``::

    {"schema_version": 1, "type": "feature_bundle", "set": "maintenance", "version": "42",
     "kind": "snapshot" | "delta", "base_version": null | "41",
     "entity_key": "asset_id", "features": [{"name": "temperature_mean_24h", "dtype": "float32"}, ...],
     "ttl_s": 86400 | null, "stale_policy": "reject" | "serve",
     "partition": {"by": "device" | "group" | null, "key": "cam-7" | null},
     "rows": N, "deletes": M, "created_at": "2026-11-28T16:00:00+00:00", "data_sha256": "<64 hex>"}

Rules a reader enforces (``read_bundle``; ``write_bundle`` applies the same ones, so a writer
cannot produce a bundle devices refuse):

- **Numbers only.** Every feature of a set has the same dtype, one of ``float64``, ``float32``,
  ``int64``: a row is one row of a model's input tensor and is stored packed. Strings, booleans,
  objects and mixed dtypes are refused; split such data into several sets.
- **No NaN, no infinity.** A non-finite value is refused, naming the entity and feature. "Missing"
  is expressed by leaving the entity out (the device then reports it unknown); imputation belongs in
  the batch job, where the training pipeline defines it, so a device serves exactly what the model
  was trained on (``asset_features`` already promises no NaN). ``event_ts`` must be finite and >= 0.
- **Unique keys.** An entity id appears at most once in ``entities``, at most once in ``deleted``,
  and never in both. Ids are non-empty, valid UTF-8, without NUL, at most 256 characters.
- **Integrity.** ``data_sha256`` is the SHA-256 of ``data.npz``; ``rows``/``deletes``/the feature
  list must agree with the arrays; ``data.npz`` is loaded with ``allow_pickle=False``.
- **Deltas** carry ``base_version`` (the version they were computed against); snapshots carry null.
- ``ttl_s``: a value older than this (``now - event_ts > ttl_s``) is *expired* when read; null means
  never. ``stale_policy`` says what a join does with an expired value: ``reject`` (treat as missing)
  or ``serve`` (use it, flagged).

Whether a version is newer than what the device holds, and whether a delta's base matches, are
checked when the bundle is applied (``features.FeatureCache.apply``).

Errors::

    RejectedError (edge_agent.errors)
    └── BundleRejected              .code says which rule; final for this bundle
        ├── BundleSchemaError       "schema": bundle.json malformed, shapes/dtypes disagree, delta without base
        ├── BundleValueError        "values": non-numeric, NaN/inf, bad event_ts
        ├── BundleKeyError          "keys": empty, duplicate, or both upserted and deleted entity ids
        └── BundleIntegrityError    "integrity": missing/unreadable files, data_sha256 mismatch, too large
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import ManifestError, RejectedError
from edge_agent.fsutil import atomic_write_json, fsync_dir, sha256_file
from edge_agent.wire.manifest import parse_version
from edge_agent.wire.protocol import check_segment

SCHEMA_VERSION = 1
BUNDLE_TYPE = "feature_bundle"
BUNDLE_FILE = "bundle.json"
DATA_FILE = "data.npz"
KINDS = ("snapshot", "delta")
STALE_POLICIES = ("reject", "serve")
PARTITION_BY = ("device", "group", None)
DTYPES: dict[str, np.dtype[Any]] = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "int64": np.dtype("<i8"),
}
MAX_ENTITY_LEN = 256
_ARRAYS = ("entities", "event_ts", "values", "deleted")
_FEATURE_NAME = re.compile(r"^[^\x00-\x1f]{1,128}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


# -- errors -------------------------------------------------------------------------
class BundleRejected(RejectedError):
    """A feature bundle breaks a rule; applying the same bundle again cannot succeed."""

    code = "rejected"


class BundleSchemaError(BundleRejected):
    """``bundle.json`` is malformed or disagrees with the arrays (shapes, dtypes, feature list)."""

    code = "schema"


class BundleValueError(BundleRejected):
    """A value is not a finite number of the declared dtype, or an ``event_ts`` is invalid."""

    code = "values"


class BundleKeyError(BundleRejected):
    """An entity id is empty, invalid, duplicated, or both upserted and deleted."""

    code = "keys"


class BundleIntegrityError(BundleRejected):
    """A file is missing or unreadable, or ``data.npz`` does not hash to ``data_sha256``."""

    code = "integrity"


# -- description ------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureSpec:
    """One column of a feature set."""

    name: str
    dtype: str = "float32"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "dtype": self.dtype}


@dataclass(frozen=True)
class BundleInfo:
    """The parsed ``bundle.json``: everything about a bundle except its arrays."""

    set: str
    version: str
    kind: str
    features: tuple[FeatureSpec, ...]
    ttl_s: float | None
    stale_policy: str
    rows: int
    deletes: int
    data_sha256: str
    base_version: str | None = None
    entity_key: str = "asset_id"
    partition: Mapping[str, Any] = field(default_factory=lambda: {"by": None, "key": None})
    created_at: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)  # unknown keys, kept for round trips

    @property
    def id(self) -> str:
        """The id that appears in log lines and reports: ``set@version#sha12``."""
        return f"{self.set}@{self.version}#{self.data_sha256[:12]}"

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def dtype(self) -> np.dtype[Any]:
        """The dtype of every value (little-endian), as stored on disk and in the cache."""
        return DTYPES[self.features[0].dtype]

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update(
            schema_version=SCHEMA_VERSION,
            type=BUNDLE_TYPE,
            set=self.set,
            version=self.version,
            kind=self.kind,
            base_version=self.base_version,
            entity_key=self.entity_key,
            features=[f.to_dict() for f in self.features],
            ttl_s=self.ttl_s,
            stale_policy=self.stale_policy,
            partition=dict(self.partition),
            rows=self.rows,
            deletes=self.deletes,
            created_at=self.created_at,
            data_sha256=self.data_sha256,
        )
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> BundleInfo:
        """Validate ``bundle.json``; every problem is a BundleSchemaError naming the field."""
        if not isinstance(raw, Mapping):
            raise BundleSchemaError("bundle.json: expected a JSON object")
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise BundleSchemaError(
                f"bundle.json: unsupported schema_version {raw.get('schema_version')!r} (this agent reads {SCHEMA_VERSION})"
            )
        if raw.get("type") != BUNDLE_TYPE:
            raise BundleSchemaError(f"bundle.json: type must be {BUNDLE_TYPE!r}, got {raw.get('type')!r}")
        for key in ("set", "version", "kind", "features", "ttl_s", "stale_policy", "rows", "deletes", "data_sha256"):
            if key not in raw:
                raise BundleSchemaError(f"bundle.json: missing field {key!r}")
        try:
            name = check_segment(raw["set"], "feature set name")
        except ManifestError as exc:
            raise BundleSchemaError(f"bundle.json.set: {exc}") from exc
        version = _check_version(raw["version"], "version")
        kind = raw["kind"]
        if kind not in KINDS:
            raise BundleSchemaError(f"bundle.json.kind: expected one of {list(KINDS)}, got {kind!r}")
        base = raw.get("base_version")
        if kind == "delta":
            if base is None:
                raise BundleSchemaError("bundle.json: a delta needs base_version (the version it was computed against)")
            _check_version(base, "base_version")
            if parse_version(base) >= parse_version(version):
                raise BundleSchemaError(f"bundle.json: delta base_version {base} is not older than version {version}")
        elif base is not None:
            raise BundleSchemaError("bundle.json: a snapshot must have base_version null")
        features = _check_features(raw["features"])
        ttl = raw["ttl_s"]
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0
        ):
            raise BundleSchemaError(f"bundle.json.ttl_s: expected a positive number of seconds or null, got {ttl!r}")
        policy = raw["stale_policy"]
        if policy not in STALE_POLICIES:
            raise BundleSchemaError(f"bundle.json.stale_policy: expected one of {list(STALE_POLICIES)}, got {policy!r}")
        entity_key = raw.get("entity_key", "asset_id")
        if not isinstance(entity_key, str) or not entity_key:
            raise BundleSchemaError("bundle.json.entity_key: expected a non-empty string")
        partition = _check_partition(raw.get("partition"))
        rows, deletes = raw["rows"], raw["deletes"]
        for key, n in (("rows", rows), ("deletes", deletes)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise BundleSchemaError(f"bundle.json.{key}: expected a non-negative integer, got {n!r}")
        if kind == "snapshot" and deletes:
            raise BundleSchemaError("bundle.json: a snapshot cannot delete entities (deletes must be 0)")
        sha = raw["data_sha256"]
        if not isinstance(sha, str) or not _SHA.match(sha):
            raise BundleSchemaError("bundle.json.data_sha256: expected 64 lowercase hex digits")
        created = raw.get("created_at", "")
        if not isinstance(created, str):
            raise BundleSchemaError("bundle.json.created_at: expected an ISO 8601 string")
        known = {
            "schema_version",
            "type",
            "set",
            "version",
            "kind",
            "base_version",
            "entity_key",
            "features",
            "ttl_s",
            "stale_policy",
            "partition",
            "rows",
            "deletes",
            "created_at",
            "data_sha256",
        }
        return cls(
            set=name,
            version=version,
            kind=kind,
            features=features,
            ttl_s=None if ttl is None else float(ttl),
            stale_policy=policy,
            rows=rows,
            deletes=deletes,
            data_sha256=sha,
            base_version=base,
            entity_key=entity_key,
            partition=partition,
            created_at=created,
            extra={k: v for k, v in raw.items() if k not in known},
        )


@dataclass(frozen=True)
class Bundle:
    """A validated bundle with its arrays, ready for ``FeatureCache.apply``.

    ``entities`` are sorted ascending (code point order, which is SQLite's BINARY order on UTF-8),
    with ``event_ts`` and ``values`` rows permuted alongside; ``values`` is C-contiguous little-endian.
    """

    info: BundleInfo
    entities: np.ndarray
    event_ts: np.ndarray
    values: np.ndarray
    deleted: np.ndarray
    path: Path | None = None


# -- reading ----------------------------------------------------------------------
def read_info(path: str | Path) -> BundleInfo:
    """Parse and validate ``bundle.json`` alone (cheap: no arrays, no hashing)."""
    file = Path(path) / BUNDLE_FILE
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError as exc:
        raise BundleIntegrityError(f"{file}: not found (is this a feature bundle directory?)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleSchemaError(f"{file}: not valid JSON: {exc}") from exc
    return BundleInfo.from_dict(raw)


def read_bundle(path: str | Path, *, max_rows: int | None = None) -> Bundle:
    """Read and fully validate a bundle directory; raise a BundleRejected subclass on any problem.

    ``max_rows`` refuses a bundle that declares more rows before its data is loaded (the cache
    passes its bound, so an oversized bundle does not cost a device its memory).
    """
    root = Path(path)
    info = read_info(root)
    if max_rows is not None and info.rows > max_rows:
        raise BundleIntegrityError(f"bundle {info.id}: {info.rows} rows exceed this device's limit of {max_rows}")
    data_file = root / DATA_FILE
    try:
        blob = data_file.read_bytes()
    except FileNotFoundError as exc:
        raise BundleIntegrityError(f"bundle {info.id}: {DATA_FILE} is missing") from exc
    except OSError as exc:
        raise BundleIntegrityError(f"bundle {info.id}: cannot read {DATA_FILE}: {exc}") from exc
    sha = hashlib.sha256(blob).hexdigest()
    if sha != info.data_sha256:
        raise BundleIntegrityError(
            f"bundle {info.id}: {DATA_FILE} has sha256 {sha[:12]}…, bundle.json says {info.data_sha256[:12]}…"
        )
    arrays = _load_npz(blob, info)
    bundle = _validate(info, arrays["entities"], arrays["event_ts"], arrays["values"], arrays["deleted"])
    return Bundle(bundle.info, bundle.entities, bundle.event_ts, bundle.values, bundle.deleted, root)


def _load_npz(blob: bytes, info: BundleInfo) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(io.BytesIO(blob)):
        raise BundleIntegrityError(f"bundle {info.id}: {DATA_FILE} is not a readable .npz (not a zip archive)")
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            names = set(npz.files)
            unknown = names - set(_ARRAYS)
            if unknown:
                raise BundleSchemaError(f"bundle {info.id}: unexpected arrays in {DATA_FILE}: {sorted(unknown)}")
            missing = {"entities", "event_ts", "values"} - names
            if missing:
                raise BundleSchemaError(f"bundle {info.id}: {DATA_FILE} lacks arrays {sorted(missing)}")
            out = {}
            for k in names:
                try:
                    out[k] = npz[k]
                except ValueError as exc:  # allow_pickle=False refusing an object array
                    raise BundleValueError(f"bundle {info.id}: {k} is not a numeric/string array: {exc}") from exc
    except BundleRejected:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise BundleIntegrityError(f"bundle {info.id}: {DATA_FILE} is not a readable .npz: {exc}") from exc
    out.setdefault("deleted", np.empty(0, dtype="<U1"))
    return out


# -- validation (shared by reader and writer) ----------------------------------------------
def _validate(
    info: BundleInfo, entities: np.ndarray, event_ts: np.ndarray, values: np.ndarray, deleted: np.ndarray
) -> Bundle:
    where = f"bundle {info.id}"
    entities = _check_ids(entities, f"{where}: entities")
    deleted = _check_ids(deleted, f"{where}: deleted")
    n, f = len(entities), len(info.features)
    if n != info.rows:
        raise BundleSchemaError(f"{where}: bundle.json says rows={info.rows}, entities has {n}")
    if len(deleted) != info.deletes:
        raise BundleSchemaError(f"{where}: bundle.json says deletes={info.deletes}, deleted has {len(deleted)}")
    # event_ts
    if event_ts.dtype.kind not in "fiu":
        raise BundleValueError(f"{where}: event_ts must be numeric epoch seconds, got dtype {event_ts.dtype}")
    if event_ts.shape != (n,):
        raise BundleSchemaError(f"{where}: event_ts has shape {event_ts.shape}, expected ({n},)")
    event_ts = np.ascontiguousarray(event_ts, dtype="<f8")
    bad = ~np.isfinite(event_ts) | (event_ts < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise BundleValueError(f"{where}: event_ts of entity {entities[i]!r} is {event_ts[i]!r} (need finite, >= 0)")
    # values
    if values.dtype.kind not in "fiu":
        raise BundleValueError(
            f"{where}: values must be numbers ({'/'.join(DTYPES)}), got dtype {values.dtype} — features are numbers only"
        )
    if values.ndim != 2 or values.shape != (n, f):
        raise BundleSchemaError(
            f"{where}: values has shape {values.shape}, expected ({n}, {f}) for {f} features {list(info.feature_names)[:4]}…"
        )
    declared = info.dtype
    if values.dtype.newbyteorder("<") != declared:
        raise BundleSchemaError(
            f"{where}: values dtype {values.dtype} does not match the declared {info.features[0].dtype}"
        )
    values = np.ascontiguousarray(values, dtype=declared)
    if declared.kind == "f" and n:
        finite = np.isfinite(values)
        if not finite.all():
            r, c = np.argwhere(~finite)[0]
            raise BundleValueError(
                f"{where}: {info.features[c].name} of entity {entities[r]!r} is {values[r, c]!r}; NaN and infinity "
                "are refused (impute in the batch job or leave the entity out)"
            )
    # keys: sort once, then duplicates are neighbours
    if n > 1 and not bool((entities[1:] > entities[:-1]).all()):
        order = np.argsort(entities, kind="stable")
        entities, event_ts, values = entities[order], event_ts[order], values[order]
    _no_duplicates(entities, f"{where}: entities")
    if len(deleted):
        deleted = np.sort(deleted)
        _no_duplicates(deleted, f"{where}: deleted")
        both = np.intersect1d(entities, deleted, assume_unique=True)
        if len(both):
            raise BundleKeyError(
                f"{where}: entity {str(both[0])!r} is both upserted and deleted ({len(both)} such ids)"
            )
    return Bundle(info, entities, event_ts, np.ascontiguousarray(values), deleted)


def _check_ids(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype.kind != "U":
        raise BundleKeyError(f"{where}: entity ids must be a unicode string array, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise BundleSchemaError(f"{where}: expected a 1-D array, got shape {arr.shape}")
    if not len(arr):
        return arr
    lengths = np.char.str_len(arr)
    if (lengths == 0).any():
        raise BundleKeyError(f"{where}: empty entity id at index {int(np.argmin(lengths))}")
    if int(lengths.max()) > MAX_ENTITY_LEN:
        raise BundleKeyError(f"{where}: entity id longer than {MAX_ENTITY_LEN} characters")
    joined = "".join(arr.tolist())
    if "\x00" in joined:
        raise BundleKeyError(f"{where}: entity ids must not contain NUL")
    try:
        joined.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BundleKeyError(f"{where}: entity ids are not valid UTF-8 text: {exc}") from exc
    return arr


def _no_duplicates(sorted_ids: np.ndarray, where: str) -> None:
    if len(sorted_ids) > 1:
        dup = sorted_ids[1:] == sorted_ids[:-1]
        if dup.any():
            raise BundleKeyError(
                f"{where}: duplicate entity id {str(sorted_ids[1:][dup][0])!r} ({int(dup.sum())} duplicates)"
            )


def _check_features(raw: Any) -> tuple[FeatureSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise BundleSchemaError("bundle.json.features: expected a non-empty list of {name, dtype}")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise BundleSchemaError(f"bundle.json.features[{i}]: expected {{'name': str, 'dtype': str}}")
        if not _FEATURE_NAME.match(item["name"]):
            raise BundleSchemaError(f"bundle.json.features[{i}].name: 1-128 printable characters")
        if item.get("dtype") not in DTYPES:
            raise BundleSchemaError(
                f"bundle.json.features[{i}].dtype: {item.get('dtype')!r} is not one of {list(DTYPES)} (numbers only)"
            )
        out.append(FeatureSpec(item["name"], item["dtype"]))
    names = [f.name for f in out]
    if len(set(names)) != len(names):
        raise BundleSchemaError(
            f"bundle.json.features: duplicate feature names {sorted({n for n in names if names.count(n) > 1})}"
        )
    dtypes = {f.dtype for f in out}
    if len(dtypes) > 1:
        raise BundleSchemaError(
            f"bundle.json.features: mixed dtypes {sorted(dtypes)}; a set's features share one dtype (split into sets)"
        )
    return tuple(out)


def _check_partition(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {"by": None, "key": None}
    if not isinstance(raw, Mapping) or raw.get("by") not in PARTITION_BY:
        raise BundleSchemaError("bundle.json.partition: expected {'by': 'device'|'group'|null, 'key': ...}")
    key = raw.get("key")
    if raw.get("by") is None:
        if key is not None:
            raise BundleSchemaError("bundle.json.partition: key must be null when by is null")
    else:
        try:
            check_segment(key, f"partition key ({raw['by']})")
        except ManifestError as exc:
            raise BundleSchemaError(f"bundle.json.partition: {exc}") from exc
    return {"by": raw.get("by"), "key": key}


def _check_version(value: Any, what: str) -> str:
    try:
        parse_version(value)
    except ManifestError as exc:
        raise BundleSchemaError(f"bundle.json.{what}: {exc}") from exc
    return value


# -- writing ----------------------------------------------------------------------
def write_bundle(
    path: str | Path,
    set: str,
    version: str,
    kind: str,
    entities: Iterable[str] | np.ndarray,
    event_ts: Sequence[float] | np.ndarray | float,
    values: np.ndarray | Sequence[Sequence[float]],
    features: Sequence[str | FeatureSpec | Mapping[str, str]],
    *,
    ttl_s: float | None,
    stale_policy: str = "reject",
    base_version: str | None = None,
    deleted: Iterable[str] | np.ndarray = (),
    entity_key: str = "asset_id",
    partition: Mapping[str, Any] | None = None,
    created_at: str | None = None,
    dtype: str | None = None,
    compress: bool = True,
) -> BundleInfo:
    """Validate arrays and write them as a bundle directory (``bundle.json`` + ``data.npz``).

    ``features`` are names (all of ``dtype``, default float32) or ``FeatureSpec``/``{name, dtype}``.
    ``values`` are cast to the declared dtype (float → int64 is refused). ``event_ts`` may be one
    number for every row. Rows are written sorted by entity id so a device inserts in key order.
    ``compress`` deflates ``data.npz`` (entity ids shrink ~10×; features barely).
    Raises the same BundleRejected errors a device would.
    """
    specs = tuple(_spec(f, dtype) for f in features)
    if not specs:
        raise BundleSchemaError("write_bundle: at least one feature is required")
    declared = specs[0].dtype
    if declared not in DTYPES:
        raise BundleSchemaError(f"write_bundle: dtype {declared!r} is not one of {list(DTYPES)}")
    ents = np.asarray(list(entities) if not isinstance(entities, np.ndarray) else entities)
    if ents.size == 0:
        ents = ents.astype("<U1")
    if ents.dtype.kind != "U":
        raise BundleKeyError(f"write_bundle: entity ids must be strings, got dtype {ents.dtype}")
    dels = np.asarray(list(deleted) if not isinstance(deleted, np.ndarray) else deleted)
    if dels.size == 0:
        dels = np.empty(0, dtype="<U1")
    ts = np.asarray(event_ts)
    if ts.ndim == 0:
        ts = np.full(len(ents), ts, dtype="<f8") if ts.dtype.kind in "fiu" else ts.reshape(1)
    vals = np.asarray(values)
    if vals.dtype.kind not in "fiu":
        raise BundleValueError(
            f"write_bundle: values must be numbers, got dtype {vals.dtype} — features are numbers only"
        )
    if vals.size == 0 and vals.ndim != 2:
        vals = vals.reshape(0, len(specs))
    target = DTYPES[declared]
    if target.kind == "i" and vals.dtype.kind == "f":
        raise BundleValueError("write_bundle: float values cannot be written as int64 features")
    vals = vals.astype(target, copy=False)
    raw_info = {
        "schema_version": SCHEMA_VERSION,
        "type": BUNDLE_TYPE,
        "set": set,
        "version": version,
        "kind": kind,
        "base_version": base_version,
        "entity_key": entity_key,
        "features": [s.to_dict() for s in specs],
        "ttl_s": ttl_s,
        "stale_policy": stale_policy,
        "partition": dict(partition) if partition else None,
        "rows": len(ents),
        "deletes": len(dels),
        "created_at": created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data_sha256": "0" * 64,
    }
    info = BundleInfo.from_dict(raw_info)
    checked = _validate(info, ents, ts, vals, dels)

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "entities": checked.entities,
        "event_ts": checked.event_ts,
        "values": checked.values,
    }
    if kind == "delta":
        arrays["deleted"] = checked.deleted
    fd, tmp = tempfile.mkstemp(prefix=f".{DATA_FILE}.", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "wb") as fh:
            (np.savez_compressed if compress else np.savez)(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        sha = sha256_file(tmp)
        os.replace(tmp, root / DATA_FILE)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(root)
    final = BundleInfo.from_dict({**raw_info, "data_sha256": sha, "created_at": info.created_at})
    atomic_write_json(root / BUNDLE_FILE, final.to_dict())
    return final


def _spec(f: str | FeatureSpec | Mapping[str, str], dtype: str | None) -> FeatureSpec:
    if isinstance(f, FeatureSpec):
        return f
    if isinstance(f, str):
        return FeatureSpec(f, dtype or "float32")
    if isinstance(f, Mapping) and "name" in f:
        return FeatureSpec(str(f["name"]), str(f.get("dtype") or dtype or "float32"))
    raise BundleSchemaError(f"write_bundle: feature {f!r} is not a name, FeatureSpec or {{name, dtype}}")
