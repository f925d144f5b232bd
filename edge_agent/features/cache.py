"""The on-device feature cache: feature bundles applied into SQLite, read in microseconds.

The file's layout and migrations are in ``features.schema``; the admission rule every apply,
dry run and OTA validation uses is ``features.plan``; writing a bundle's rows (and the size
bound) is ``features.writer``.

**Reads.** Each thread has its own read connection (WAL readers never block the writer or each
other) and the lookup SQL is one constant string per set, so sqlite3's statement cache reuses the
prepared statement. The lookup joins the set's row in ``feature_sets``, so the set version, TTL and
dtype used to decode a row always belong to the same committed state: metadata is cached in process
and reloaded when the joined ``apply_id`` differs (an AUTOINCREMENT id, never reused, so even a set
deleted and re-applied under the same version number is noticed). ``get_many`` reads all its
entities in one read transaction (one WAL snapshot), so it never mixes two versions of a set.

**TTL.** Enforced at read time: a row whose ``now - event_ts > ttl_s`` comes back with
``expired=True`` (``get``), or raises ``FeatureExpired`` when the set's ``stale_policy`` is
``reject`` (``lookup``, what a join uses). An unknown entity is ``None`` / ``FeatureNotFound``; an
unknown set raises ``FeatureSetNotFound``.

**Writes.** ``apply`` runs one ``BEGIN IMMEDIATE`` transaction per bundle: ``plan`` (version
newer, delta base), then the rows and the size bound (``writer``), all committed together.
Readers keep seeing the previous version until the commit; a ``kill -9`` at any moment leaves the
previous version complete (the uncommitted WAL frames are ignored on reopen).

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

import json
import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge_agent.errors import FeatureCacheError, FeatureExpired, FeatureNotFound, FeatureSetNotFound
from edge_agent.features import schema
from edge_agent.features.plan import ApplyPlan, plan
from edge_agent.features.records import ApplyResult, FeatureRow, SetInfo, SetMeta, check_text, set_info_from_row
from edge_agent.features.schema import transaction
from edge_agent.features.writer import Bounds, other_usage, write_rows
from edge_agent.wire.bundle import DTYPES, Bundle, BundleInfo, read_bundle
from edge_agent.wire.names import check_segment

__all__ = ["DB_FILE", "FeatureCache"]

log = logging.getLogger(__name__)

DB_FILE = "features.db"
SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")


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
        self._readers: weakref.WeakSet[schema.ReaderHandle] = weakref.WeakSet()
        self._readers_lock = threading.Lock()
        self._wlock = threading.Lock()
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = self._connect()
            _make_private(self.path)
        except sqlite3.Error as exc:
            raise FeatureCacheError(f"cannot open feature cache {self.path}: {exc}") from exc
        try:
            self._writer.execute(f"PRAGMA synchronous={sync}")
            self._writer.execute("PRAGMA journal_size_limit=67108864")  # truncate a big WAL after checkpoints
            schema.migrate(self._writer, self.path)
        except BaseException as exc:
            self._writer.close()
            if isinstance(exc, sqlite3.Error):
                raise FeatureCacheError(f"cannot open feature cache {self.path}: {exc}") from exc
            raise

    # -- connections ----------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        return schema.connect(self.path, busy_s=self._busy_s, mmap_size=self._mmap_size, cache_kib=self._cache_kib)

    def _conn(self) -> sqlite3.Connection:
        """This thread's read connection, opened on first use."""
        try:
            conn: sqlite3.Connection = self._local.conn
        except AttributeError:
            conn = self._reader()
        return conn

    def _reader(self) -> sqlite3.Connection:
        if self._closed:
            raise FeatureCacheError("the feature cache is closed")
        try:
            conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
        except sqlite3.Error as exc:
            raise FeatureCacheError(f"cannot open feature cache {self.path}: {exc}") from exc
        holder = schema.ReaderHandle(conn)
        self._local.reader = holder
        self._local.conn = conn
        with self._readers_lock:
            self._readers.add(holder)
        return conn

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
            return schema.schema_version(self._writer)

    # -- reading --------------------------------------------------------------------
    def get(self, set: str, entity: str, *, now: float | None = None) -> FeatureRow | None:
        """The entity's row (``expired`` flags a TTL miss), or None when the set has no such entity.

        Raises FeatureSetNotFound for an unknown set. The hot path: one prepared primary-key probe
        joined with the set's metadata row, in the calling thread's own connection.
        """
        meta = self._meta.get(set)
        if meta is None:
            return self._get_consistent(set, entity, now)
        check_text(entity, "entity id")
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
        return FeatureRow.decode(entity, row, meta, self._clock() if now is None else now)

    def _get_consistent(self, set: str, entity: str, now: float | None) -> FeatureRow | None:
        """Slow path: (re)load the set's metadata and read the row in one read transaction."""
        rows = self.get_many(set, (entity,), now=now)
        return rows[0]

    def get_many(self, set: str, entities: Sequence[str], *, now: float | None = None) -> list[FeatureRow | None]:
        """Rows for several entities (None where unknown), all read from one committed version of the set."""
        check_text(set, "feature set name")
        for entity in entities:
            check_text(entity, "entity id")
        conn = self._conn()
        t = self._clock() if now is None else now
        try:
            conn.execute("BEGIN")
            try:
                meta = self._load_meta(conn, set)
                ex, sql, decode = conn.execute, meta.plain_sql, FeatureRow.decode
                out: list[FeatureRow | None] = []
                for entity in entities:
                    row = ex(sql, (entity,)).fetchone()
                    out.append(None if row is None else decode(entity, row, meta, t))
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
        raw = conn.execute(schema.META_SQL, (set,)).fetchone()
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
            schema.JOIN_SQL.format(schema.table(set)),
            schema.PLAIN_SQL.format(schema.table(set)),
        )
        self._meta[set] = meta
        return meta

    def list_sets(self, *, now: float | None = None) -> list[SetInfo]:
        """Every set with its version, size and freshness, by name."""
        t = self._clock() if now is None else now
        conn = self._conn()
        try:
            raw = conn.execute(f"SELECT {schema.SETS_COLUMNS} FROM feature_sets ORDER BY name").fetchall()
        except sqlite3.Error as exc:
            raise FeatureCacheError(f"cannot read {self.path}: {exc}") from exc
        return [set_info_from_row(r, t) for r in raw]

    def set_info(self, set: str, *, now: float | None = None) -> SetInfo | None:
        return next((s for s in self.list_sets(now=now) if s.name == set), None)

    def version(self, set: str) -> str | None:
        """The set's current version (None: not cached) — what the OTA layer compares releases with."""
        info = self.set_info(set)
        return info.version if info else None

    def history(self, set: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """The latest applies, newest first: id, set, version, kind, bundle id, rows, upserted, deleted, applied_at."""
        conn = self._conn()
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
        return [dict(zip(keys, r, strict=True)) for r in cur.fetchall()]

    # -- writing --------------------------------------------------------------------
    def plan(self, info: BundleInfo, *, allow_downgrade: bool) -> ApplyPlan:
        """Dry-run ``apply``'s admission against the cache as it is now (the OTA layer validates with it).

        Raises what ``apply`` would for the version, the delta base and the row bound of a snapshot;
        a delta's exact size and the byte bound are only known while applying.
        """
        sets = self.list_sets()
        current = next((s for s in sets if s.name == info.set), None)
        others = sum(s.rows for s in sets if s.name != info.set)
        return plan(current, info, allow_downgrade=allow_downgrade, other_rows=others, max_rows=self.max_rows)

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
            try:
                result = self._apply_locked(self._writer, bundle, allow_downgrade)
            except sqlite3.Error as exc:
                raise FeatureCacheError(f"bundle {info.id}: cannot apply to {self.path}: {exc}") from exc
        result = replace(result, seconds=time.perf_counter() - started)
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

    def _apply_locked(self, conn: sqlite3.Connection, bundle: Bundle, allow_downgrade: bool) -> ApplyResult:
        """Plan and write inside one write transaction (a no-op commits nothing)."""
        info = bundle.info
        with transaction(conn):
            cur = conn.execute(f"SELECT {schema.SETS_COLUMNS} FROM feature_sets WHERE name = ?", (info.set,)).fetchone()
            current = set_info_from_row(cur, 0.0) if cur else None
            others, _ = other_usage(conn, info.set)
            decided = plan(current, info, allow_downgrade=allow_downgrade, other_rows=others, max_rows=self.max_rows)
            if decided.noop and current is not None:
                return ApplyResult(
                    info.id, info.set, info.version, current.version, info.kind, current.rows, current.bytes,
                    0, 0, True, 0.0,
                )  # fmt: skip
            return write_rows(conn, bundle, decided, Bounds(self.max_rows, self.max_bytes), self._clock())

    def delete_set(self, set: str) -> bool:
        """Drop a set and its rows in one transaction; False when there was no such set."""
        check_segment(set, "feature set name")
        with self._wlock:
            try:
                with transaction(self._writer):
                    existed = self._writer.execute("DELETE FROM feature_sets WHERE name = ?", (set,)).rowcount > 0
                    self._writer.execute(f"DROP TABLE IF EXISTS {schema.table(set)}")
            except sqlite3.Error as exc:
                raise FeatureCacheError(f"cannot delete feature set {set!r} from {self.path}: {exc}") from exc
        self._meta.pop(set, None)
        if existed:
            log.info("features %s: deleted", set)
        return existed


def _make_private(path: Path) -> None:
    """0600 for the database file (SQLite creates its -wal and -shm files with the same mode)."""
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except FileNotFoundError:  # created lazily by the first statement: touch it first
        path.touch(mode=0o600)
