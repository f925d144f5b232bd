"""The one feature-bundle admission rule: may this bundle be applied on top of what the cache holds?

``plan`` is pure (no SQLite, no I/O), so the OTA layer's validation, ``FeatureCache.plan`` (a dry
run) and ``FeatureCache.apply`` (inside its write transaction) all decide with the same code:

1. the same version with the same data is already cached: a no-op (``ApplyPlan.noop``);
2. the version must be newer than the cached one, unless it is a signed rollback
   (``allow_downgrade``) to an older *snapshot*; the same version with other data is never
   accepted. :func:`require_version` is this rule, also for release admission
   (``update.admission``), which knows neither the bundle's kind nor its data yet;
3. a delta must extend the cached version (``base_version``) with the same features, dtype and
   entity key, else the device needs a snapshot (``DeltaBaseMismatch``);
4. a snapshot must fit ``max_rows`` together with the other sets' rows (``CacheFull``). A delta's
   exact row count and every byte bound need the cached rows, so ``apply`` checks those.

Errors (all ``BundleRejected``: final for that bundle)::

    VersionNotNewer       version <= the set's current one (same version, same data: a no-op)
    DeltaBaseMismatch     delta's base_version or features != the cache's: fetch a snapshot
    CacheFull             would exceed max_rows / max_bytes
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.errors import CacheFull, DeltaBaseMismatch, VersionNotNewer
from edge_agent.features.records import SetInfo
from edge_agent.wire.bundle import BundleInfo
from edge_agent.wire.names import is_newer, require_newer


@dataclass(frozen=True)
class ApplyPlan:
    """What applying a bundle will do, decided before any row is written."""

    bundle_id: str
    set: str
    kind: str
    version: str
    current: SetInfo | None  # the set as cached now (None: not cached)
    noop: bool  # this version with this data is already cached
    downgrade: bool  # an older snapshot accepted as a signed rollback

    @property
    def previous_version(self) -> str | None:
        return self.current.version if self.current is not None else None


def plan(
    current: SetInfo | None,
    info: BundleInfo,
    *,
    allow_downgrade: bool,
    other_rows: int | None = None,
    max_rows: int | None = None,
) -> ApplyPlan:
    """Decide how ``info`` applies on top of ``current``; raise the rule it breaks.

    ``other_rows`` is the row count of every other set in the cache; with ``max_rows`` it bounds a
    snapshot (None skips the check).
    """
    prev = current.version if current is not None else None
    if current is not None and current.version == info.version and current.data_sha256 == info.data_sha256:
        return ApplyPlan(info.id, info.set, info.kind, info.version, current, noop=True, downgrade=False)
    suffix = " (same version, different data)" if prev == info.version else ""
    downgrade = require_version(
        info.version,
        prev,
        rollback=allow_downgrade,
        kind=info.kind,
        held=f"cached {info.set}",
        error=lambda msg: VersionNotNewer(f"bundle {info.id}: {msg}{suffix}"),
    )
    if info.kind == "delta":
        _check_delta(current, info)
    elif max_rows is not None and other_rows is not None and other_rows + info.rows > max_rows:
        raise CacheFull(
            f"bundle {info.id}: the cache would hold {other_rows + info.rows} rows, above max_rows={max_rows}"
        )
    return ApplyPlan(info.id, info.set, info.kind, info.version, current, noop=False, downgrade=downgrade)


def require_version(
    incoming: str,
    current: str | None,
    *,
    rollback: bool,
    kind: str | None = None,
    what: str = "version",
    held: str = "cached",
    error: Callable[[str], Exception] = VersionNotNewer,
) -> bool:
    """The feature-set version rule (anti-rollback); True when it admits a downgrade.

    ``incoming`` must be newer than ``current`` unless ``rollback`` (a signed rollback release).
    With the bundle in hand (``kind`` given) a rollback lifts the rule only for a snapshot of
    another version: a delta needs its base, and the same version with other data is never
    accepted (with the same data ``plan`` has already called it a no-op). At release level
    (``kind`` None: the kind and the data are inside the artifact, not fetched yet) a signed
    rollback passes, and ``plan`` decides once the bundle is downloaded (docs/protocol.md).
    """
    lifted = rollback and (kind is None or (kind == "snapshot" and incoming != current))
    require_newer(what, incoming, current, rollback=lifted, held=held, error=error)
    return lifted and not is_newer(incoming, current)


def _check_delta(current: SetInfo | None, info: BundleInfo) -> None:
    """A delta applies only to its base version, with the same columns."""
    name = info.set
    if current is None or current.version != info.base_version:
        held = f"no {name}" if current is None else f"{name} {current.version}"
        raise DeltaBaseMismatch(
            f"bundle {info.id}: delta from {info.base_version} but the cache has {held}; a snapshot is needed",
            set=name,
            current_version=current.version if current is not None else None,
            base_version=info.base_version,
        )
    if (
        current.features != info.feature_names
        or current.dtype != info.features[0].dtype
        or current.entity_key != info.entity_key
    ):
        raise DeltaBaseMismatch(
            f"bundle {info.id}: delta's features/dtype/entity key differ from the cached {name} "
            f"version {current.version}; a snapshot is needed",
            set=name,
            current_version=current.version,
            base_version=info.base_version,
        )
