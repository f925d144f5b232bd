"""The on-device feature cache: feature bundles applied into SQLite, read in microseconds.

Layout (``<data-dir>/features.db``, WAL mode)::

    _migrations    (id, name, applied_at)                       schema version, managed with sqlite-utils
    feature_sets   (name PK, version, kind, features JSON, dtype, ttl_s, stale_policy, entity_key,
                    partition JSON, rows, bytes, oldest_ts, newest_ts, data_sha256, created_at, applied_at,
                    apply_id)
    apply_log      (id AUTOINCREMENT, set_name, version, kind, bundle_id, rows, upserted, deleted, applied_at)
    "fs_<set>"     (entity TEXT PK, event_ts REAL, version TEXT, vals BLOB) WITHOUT ROWID

One row per entity per set (Feast stores one row per entity per *feature*): ``vals`` is the
entity's features packed little-endian in the set's dtype and feature order, so a lookup is one
primary-key probe and one ``np.frombuffer``. ``version`` is the bundle that last wrote the row.

**Reads.** Each thread has its own read connection (WAL readers never block the writer or each
other) and the lookup SQL is one constant string per set, so sqlite3's statement cache reuses the
prepared statement. The lookup joins the set's row in ``feature_sets``, so the set version, TTL and
dtype used to decode a row always belong to the same committed state: metadata is cached in process
and reloaded when the joined ``apply_id`` differs (an AUTOINCREMENT id, never reused, so even a set
deleted and re-applied under the same version number is noticed). ``get_many`` reads all its entities in one read
transaction (one WAL snapshot), so it never mixes two versions of a set.

**TTL.** Enforced at read time: a row whose ``now - event_ts > ttl_s`` comes back with
``expired=True`` (``get``), or raises ``FeatureExpired`` when the set's ``stale_policy`` is
``reject`` (``lookup``, what a join uses). An unknown entity is ``None`` / ``FeatureNotFound``; an
unknown set raises ``FeatureSetNotFound``.

**Writes.** ``apply`` runs one ``BEGIN IMMEDIATE`` transaction per bundle: checks (version newer,
delta base = current version, size bound), then a snapshot deletes the set's rows and inserts the
new ones in key order (measured faster than building a new table and renaming it over the old one:
1.98 s vs 2.24 s for 1M rows, ``bench/features_bench.py``), a delta deletes and upserts, and ``feature_sets`` is updated — all
committed together. Readers keep seeing the previous version until the commit; a ``kill -9`` at any
moment leaves the previous version complete (the uncommitted WAL frames are ignored on reopen).

**Durability** (``synchronous``, per connection). In WAL mode the database is never corrupted and
never holds half a bundle, whatever the setting:

- ``FULL`` (default): the WAL is fsynced at every commit, so when ``apply`` returns the bundle
  survives power loss. That is what lets the OTA layer record and report "applied" truthfully. It
  costs one fsync per bundle — bundles are large, rare transactions whose pages are written anyway,
  so the difference is within noise (see ``bench/features_bench.py``). Reads never fsync.
- ``NORMAL``: no fsync at commit, only at checkpoints. On power loss the last applied bundles may
  roll back to an earlier, complete version; the device then reports that older version, and the
  next delta fails with ``DeltaBaseMismatch`` and falls back to a snapshot download.
- ``OFF`` is refused: it can corrupt the database on power loss.

**Size bound.** ``max_rows``/``max_bytes`` bound the whole cache (all sets). A bundle that would
take it above either bound is *rejected* (``CacheFull``), never partially applied and never made
to fit by evicting rows: eviction would silently turn known entities into unknown ones and make
joins fail unpredictably. Partition sets per device/group in the batch job instead. ``bytes``
counts the payload (UTF-8 entity ids + packed values + ``ROW_OVERHEAD`` per row); the file is
larger (b-tree pages, and during a snapshot apply the WAL holds the new rows until checkpoint).

Errors::

    NotFoundError (edge_agent.errors)
    ├── FeatureSetNotFound    no such set in the cache
    ├── FeatureNotFound       the set has no row for this entity (lookup)
    └── FeatureExpired        the row is older than ttl_s and the set's stale_policy is "reject" (lookup)
    BundleRejected (edge_agent.wire.bundle; final for that bundle)
    ├── VersionNotNewer       version <= the set's current one (same version, same data: a no-op)
    ├── DeltaBaseMismatch     delta's base_version or features != the cache's: fetch a snapshot
    └── CacheFull             would exceed max_rows / max_bytes
    FailedError
    └── FeatureCacheError     SQLite could not be read or written (disk full, I/O, locked too long)
"""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.errors import FailedError, NotFoundError
from edge_agent.wire.bundle import DTYPES, Bundle, BundleRejected, read_bundle
from edge_agent.wire.manifest import parse_version
from edge_agent.wire.protocol import check_segment

if TYPE_CHECKING:
    import sqlite_utils

log = logging.getLogger(__name__)

DB_FILE = "features.db"
ROW_OVERHEAD = 16  # bytes counted per row on top of entity id and values (timestamp, version)
SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")
_CHUNK = 65536  # rows materialised at a time while inserting (bounds peak memory)
_LOG_KEEP = 1000  # apply_log entries kept
_JOIN_SQL = (
    'SELECT r.event_ts, r.version, r.vals, s.apply_id FROM "fs_{0}" AS r, feature_sets AS s '
    "WHERE s.name = ? AND r.entity = ?"
)
_PLAIN_SQL = 'SELECT event_ts, version, vals FROM "fs_{0}" WHERE entity = ?'
_META_SQL = (
    "SELECT apply_id, version, features, dtype, ttl_s, stale_policy, entity_key FROM feature_sets WHERE name = ?"
)
_SETS_COLUMNS = (
    "name, version, kind, base_version, entity_key, features, dtype, ttl_s, stale_policy, partition, "
    "rows, bytes, oldest_ts, newest_ts, data_sha256, created_at, applied_at, apply_id"
)


# -- errors -------------------------------------------------------------------------
class FeatureCacheError(FailedError):
    """The feature cache's SQLite file could not be read or written."""


class FeatureSetNotFound(NotFoundError):
    """The cache holds no feature set of this name."""


class FeatureNotFound(NotFoundError):
    """The set has no row for this entity."""


class FeatureExpired(NotFoundError):
    """The entity's row is older than the set's ``ttl_s`` and its ``stale_policy`` is ``reject``."""

    def __init__(self, message: str, row: FeatureRow) -> None:
        super().__init__(message)
        self.row = row


class VersionNotNewer(BundleRejected):
    """The bundle's version is not newer than the set's current version."""

    code = "version"


class DeltaBaseMismatch(BundleRejected):
    """A delta was computed against another version (or feature list) than the cache holds.

    The OTA layer should fetch the latest snapshot of ``set``; ``current_version`` is what the
    device has (None: nothing), ``base_version`` what the delta needs.
    """

    code = "delta_base"

    def __init__(self, message: str, *, set: str, current_version: str | None, base_version: str | None) -> None:
        super().__init__(message)
        self.set = set
        self.current_version = current_version
        self.base_version = base_version


class CacheFull(BundleRejected):
    """Applying the bundle would take the cache above ``max_rows`` or ``max_bytes``."""

    code = "too_large"


# -- results --------------------------------------------------------------------------
@dataclass(frozen=True)
class SetMeta:
    """What a reader needs to decode a set's rows, for one committed version of the set."""

    name: str
    apply_id: int
    version: str
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
        return dict(zip(self.meta.features, self.values.tolist()))

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


# -- schema ---------------------------------------------------------------------------
def _m001_feature_sets(db: sqlite_utils.Database) -> None:
    db["feature_sets"].create(
        {
            "name": str,
            "version": str,
            "kind": str,
            "base_version": str,
            "entity_key": str,
            "features": str,
            "dtype": str,
            "ttl_s": float,
            "stale_policy": str,
            "partition": str,
            "rows": int,
            "bytes": int,
            "oldest_ts": float,
            "newest_ts": float,
            "data_sha256": str,
            "created_at": str,
            "applied_at": float,
            "apply_id": int,
        },
        pk="name",
        not_null={
            "version",
            "kind",
            "entity_key",
            "features",
            "dtype",
            "stale_policy",
            "rows",
            "bytes",
            "data_sha256",
            "applied_at",
            "apply_id",
        },
    )
    # AUTOINCREMENT (which sqlite-utils' create() does not spell) guarantees ids are never reused.
    db.execute(
        "CREATE TABLE apply_log (id INTEGER PRIMARY KEY AUTOINCREMENT, set_name TEXT NOT NULL, version TEXT NOT NULL, "
        "kind TEXT NOT NULL, bundle_id TEXT NOT NULL, rows INTEGER NOT NULL, upserted INTEGER NOT NULL, "
        "deleted INTEGER NOT NULL, applied_at FLOAT NOT NULL)"
    )


# Append only; never edit a shipped migration. The position + 1 is the schema version.
MIGRATIONS: tuple[tuple[str, Callable[[sqlite_utils.Database], None]], ...] = (("feature_sets", _m001_feature_sets),)
SCHEMA_VERSION = len(MIGRATIONS)


def _table(name: str) -> str:
    return f'"fs_{name}"'


# -- the cache --------------------------------------------------------------------------
class _Reader:
    """A thread's read connection; closed when its thread ends (the thread-local drops it) or on close()."""

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __del__(self) -> None:
        try:
            self.conn.close()
        except Exception:  # interpreter shutdown; nothing useful to do
            pass


class FeatureCache:
    """Feature sets cached in one SQLite file: fast reads from many threads, one writer.

    ``max_rows``/``max_bytes`` bound the whole cache (None: unbounded). ``synchronous`` is the
    writer's durability setting (see the module docstring). ``mmap_size`` lets readers map the
    file instead of copying pages (0 turns it off, e.g. on 32-bit devices). ``clock`` supplies
    ``now`` for TTL checks when a call does not pass one.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_rows: int | None = None,
        max_bytes: int | None = None,
        synchronous: str = "FULL",
        mmap_size: int = 256 << 20,
        cache_kib: int = 16384,
        busy_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        sync = synchronous.upper()
        if sync not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, got {synchronous!r}")
        for what, bound in (("max_rows", max_rows), ("max_bytes", max_bytes)):
            if bound is not None and bound < 0:
                raise ValueError(f"{what} must be >= 0 or None")
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.synchronous = sync
        self._mmap_size = int(mmap_size)
        self._cache_kib = int(cache_kib)
        self._busy_s = float(busy_timeout_s)
        self._clock = clock
        self._meta: dict[str, SetMeta] = {}
        self._local = threading.local()
        self._readers: weakref.WeakSet[_Reader] = weakref.WeakSet()
        self._readers_lock = threading.Lock()
        self._wlock = threading.Lock()
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = self._connect()
        except sqlite3.Error as exc:
            raise FeatureCacheError(f"cannot open feature cache {self.path}: {exc}") from exc
        try:
            self._writer.execute(f"PRAGMA synchronous={sync}")
            self._writer.execute("PRAGMA journal_size_limit=67108864")  # truncate a big WAL after checkpoints
            self._migrate()
        except BaseException as exc:
            self._writer.close()
            if isinstance(exc, sqlite3.Error):
                raise FeatureCacheError(f"cannot open feature cache {self.path}: {exc}") from exc
            raise

    # -- connections ----------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=self._busy_s, cached_statements=256
        )
        conn.execute(f"PRAGMA mmap_size={self._mmap_size}")
        conn.execute(f"PRAGMA cache_size=-{self._cache_kib}")
        return conn

    def _reader(self) -> sqlite3.Connection:
        if self._closed:
            raise FeatureCacheError("the feature cache is closed")
        try:
            conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
        except sqlite3.Error as exc:
            raise FeatureCacheError(f"cannot open feature cache {self.path}: {exc}") from exc
        holder = _Reader(conn)
        self._local.reader = holder
        self._local.conn = conn
        with self._readers_lock:
            self._readers.add(holder)
        return conn

    def _migrate(self) -> None:
        conn = self._writer
        if _schema_version(conn) == SCHEMA_VERSION and conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            return  # the common case: nothing to do, and no sqlite-utils import (it pulls in pandas when present)
        import sqlite_utils

        db = sqlite_utils.Database(conn)
        db.enable_wal()  # idempotent; the journal mode is persistent in the file
        conn.execute("BEGIN IMMEDIATE")
        try:
            db["_migrations"].create({"id": int, "name": str, "applied_at": str}, pk="id", if_not_exists=True)
            done = {row[0] for row in conn.execute("SELECT id FROM _migrations")}
            if done and max(done) > SCHEMA_VERSION:
                raise FeatureCacheError(
                    f"{self.path} has schema version {max(done)}; this agent knows up to {SCHEMA_VERSION} (newer agent?)"
                )
            for i, (name, migrate) in enumerate(MIGRATIONS, start=1):
                if i not in done:
                    migrate(db)
                    db["_migrations"].insert({"id": i, "name": name, "applied_at": _utcnow()})
                    log.info("feature cache %s: applied migration %d (%s)", self.path, i, name)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close every connection. Later calls raise FeatureCacheError."""
        self._closed = True
        with self._wlock:
            self._writer.close()
        with self._readers_lock:
            for holder in list(self._readers):
                holder.conn.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def schema_version(self) -> int:
        with self._wlock:
            return _schema_version(self._writer)

    # -- reading --------------------------------------------------------------------
    def get(self, set: str, entity: str, *, now: float | None = None) -> FeatureRow | None:
        """The entity's row (``expired`` flags a TTL miss), or None when the set has no such entity.

        Raises FeatureSetNotFound for an unknown set. The hot path: one prepared primary-key probe
        joined with the set's metadata row, in the calling thread's own connection.
        """
        meta = self._meta.get(set)
        if meta is None:
            return self._get_consistent(set, entity, now)
        try:
            conn = self._local.conn
        except AttributeError:
            conn = self._reader()
        try:
            row = conn.execute(meta.sql, (set, entity)).fetchone()
        except sqlite3.Error:  # table replaced/dropped under a cached statement, or closed: slow path decides
            return self._get_consistent(set, entity, now)
        if row is None:
            return None
        if row[3] != meta.apply_id:
            return self._get_consistent(set, entity, now)
        ts = row[0]
        age = (self._clock() if now is None else now) - ts
        ttl = meta.ttl_s
        return FeatureRow(
            entity,
            np.frombuffer(row[2], meta.dtype),
            meta.version,
            row[1],
            ts,
            age,
            ttl is not None and age > ttl,
            meta,
        )

    def _get_consistent(self, set: str, entity: str, now: float | None) -> FeatureRow | None:
        """Slow path: (re)load the set's metadata and read the row in one read transaction."""
        rows = self.get_many(set, (entity,), now=now)
        return rows[0]

    def get_many(self, set: str, entities: Sequence[str], *, now: float | None = None) -> list[FeatureRow | None]:
        """Rows for several entities (None where unknown), all read from one committed version of the set."""
        try:
            conn = self._local.conn
        except AttributeError:
            conn = self._reader()
        t = self._clock() if now is None else now
        try:
            conn.execute("BEGIN")
            try:
                meta = self._load_meta(conn, set)
                ex, sql, dtype, ttl, version = conn.execute, meta.plain_sql, meta.dtype, meta.ttl_s, meta.version
                out: list[FeatureRow | None] = []
                for entity in entities:
                    row = ex(sql, (entity,)).fetchone()
                    if row is None:
                        out.append(None)
                        continue
                    age = t - row[0]
                    out.append(
                        FeatureRow(
                            entity,
                            np.frombuffer(row[2], dtype),
                            version,
                            row[1],
                            row[0],
                            age,
                            ttl is not None and age > ttl,
                            meta,
                        )
                    )
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise FeatureCacheError(f"cannot read feature set {set!r} from {self.path}: {exc}") from exc
        return out

    def lookup(self, set: str, entity: str, *, now: float | None = None) -> FeatureRow:
        """The row a join may use: raises FeatureNotFound, or FeatureExpired when stale and the policy rejects."""
        row = self.get(set, entity, now=now)
        if row is None:
            raise FeatureNotFound(f"feature set {set!r} has no entity {entity!r}")
        if not row.usable:
            raise FeatureExpired(
                f"feature set {set!r} entity {entity!r} expired: age {row.age_s:.0f}s > ttl {row.meta.ttl_s:g}s "
                f"(version {row.version}, stale_policy reject)",
                row,
            )
        return row

    def _load_meta(self, conn: sqlite3.Connection, set: str) -> SetMeta:
        raw = conn.execute(_META_SQL, (set,)).fetchone()
        if raw is None:
            self._meta.pop(set, None)
            raise FeatureSetNotFound(f"no feature set {set!r} in {self.path}")
        cached = self._meta.get(set)
        if cached is not None and cached.apply_id == raw[0]:
            return cached
        apply_id, version, features, dtype, ttl, policy, entity_key = raw
        meta = SetMeta(
            set,
            apply_id,
            version,
            tuple(json.loads(features)),
            DTYPES[dtype],
            ttl,
            policy,
            entity_key,
            _JOIN_SQL.format(set),
            _PLAIN_SQL.format(set),
        )
        self._meta[set] = meta
        return meta

    def list_sets(self, *, now: float | None = None) -> list[SetInfo]:
        """Every set with its version, size and freshness, by name."""
        t = self._clock() if now is None else now
        try:
            conn = self._local.conn
        except AttributeError:
            conn = self._reader()
        try:
            raw = conn.execute(f"SELECT {_SETS_COLUMNS} FROM feature_sets ORDER BY name").fetchall()
        except sqlite3.Error as exc:
            raise FeatureCacheError(f"cannot read {self.path}: {exc}") from exc
        return [_set_info(r, t) for r in raw]

    def set_info(self, set: str, *, now: float | None = None) -> SetInfo | None:
        return next((s for s in self.list_sets(now=now) if s.name == set), None)

    def version(self, set: str) -> str | None:
        """The set's current version (None: not cached) — what the OTA layer compares releases with."""
        info = self.set_info(set)
        return info.version if info else None

    def history(self, set: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """The latest applies, newest first: id, set, version, kind, bundle id, rows, upserted, deleted, applied_at."""
        try:
            conn = self._local.conn
        except AttributeError:
            conn = self._reader()
        where, params = ("WHERE set_name = ?", (set, limit)) if set is not None else ("", (limit,))
        try:
            cur = conn.execute(
                "SELECT id, set_name, version, kind, bundle_id, rows, upserted, deleted, applied_at FROM apply_log "
                f"{where} ORDER BY id DESC LIMIT ?",
                params,
            )
        except sqlite3.Error as exc:
            raise FeatureCacheError(f"cannot read {self.path}: {exc}") from exc
        keys = ("id", "set", "version", "kind", "bundle_id", "rows", "upserted", "deleted", "applied_at")
        return [dict(zip(keys, r)) for r in cur.fetchall()]

    # -- writing --------------------------------------------------------------------
    def apply(self, bundle: Bundle | str | Path, *, allow_downgrade: bool = False) -> ApplyResult:
        """Apply a snapshot or delta in one transaction; raise a BundleRejected subclass if refused.

        A path is read with ``read_bundle`` first. ``allow_downgrade`` accepts an older *snapshot*
        (a signed rollback release); deltas must always extend the current version.
        """
        if not isinstance(bundle, Bundle):
            bundle = read_bundle(bundle, max_rows=self.max_rows)
        info = bundle.info
        started = time.perf_counter()
        with self._wlock:
            if self._closed:
                raise FeatureCacheError("the feature cache is closed")
            conn = self._writer
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = self._apply_locked(conn, bundle, allow_downgrade, started)
                    conn.execute("ROLLBACK" if result.noop else "COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise FeatureCacheError(f"bundle {info.id}: cannot apply to {self.path}: {exc}") from exc
        result = _replace_seconds(result, time.perf_counter() - started)
        if result.noop:
            log.info("features %s: already applied, nothing to do", info.id)
        else:
            log.info(
                "features %s: applied %s %s -> %s (%d rows, %d upserted, %d deleted) in %.2fs",
                info.id,
                info.kind,
                result.previous_version,
                info.version,
                result.rows,
                result.upserted,
                result.deleted,
                result.seconds,
            )
        return result

    def _apply_locked(
        self, conn: sqlite3.Connection, bundle: Bundle, allow_downgrade: bool, started: float
    ) -> ApplyResult:
        info = bundle.info
        name, table = info.set, _table(info.set)
        cur = conn.execute(f"SELECT {_SETS_COLUMNS} FROM feature_sets WHERE name = ?", (name,)).fetchone()
        current = _set_info(cur, 0.0) if cur else None
        prev = current.version if current else None
        if current is not None and current.version == info.version and current.data_sha256 == info.data_sha256:
            return ApplyResult(
                info.id, name, info.version, prev, info.kind, current.rows, current.bytes, 0, 0, True, 0.0
            )
        if current is not None and parse_version(info.version) <= parse_version(current.version):
            if not (allow_downgrade and info.kind == "snapshot" and info.version != current.version):
                raise VersionNotNewer(
                    f"bundle {info.id}: version {info.version} is not newer than the cached {name} version "
                    f"{current.version}"
                    + (" (same version, different data)" if info.version == current.version else "")
                )
        if info.kind == "delta":
            if current is None or current.version != info.base_version:
                raise DeltaBaseMismatch(
                    f"bundle {info.id}: delta from {info.base_version} but the cache has "
                    f"{'no ' + name if current is None else name + ' ' + current.version}; a snapshot is needed",
                    set=name,
                    current_version=prev,
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
                    current_version=prev,
                    base_version=info.base_version,
                )

        n = len(bundle.entities)
        row_size = bundle.values.shape[1] * bundle.values.dtype.itemsize + ROW_OVERHEAD
        new_bytes = len("".join(bundle.entities.tolist()).encode()) + n * row_size
        other_rows, other_bytes = conn.execute(
            "SELECT coalesce(sum(rows), 0), coalesce(sum(bytes), 0) FROM feature_sets WHERE name != ?", (name,)
        ).fetchone()
        ins_sql = f"INSERT INTO {table} (entity, event_ts, version, vals) VALUES (?, ?, ?, ?)"
        deleted_n = 0
        if info.kind == "snapshot":
            rows_after, bytes_after = n, new_bytes
            self._check_bound(info.id, other_rows + rows_after, other_bytes + bytes_after)
            if current is not None:
                conn.execute(f"DELETE FROM {table}")  # truncate optimisation: frees pages, no per-row work
            else:
                conn.execute(f"DROP TABLE IF EXISTS {table}")  # an orphan left by hand, if any
                conn.execute(
                    f"CREATE TABLE {table} (entity TEXT PRIMARY KEY NOT NULL, event_ts REAL NOT NULL, "
                    "version TEXT NOT NULL, vals BLOB NOT NULL) WITHOUT ROWID"
                )
            conn.executemany(ins_sql, _rows(bundle))
            oldest = float(bundle.event_ts.min()) if n else None
            newest = float(bundle.event_ts.max()) if n else None
        elif current is not None:  # a delta; DeltaBaseMismatch above guarantees a current version
            up = _existing(conn, table, bundle.entities)
            gone = _existing(conn, table, bundle.deleted)
            rows_after = current.rows - gone[0] - up[0] + n
            bytes_after = current.bytes - gone[1] - up[1] + new_bytes
            self._check_bound(info.id, other_rows + rows_after, other_bytes + bytes_after)
            if len(bundle.deleted):
                before = conn.total_changes
                conn.executemany(f"DELETE FROM {table} WHERE entity = ?", zip(bundle.deleted.tolist()))
                deleted_n = conn.total_changes - before
            conn.executemany(ins_sql.replace("INSERT", "INSERT OR REPLACE", 1), _rows(bundle))
            oldest, newest = current.oldest_ts, current.newest_ts
            touched_min = min((x for x in (up[2], gone[2]) if x is not None), default=None)
            touched_max = max((x for x in (up[3], gone[3]) if x is not None), default=None)
            if n:
                dmin, dmax = float(bundle.event_ts.min()), float(bundle.event_ts.max())
                oldest = dmin if oldest is None else min(oldest, dmin)
                newest = dmax if newest is None else max(newest, dmax)
            # An overwritten/deleted row may have held the extreme: recompute only then (one scan).
            if rows_after == 0:
                oldest = newest = None
            elif (
                touched_min is not None
                and current.oldest_ts is not None
                and touched_min <= current.oldest_ts
                and oldest == current.oldest_ts
            ) or (
                touched_max is not None
                and current.newest_ts is not None
                and touched_max >= current.newest_ts
                and newest == current.newest_ts
            ):
                oldest, newest = conn.execute(f"SELECT min(event_ts), max(event_ts) FROM {table}").fetchone()

        applied_at = self._clock()
        apply_id = conn.execute(
            "INSERT INTO apply_log (set_name, version, kind, bundle_id, rows, upserted, deleted, applied_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (name, info.version, info.kind, info.id, rows_after, n, deleted_n, applied_at),
        ).lastrowid
        conn.execute("DELETE FROM apply_log WHERE id <= ?", (apply_id - _LOG_KEEP,))
        conn.execute(
            f"INSERT OR REPLACE INTO feature_sets ({_SETS_COLUMNS}) VALUES ({', '.join('?' * 18)})",
            (
                name,
                info.version,
                info.kind,
                info.base_version,
                info.entity_key,
                json.dumps(list(info.feature_names)),
                info.features[0].dtype,
                info.ttl_s,
                info.stale_policy,
                json.dumps(dict(info.partition)),
                rows_after,
                bytes_after,
                oldest,
                newest,
                info.data_sha256,
                info.created_at,
                applied_at,
                apply_id,
            ),
        )
        return ApplyResult(
            info.id,
            name,
            info.version,
            prev,
            info.kind,
            rows_after,
            bytes_after,
            n,
            deleted_n,
            False,
            time.perf_counter() - started,
        )

    def _check_bound(self, bundle_id: str, rows: int, nbytes: int) -> None:
        if self.max_rows is not None and rows > self.max_rows:
            raise CacheFull(f"bundle {bundle_id}: the cache would hold {rows} rows, above max_rows={self.max_rows}")
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise CacheFull(
                f"bundle {bundle_id}: the cache would hold {nbytes} bytes, above max_bytes={self.max_bytes}"
            )

    def delete_set(self, set: str) -> bool:
        """Drop a set and its rows in one transaction; False when there was no such set."""
        check_segment(set, "feature set name")
        with self._wlock:
            conn = self._writer
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    existed = conn.execute("DELETE FROM feature_sets WHERE name = ?", (set,)).rowcount > 0
                    conn.execute(f"DROP TABLE IF EXISTS {_table(set)}")
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise FeatureCacheError(f"cannot delete feature set {set!r} from {self.path}: {exc}") from exc
        self._meta.pop(set, None)
        if existed:
            log.info("features %s: deleted", set)
        return existed


# -- helpers ---------------------------------------------------------------------------
def _rows(bundle: Bundle) -> Iterable[tuple[str, float, str, bytes]]:
    """(entity, event_ts, version, packed values) tuples, built chunk by chunk and iterated in C."""
    values = bundle.values
    row_type = np.dtype((np.void, values.shape[1] * values.dtype.itemsize))
    version = bundle.info.version

    def chunk(start: int) -> Iterable[tuple[str, float, str, bytes]]:
        stop = start + _CHUNK
        blobs = values[start:stop].view(row_type).ravel().tolist()
        return zip(
            bundle.entities[start:stop].tolist(), bundle.event_ts[start:stop].tolist(), itertools.repeat(version), blobs
        )

    return itertools.chain.from_iterable(map(chunk, range(0, len(bundle.entities), _CHUNK)))


def _existing(
    conn: sqlite3.Connection, table: str, entities: np.ndarray
) -> tuple[int, int, float | None, float | None]:
    """(count, payload bytes, min event_ts, max event_ts) of the rows these entities already have."""
    if not len(entities):
        return 0, 0, None, None
    count, nbytes, lo, hi = conn.execute(
        f"SELECT count(*), coalesce(sum(length(CAST(entity AS BLOB)) + length(vals)), 0), min(event_ts), "
        f"max(event_ts) FROM {table} WHERE entity IN (SELECT value FROM json_each(?))",
        (json.dumps(entities.tolist()),),
    ).fetchone()
    return int(count), int(nbytes) + int(count) * ROW_OVERHEAD, lo, hi


def _schema_version(conn: sqlite3.Connection) -> int:
    try:
        return int(conn.execute("SELECT coalesce(max(id), 0) FROM _migrations").fetchone()[0])
    except sqlite3.OperationalError:  # no _migrations table yet: a new file
        return 0


def _set_info(r: Sequence[Any], now: float) -> SetInfo:
    (
        name,
        version,
        kind,
        base,
        entity_key,
        features,
        dtype,
        ttl,
        policy,
        partition,
        rows,
        nbytes,
        oldest,
        newest,
        sha,
        created,
        applied,
        apply_id,
    ) = r
    return SetInfo(
        name=name,
        version=version,
        kind=kind,
        base_version=base,
        rows=rows,
        bytes=nbytes,
        features=tuple(json.loads(features)),
        dtype=dtype,
        ttl_s=ttl,
        stale_policy=policy,
        entity_key=entity_key,
        partition=json.loads(partition) if partition else {"by": None, "key": None},
        oldest_ts=oldest,
        newest_ts=newest,
        oldest_age_s=None if oldest is None else now - oldest,
        newest_age_s=None if newest is None else now - newest,
        data_sha256=sha,
        created_at=created or "",
        applied_at=applied,
        apply_id=apply_id,
    )


def _replace_seconds(r: ApplyResult, seconds: float) -> ApplyResult:
    return ApplyResult(**{**asdict(r), "seconds": seconds})


def _utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
