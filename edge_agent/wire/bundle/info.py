"""``bundle.json``: what a feature bundle is, the rules on it, and the errors every bundle rule raises.

See the package docstring for the format. ``BundleInfo.from_dict`` is the one parser: the reader
and the writer both go through it, so the writer cannot produce a header a device refuses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import BundleSchemaError, ManifestError
from edge_agent.wire.names import check_segment, is_sha256, parse_version

SCHEMA_VERSION = 1
BUNDLE_TYPE = "feature_bundle"
BUNDLE_FILE = "bundle.json"
DATA_FILE = "data.npz"
KINDS = ("snapshot", "delta")
STALE_POLICIES = ("reject", "serve")
PARTITION_BY = ("device", "group", None)
DTYPES: dict[str, np.dtype[Any]] = {"float64": np.dtype("<f8"), "float32": np.dtype("<f4"), "int64": np.dtype("<i8")}
MAX_ENTITY_LEN = 256
_FEATURE_NAME = re.compile(r"^[^\x00-\x1f]{1,128}$")


# -- errors -------------------------------------------------------------------------
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
        _check_header(raw)
        try:
            name = check_segment(raw["set"], "feature set name")
        except ManifestError as exc:
            raise BundleSchemaError(f"bundle.json.set: {exc}") from exc
        version = _check_version(raw["version"], "version")
        kind, base = _check_kind(raw, version)
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
        for key in ("rows", "deletes"):
            n = raw[key]
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise BundleSchemaError(f"bundle.json.{key}: expected a non-negative integer, got {n!r}")
        if kind == "snapshot" and raw["deletes"]:
            raise BundleSchemaError("bundle.json: a snapshot cannot delete entities (deletes must be 0)")
        if not is_sha256(raw["data_sha256"]):
            raise BundleSchemaError("bundle.json.data_sha256: expected 64 lowercase hex digits")
        created = raw.get("created_at", "")
        if not isinstance(created, str):
            raise BundleSchemaError("bundle.json.created_at: expected an ISO 8601 string")
        return cls(
            set=name,
            version=version,
            kind=kind,
            features=_check_features(raw["features"]),
            ttl_s=None if ttl is None else float(ttl),
            stale_policy=policy,
            rows=raw["rows"],
            deletes=raw["deletes"],
            data_sha256=raw["data_sha256"],
            base_version=base,
            entity_key=entity_key,
            partition=_check_partition(raw.get("partition")),
            created_at=created,
            extra={k: v for k, v in raw.items() if k not in _KNOWN},
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


# Every key ``bundle.json`` defines; others are kept in ``BundleInfo.extra`` for round trips.
_REQUIRED = ("set", "version", "kind", "features", "ttl_s", "stale_policy", "rows", "deletes", "data_sha256")
_KNOWN = frozenset((*_REQUIRED, "schema_version", "type", "base_version", "entity_key", "partition", "created_at"))


def _check_header(raw: Any) -> None:
    """A JSON object of this schema version and type, with every required field."""
    if not isinstance(raw, Mapping):
        raise BundleSchemaError("bundle.json: expected a JSON object")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise BundleSchemaError(
            f"bundle.json: unsupported schema_version {raw.get('schema_version')!r} (this agent reads {SCHEMA_VERSION})"
        )
    if raw.get("type") != BUNDLE_TYPE:
        raise BundleSchemaError(f"bundle.json: type must be {BUNDLE_TYPE!r}, got {raw.get('type')!r}")
    missing = next((key for key in _REQUIRED if key not in raw), None)
    if missing is not None:
        raise BundleSchemaError(f"bundle.json: missing field {missing!r}")


def _check_kind(raw: Mapping[str, Any], version: str) -> tuple[str, str | None]:
    """``kind`` and ``base_version``: a delta names an older base, a snapshot none."""
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
    return kind, base


def _check_features(raw: Any) -> tuple[FeatureSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise BundleSchemaError("bundle.json.features: expected a non-empty list of {name, dtype}")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise BundleSchemaError(f"bundle.json.features[{i}]: expected {{'name': str, 'dtype': str}}")
        if not _FEATURE_NAME.fullmatch(item["name"]):
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
    key: Any = raw.get("key")
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
