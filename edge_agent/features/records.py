"""What the feature cache hands out: rows as read, a set's state, what an apply did.

Plain values with no SQLite in them, so the admission plan (``features.plan``), the cache and
its callers (join, HTTP API, CLI, OTA layer) share them without importing the cache.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edge_agent.errors import RequestError


@dataclass(frozen=True)
class SetMeta:
    """What a reader needs to decode a set's rows, for one committed version of the set."""

    name: str
    apply_id: int  # the feature_sets row this was read from: reload when a probe joins another
    version: str

    # how to decode and judge a row
    features: tuple[str, ...]
    dtype: np.dtype[Any]
    ttl_s: float | None
    stale_policy: str
    entity_key: str
    sql: str = field(repr=False)
    plain_sql: str = field(repr=False)


class FeatureRow:
    """One entity's features as read: values in feature order, provenance and freshness.

    ``version`` is the set's version at read time; ``row_version`` the bundle that last wrote this
    row (older than ``version`` when later deltas did not touch it). ``values`` is read-only.
    """

    __slots__ = ("age_s", "entity", "event_ts", "expired", "meta", "row_version", "values", "version")

    def __init__(
        self,
        entity: str,
        values: np.ndarray,
        version: str,
        row_version: str,
        event_ts: float,
        age_s: float,
        expired: bool,
        meta: SetMeta,
    ) -> None:
        self.entity = entity
        self.values = values
        self.version = version
        self.row_version = row_version
        self.event_ts = event_ts
        self.age_s = age_s
        self.expired = expired
        self.meta = meta

    @classmethod
    def decode(cls, entity: str, row: Sequence[Any], meta: SetMeta, now: float) -> FeatureRow:
        """A row read as ``(event_ts, row version, packed values, ...)``, aged relative to ``now``."""
        age = now - row[0]
        ttl = meta.ttl_s
        return cls(
            entity,
            np.frombuffer(row[2], meta.dtype),
            meta.version,
            row[1],
            row[0],
            age,
            ttl is not None and age > ttl,
            meta,
        )

    @property
    def set(self) -> str:
        return self.meta.name

    @property
    def names(self) -> tuple[str, ...]:
        return self.meta.features

    @property
    def usable(self) -> bool:
        """May a join use this value? Fresh, or expired under ``stale_policy = "serve"``."""
        return not self.expired or self.meta.stale_policy == "serve"

    def as_dict(self) -> dict[str, float | int]:
        """``{feature name: value}`` in feature order."""
        return dict(zip(self.meta.features, self.values.tolist(), strict=True))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form the CLI and API print."""
        return {
            "set": self.meta.name,
            "entity": self.entity,
            "features": self.as_dict(),
            "version": self.version,
            "row_version": self.row_version,
            "event_ts": self.event_ts,
            "age_s": self.age_s,
            "expired": self.expired,
            "ttl_s": self.meta.ttl_s,
            "stale_policy": self.meta.stale_policy,
        }

    def __repr__(self) -> str:
        return (
            f"FeatureRow(set={self.meta.name!r}, entity={self.entity!r}, version={self.version!r}, "
            f"age_s={self.age_s:.1f}, expired={self.expired}, values={self.values!r})"
        )


@dataclass(frozen=True)
class SetInfo:
    """One feature set as ``list_sets`` reports it, with freshness relative to ``now``."""

    name: str
    version: str
    kind: str  # of the last applied bundle
    base_version: str | None
    rows: int
    bytes: int
    features: tuple[str, ...]
    dtype: str
    ttl_s: float | None
    stale_policy: str
    entity_key: str
    partition: dict[str, Any]
    oldest_ts: float | None
    newest_ts: float | None
    oldest_age_s: float | None
    newest_age_s: float | None
    data_sha256: str
    created_at: str
    applied_at: float
    apply_id: int  # the apply_log entry that produced this state

    @property
    def some_expired(self) -> bool:
        """At least the oldest row is past its TTL."""
        return self.ttl_s is not None and self.oldest_age_s is not None and self.oldest_age_s > self.ttl_s

    @property
    def all_expired(self) -> bool:
        """Even the newest row is past its TTL: the set is effectively empty for joins that reject stale data."""
        return self.ttl_s is not None and self.newest_age_s is not None and self.newest_age_s > self.ttl_s

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["features"] = list(self.features)
        out["some_expired"], out["all_expired"] = self.some_expired, self.all_expired
        return out


@dataclass(frozen=True)
class ApplyResult:
    """What one ``apply`` did."""

    bundle_id: str
    set: str
    version: str
    previous_version: str | None
    kind: str
    rows: int  # rows in the set afterwards
    bytes: int
    upserted: int
    deleted: int  # rows actually removed by the delta's ``deleted`` list
    noop: bool  # the same version with the same data was already applied
    seconds: float


# The ``feature_sets`` columns, named as SetInfo's fields (``schema.SETS_COLUMNS`` selects them in this order).
SET_COLUMNS = (
    "name", "version", "kind", "base_version", "entity_key", "features", "dtype", "ttl_s", "stale_policy",
    "partition", "rows", "bytes", "oldest_ts", "newest_ts", "data_sha256", "created_at", "applied_at", "apply_id",
)  # fmt: skip


def check_text(value: str, where: str) -> None:
    """RequestError unless ``value`` is text SQLite can bind: a lone surrogate (JSON ``"\\ud800"``, or
    undecodable bytes in argv) would be a UnicodeEncodeError deep in sqlite3. Cheap for ASCII."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(f"{where} is not valid Unicode text (a lone surrogate?), got {value!r:.60}") from None


def set_info_from_row(r: Sequence[Any], now: float) -> SetInfo:
    """A ``feature_sets`` row (``SET_COLUMNS`` order) with ages relative to ``now``."""
    row = dict(zip(SET_COLUMNS, r, strict=True))
    oldest, newest = row["oldest_ts"], row["newest_ts"]
    row.update(
        features=tuple(json.loads(row["features"])),
        partition=json.loads(row["partition"]) if row["partition"] else {"by": None, "key": None},
        created_at=row["created_at"] or "",
        oldest_age_s=None if oldest is None else now - oldest,
        newest_age_s=None if newest is None else now - newest,
    )
    return SetInfo(**row)
