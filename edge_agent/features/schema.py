"""The feature cache's SQLite schema: tables, migrations and the SQL that reads them.

Layout (``<data-dir>/features.db``, WAL mode)::

    _migrations    (id, name, applied_at)                       schema version, managed with sqlite-utils
    feature_sets   (name PK, version, kind, features JSON, dtype, ttl_s, stale_policy, entity_key,
                    partition JSON, rows, bytes, oldest_ts, newest_ts, data_sha256, created_at, applied_at,
                    apply_id)
    apply_log      (id AUTOINCREMENT, set_name, version, kind, bundle_id, rows, upserted, deleted, applied_at)
    "fs_<set id>"  (entity TEXT PK, event_ts REAL, version TEXT, vals BLOB) WITHOUT ROWID

Set names are case-sensitive (``assets`` and ``Assets`` are two sets) but SQLite identifiers are
not, so a set's table id spells each capital as ``^`` + the lower-case letter (``Assets`` →
``fs_^assets``): a unique, case-safe id for every valid name (``^`` is not allowed in names).
Migration 2 renames tables from the old ``fs_<set>`` spelling; sets that collided under it had
shared one table, so their rows are unreliable: they are dropped (logged) and re-fetched by OTA.

One row per entity per set (Feast stores one row per entity per *feature*): ``vals`` is the
entity's features packed little-endian in the set's dtype and feature order, so a lookup is one
primary-key probe and one ``np.frombuffer``. ``version`` is the bundle that last wrote the row.
Migrations are append-only; a file from a newer agent (higher schema version) is refused.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.errors import FeatureCacheError
from edge_agent.features.records import SET_COLUMNS

if TYPE_CHECKING:
    import sqlite_utils

log = logging.getLogger(__name__)

JOIN_SQL = (
    "SELECT r.event_ts, r.version, r.vals, s.apply_id FROM {0} AS r, feature_sets AS s "
    "WHERE s.name = ? AND r.entity = ?"
)  # {0}: table(set)
PLAIN_SQL = "SELECT event_ts, version, vals FROM {0} WHERE entity = ?"
META_SQL = "SELECT apply_id, version, features, dtype, ttl_s, stale_policy, entity_key FROM feature_sets WHERE name = ?"
SETS_COLUMNS = ", ".join(SET_COLUMNS)


def _m001_feature_sets(db: sqlite_utils.Database) -> None:
    db.table("feature_sets").create(
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


def _m002_case_safe_tables(db: sqlite_utils.Database) -> None:
    names = [row[0] for row in db.execute("SELECT name FROM feature_sets")]
    lowered = [n.lower() for n in names]
    for name in names:
        old, new = f'"fs_{name}"', table(name)
        if lowered.count(name.lower()) > 1:
            log.warning("feature set %r shared its table with a set differing only in case: dropped", name)
            db.execute("DELETE FROM feature_sets WHERE name = ?", [name])
            db.execute(f"DROP TABLE IF EXISTS {old}")
        elif old != new:
            db.execute(f"ALTER TABLE {old} RENAME TO {new}")


# Append only; never edit a shipped migration. The position + 1 is the schema version.
MIGRATIONS: tuple[tuple[str, Callable[[sqlite_utils.Database], None]], ...] = (
    ("feature_sets", _m001_feature_sets),
    ("case_safe_tables", _m002_case_safe_tables),
)
SCHEMA_VERSION = len(MIGRATIONS)


def connect(path: Path, *, busy_s: float, mmap_size: int, cache_kib: int) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), shared across threads under a lock."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_s, cached_statements=256)
    conn.execute(f"PRAGMA mmap_size={mmap_size}")
    conn.execute(f"PRAGMA cache_size=-{cache_kib}")
    return conn


class ReaderHandle:
    """A thread's read connection; closed when its thread ends (the thread-local drops it) or on close()."""

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __del__(self) -> None:
        try:
            self.conn.close()
        except Exception:  # interpreter shutdown; nothing useful to do
            pass


def table(name: str) -> str:
    """The quoted, case-safe name of a set's row table (module doc)."""
    return '"fs_' + "".join(f"^{c.lower()}" if "A" <= c <= "Z" else c for c in name) + '"'


def schema_version(conn: sqlite3.Connection) -> int:
    """The highest migration applied to this file (0: a new file)."""
    try:
        return int(conn.execute("SELECT coalesce(max(id), 0) FROM _migrations").fetchone()[0])
    except sqlite3.OperationalError:  # no _migrations table yet: a new file
        return 0


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception (the one write pattern)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the file to ``SCHEMA_VERSION`` and WAL mode; idempotent and cheap when already there."""
    if schema_version(conn) == SCHEMA_VERSION and conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
        return  # the common case: nothing to do, and no sqlite-utils import (it pulls in pandas when present)
    import sqlite_utils

    db = sqlite_utils.Database(conn)
    db.enable_wal()  # idempotent; the journal mode is persistent in the file
    with transaction(conn):
        db.table("_migrations").create({"id": int, "name": str, "applied_at": str}, pk="id", if_not_exists=True)
        done = {row[0] for row in conn.execute("SELECT id FROM _migrations")}
        if done and max(done) > SCHEMA_VERSION:
            raise FeatureCacheError(
                f"{path} has schema version {max(done)}; this agent knows up to {SCHEMA_VERSION} (newer agent?)"
            )
        for i, (name, step) in enumerate(MIGRATIONS, start=1):
            if i not in done:
                step(db)
                db.table("_migrations").insert({"id": i, "name": name, "applied_at": _utcnow()})
                log.info("feature cache %s: applied migration %d (%s)", path, i, name)


def _utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
