"""The telemetry outbox: one SQLite file (WAL, 0600) of records waiting for the cloud's ack.

``<data-dir>/telemetry.db``, separate from the feature cache::

    records(seq INTEGER PRIMARY KEY AUTOINCREMENT, kind, ts, model, has_inputs, n, size, request_id, body)
    labels(request_id PRIMARY KEY, model, seq)      inference ids that have a feedback label (409 rule)
    meta(key PRIMARY KEY, value)                    acked_seq, dropped:<kind>

A row is one record, or a pack of ``n`` predictions (kind ``predictions``, ``wire.telemetry.pack``) whose
``seq`` is its last record's: it holds ``seq - n + 1 .. seq``, ``request_id`` is the JSON list of its ids
and ``has_inputs`` the number of its sampled inputs. Each append numbers its rows after the highest seq
ever used (``sqlite_sequence``, AUTOINCREMENT's counter), so a seq never repeats, even after every row
was acked and deleted. Counts (``max_rows``, the stats, the drops) are of records, not rows.
Rows leave only two ways: :meth:`Outbox.ack` (the ingest stored them) or the bound (counted).

The bound (``max_rows``, ``max_bytes``, and per-model :class:`~edge_agent.telemetry.bound.Quota`),
applied after every append in the drop order of ``telemetry.bound``: the oldest sampled inputs,
then the oldest predictions, then drift, events and feedback only at the hard cap.

Every drop is added to ``meta`` in the same transaction (``dropped:<kind>``) and reported in each
telemetry batch and in ``edgefleet_outbox_dropped_total{kind}``.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from edge_agent.errors import OutboxError
from edge_agent.telemetry.bound import PROTECTED, Quota, Usage, drop_kind, shed
from edge_agent.telemetry.packids import PackIds

DB_FILE = "telemetry.db"
__all__ = ["DB_FILE", "PROTECTED", "Outbox", "OutboxStats", "Quota", "Row"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, ts REAL NOT NULL, model TEXT,
    has_inputs INTEGER NOT NULL DEFAULT 0, n INTEGER NOT NULL DEFAULT 1, size INTEGER NOT NULL,
    request_id TEXT, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS records_request ON records(request_id) WHERE request_id IS NOT NULL AND n = 1;
CREATE INDEX IF NOT EXISTS records_sampled ON records(seq) WHERE has_inputs > 0;
CREATE TABLE IF NOT EXISTS labels (request_id TEXT PRIMARY KEY, model TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
# Plain ``?`` placeholders (numbered ones with a sequence are deprecated in 3.12, an error in 3.14); ``size`` is
# the body's length in characters, SQLite's length() of TEXT, computed in Python: ``len(str)`` is O(1).
_INSERT = "INSERT INTO records(seq, kind, ts, body, model, request_id, has_inputs, n, size) VALUES (?,?,?,?,?,?,?,?,?)"
# Small columns come before the ids and the body: SQLite reads a row's columns in order, and a pack's
# ids and body spill into overflow pages, which a scan for ``n`` or ``size`` would otherwise walk.
# Outboxes made before packs are rebuilt in that order (seqs and sqlite_sequence are kept).
_MIGRATE = """
ALTER TABLE records RENAME TO records_old;
DROP INDEX IF EXISTS records_inputs;
DROP INDEX IF EXISTS records_request;
{schema};
INSERT INTO sqlite_sequence(name, seq) SELECT 'records', seq FROM sqlite_sequence WHERE name = 'records_old';
INSERT INTO records(seq, kind, ts, model, has_inputs, n, size, request_id, body)
    SELECT seq, kind, ts, model, has_inputs, 1, size, request_id, body FROM records_old;
DROP TABLE records_old
""".replace("{schema}", _SCHEMA.strip().rstrip(";"))
# Rows go in multi-row statements of CHUNK rows and, for the rest, of 128, 64, ..., 1 rows: few statements
# per flush (SQLite updates sqlite_sequence once per statement, ~1.5-2 µs of CPU per row less than one
# statement per row; and each statement's step releases the GIL, a hand-off to the event loop and back in the
# agent, docs/benchmarks.md "GIL hand-offs"), from a fixed set of cached statement texts. SQLite before
# 3.32 allows 999 parameters per statement (9 per row), later versions 32,766.
CHUNK = 256 if sqlite3.sqlite_version_info >= (3, 32, 0) else 64
SIZES = tuple(1 << i for i in range(CHUNK.bit_length() - 1, -1, -1))
_WIDTH = 9  # values bound per row: seq, the Row's seven fields, size
_SET_META = "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value"
MAX_LABELS = 200_000  # label ids remembered for the 409 rule (oldest forgotten first)


class Row(NamedTuple):
    """A record (or a pack of ``n``) about to be appended; ``body`` is its JSON text (bound to the INSERT as it is).

    ``has_inputs``: how many sampled inputs it carries (a bool for one record).
    """

    kind: str
    ts: float
    body: str
    model: str | None = None
    request_id: str | None = None
    has_inputs: int = 0
    n: int = 1


@dataclass(frozen=True)
class OutboxStats:
    rows: int
    bytes: int
    acked_seq: int
    last_seq: int
    dropped: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "bytes": self.bytes,
            "acked_seq": self.acked_seq,
            "last_seq": self.last_seq,
            "dropped": self.dropped,
        }


def _insert(db: sqlite3.Connection, rows: list[Row]) -> int:
    """INSERT ``rows`` in order, numbered after the highest seq used so far; returns the last seq.

    ``size`` is the body's length (``len(str)`` is O(1)). Statements of CHUNK rows, then of the SIZES
    that make up the rest (at most one of each).
    """
    found = db.execute("SELECT seq FROM sqlite_sequence WHERE name='records'").fetchone()
    seq = int(found[0]) if found else 0
    values: list[Any] = []
    for row in rows:
        seq += row.n
        values += (seq, *row, len(row.body))
    start, n, width = 0, len(rows), _WIDTH
    for size in SIZES:
        while n - start >= size:
            db.execute(_insert_sql(size), values[start * width : (start + size) * width])
            start += size
    return seq


def _migrate(db: sqlite3.Connection) -> None:
    """Rebuild an outbox made before packs, once: checked and done in one write transaction, so an agent and
    a CLI opening it together cannot both do it."""
    db.execute("BEGIN IMMEDIATE")
    try:
        columns = {row[1] for row in db.execute("SELECT * FROM pragma_table_info('records')")}
        if columns and "n" not in columns:
            for statement in _MIGRATE.split(";"):
                db.execute(statement)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


@functools.cache
def _insert_sql(n: int) -> str:
    """The INSERT of ``n`` rows (sqlite3 keeps each text's prepared statement in its cache)."""
    return _INSERT.replace("(?,?,?,?,?,?,?,?,?)", ",".join(["(?,?,?,?,?,?,?,?,?)"] * n))


class Outbox:
    """Thread-safe SQLite outbox; every method is one transaction."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_rows: int | None = None,
        max_bytes: int | None = None,
        on_drop: Callable[[str, int], None] | None = None,
        quotas: Mapping[str, Quota] | None = None,
    ) -> None:
        self.path = Path(path)
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self.quotas = dict(quotas or {})
        self.on_drop = on_drop
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout=5000")  # the CLI may write while the agent runs
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a feedback commit survives power loss
            _migrate(self._db)
            self._db.executescript(_SCHEMA)
            self._pack_ids = PackIds()
            self.usage = Usage(self._db, self.quotas)
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"telemetry outbox {self.path} cannot be opened: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writing ------------------------------------------------------------------------
    def append(
        self,
        rows: list[Row],
        labels: list[tuple[str, str]] | None = None,
        *,
        token: int | None = None,
        drops: Mapping[str, int] | None = None,
    ) -> int:
        """Insert ``rows`` (and ``(request_id, model)`` label marks) in one transaction, then apply the bound.

        ``drops``: records lost before the outbox (a full queue, ``max_bps``), counted in the same
        transaction. ``token``: stored as ``meta.writer_token`` with the rows, so a writer process that
        died mid-call can be asked whether this call committed (``telemetry.writer.remote``).
        Returns the seq of the last row (0 when ``rows`` is empty: then only ``drops`` are counted).
        """
        if not rows:
            for kind, n in (drops or {}).items():
                self.count_drop(kind, n)
            return 0
        with self._lock:
            try:
                db = self._db
                db.execute("BEGIN IMMEDIATE")
                last = _insert(db, rows)
                for request_id, model in labels or ():
                    db.execute(
                        "INSERT INTO labels(request_id, model, seq) VALUES (?,?,?) "
                        "ON CONFLICT(request_id) DO UPDATE SET seq=excluded.seq",
                        (request_id, model, last),
                    )
                if self.usage.per:
                    for r in rows:
                        self.usage.add(r.model, r.n, len(r.body))
                else:
                    self.usage.add(None, sum(r.n for r in rows), sum(len(r.body) for r in rows))
                drops = self._bound(drops)
                if token is not None:
                    db.execute(_SET_META, ("writer_token", token))
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxError(f"telemetry outbox write failed: {exc}") from exc
        self._report(drops)
        return last

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        self.usage.recount(self._db)

    def _bound(self, before: Mapping[str, int] | None = None) -> dict[str, int]:
        """Shed per-model quotas, then the device-wide bound, inside the caller's transaction; drops by kind.

        ``before``: drops that happened before the outbox, counted with the bound's.
        """
        drops: dict[str, int] = {k: n for k, n in (before or {}).items() if n}
        scopes: list[tuple[Quota, str | None]] = [(q, m) for m, q in self.quotas.items()]
        for quota, model in [*scopes, (Quota(self.max_rows, self.max_bytes), None)]:
            if quota.over(*self.usage.of(model)):
                for kind, n in shed(self._db, self.usage, quota, model).items():
                    drops[kind] = drops.get(kind, 0) + n
        for kind, n in drops.items():
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
                (f"dropped:{kind}", n),
            )
        return drops

    def _report(self, drops: dict[str, int]) -> None:
        if self.on_drop is not None:
            for kind, n in drops.items():
                self.on_drop(kind, n)

    def count_drop(self, kind: str, n: int) -> None:
        """Count records lost before they reached the outbox (the in-memory queue was full)."""
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO meta(key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
                    (f"dropped:{kind}", n),
                )
            except sqlite3.Error as exc:
                raise OutboxError(f"telemetry outbox write failed: {exc}") from exc
        self._report({kind: n})

    def ack(self, acked_seq: int) -> int:
        """Delete every row up to ``acked_seq`` (ingest stored them) and remember the ack; rows deleted."""
        with self._lock:
            try:
                db = self._db
                db.execute("BEGIN IMMEDIATE")
                if acked_seq <= self._meta("acked_seq"):
                    db.execute("COMMIT")
                    return 0
                gone = db.execute(
                    "SELECT model, SUM(n), COALESCE(SUM(size), 0) FROM records WHERE seq <= ? GROUP BY model",
                    (acked_seq,),
                ).fetchall()
                db.execute("DELETE FROM records WHERE seq <= ?", (acked_seq,))
                db.execute(
                    "INSERT INTO meta(key, value) VALUES ('acked_seq', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    (acked_seq,),
                )
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise OutboxError(f"telemetry outbox ack failed: {exc}") from exc
            for model, n, size in gone:
                self.usage.add(model, -n, -size)
            return sum(int(n) for _, n, _ in gone)

    # -- reading ------------------------------------------------------------------------
    def read_after(self, seq: int, limit_bytes: int, limit_rows: int = 10_000) -> list[tuple[int, str, float, str]]:
        """Rows ``(seq, kind, ts, body)`` after ``seq`` in order, up to about ``limit_bytes`` of body (at least one)."""
        out: list[tuple[int, str, float, str]] = []
        total = 0
        with self._lock:
            try:
                cur = self._db.execute(
                    "SELECT seq, kind, ts, body FROM records WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit_rows)
                )
                for row in cur:
                    if out and total + len(row[3]) > limit_bytes:
                        break
                    out.append(row)
                    total += len(row[3])
            except sqlite3.Error as exc:
                raise OutboxError(f"telemetry outbox read failed: {exc}") from exc
        return out

    def delete(self, seq: int, kind: str) -> None:
        """Drop one row that can never be sent (larger than a batch); counted like any other drop."""
        with self._lock:
            try:
                row = self._db.execute("SELECT size, model, n FROM records WHERE seq=?", (seq,)).fetchone()
                if row is None:
                    return
                self._db.execute("DELETE FROM records WHERE seq=?", (seq,))
                self.usage.add(row[1], -row[2], -row[0])
            except sqlite3.Error as exc:
                raise OutboxError(f"telemetry outbox write failed: {exc}") from exc
        self.count_drop(drop_kind(kind), row[2])

    def find_prediction(self, request_id: str) -> str | None:
        """The model of the prediction ``request_id`` if it is still in the outbox (a record of its own or in a pack).

        Packs are found through ``packids.PackIds`` (hashes of their ids, in memory) and confirmed by
        parsing; the agent asks only for ids its in-memory index no longer has.
        """
        with self._lock:
            row = self._db.execute(
                "SELECT model FROM records WHERE request_id=? AND n = 1 AND kind='prediction' ORDER BY seq DESC LIMIT 1",
                (request_id,),
            ).fetchone()
            return str(row[0]) if row is not None else self._pack_ids.find(self._db, request_id)

    def has_label(self, request_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM labels WHERE request_id=?", (request_id,)).fetchone() is not None

    def forget_old_labels(self) -> None:
        """Keep the label index bounded (MAX_LABELS newest ids)."""
        with self._lock:
            self._db.execute(
                "DELETE FROM labels WHERE seq < (SELECT seq FROM labels ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (MAX_LABELS,),
            )

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return 0 if row is None else int(row[0])

    def acked_seq(self) -> int:
        with self._lock:
            return self._meta("acked_seq")

    def writer_token(self) -> int:
        """The ``token`` of the newest :meth:`append` that carried one (0: none yet)."""
        with self._lock:
            return self._meta("writer_token")

    def dropped(self) -> dict[str, int]:
        """Cumulative drops per kind since the outbox was created."""
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM meta WHERE key LIKE 'dropped:%'").fetchall()
        return {k.split(":", 1)[1]: int(v) for k, v in rows}

    def stats(self) -> OutboxStats:
        with self._lock:
            seq = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='records'").fetchone()
            acked = self._meta("acked_seq")
            rows, size = self.usage.total
        return OutboxStats(rows, size, acked, int(seq[0]) if seq else 0, self.dropped())
