"""The ingest ledger: per device, which seqs are durably in the store. Exactly-once hangs on it.

One SQLite file, ``<store>/_ledger.sqlite`` (WAL, ``synchronous=FULL``), is the store's commit
point: a commit's Parquet files become part of the store in the same transaction that records
the seq ranges they hold. Tables::

    devices(device_id PK, fleet, acked, rows, rejected, dropped JSON, last_ts)
        acked: highest seq N with 1..N all covered (what ingest acks to the device)
    ranges(device_id, lo, hi)      covered seq ranges, merged; a batch covers first_seq..last_seq
                                   (records missing inside it were dropped by the device or rejected)
    commits(commit_no PK, ts, rows, files JSON)
    rejections(ts, device_id, seq, reason)   every refused message or record, with the reason

A seq is stored at most once: ingest keeps a record only if no range covers it. Ranges above
``acked`` with holes between them are the *gaps* ``data summary`` reports.
"""

from __future__ import annotations

import bisect
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_batch.errors import StoreError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices(device_id TEXT PRIMARY KEY, fleet TEXT NOT NULL, acked INTEGER NOT NULL,
    rows INTEGER NOT NULL, rejected INTEGER NOT NULL, dropped TEXT NOT NULL, last_ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS ranges(device_id TEXT NOT NULL, lo INTEGER NOT NULL, hi INTEGER NOT NULL,
    PRIMARY KEY(device_id, lo));
CREATE TABLE IF NOT EXISTS commits(commit_no INTEGER PRIMARY KEY, ts REAL NOT NULL, rows INTEGER NOT NULL,
    files TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rejections(ts REAL NOT NULL, device_id TEXT, seq INTEGER, reason TEXT NOT NULL);
"""


def add_range(ranges: list[list[int]], lo: int, hi: int) -> None:
    """Insert ``[lo, hi]`` into sorted, merged ``ranges`` (in place), merging overlaps and neighbours."""
    i = bisect.bisect_left(ranges, [lo, lo])
    if i > 0 and ranges[i - 1][1] >= lo - 1:
        i -= 1
    j = i
    while j < len(ranges) and ranges[j][0] <= hi + 1:
        lo, hi = min(lo, ranges[j][0]), max(hi, ranges[j][1])
        j += 1
    ranges[i:j] = [[lo, hi]]


def covers(ranges: list[list[int]], seq: int) -> bool:
    """Whether a range of sorted, merged ``ranges`` holds ``seq``."""
    i = bisect.bisect_right(ranges, [seq, float("inf")]) - 1
    return i >= 0 and ranges[i][0] <= seq <= ranges[i][1]


def contiguous(ranges: list[list[int]]) -> int:
    """The highest N with 1..N covered (0 when seq 1 is not)."""
    return ranges[0][1] if ranges and ranges[0][0] <= 1 else 0


def gaps(ranges: list[list[int]]) -> list[tuple[int, int]]:
    """The seq ranges never received between 1 and the highest covered seq."""
    out, prev = [], 0
    for lo, hi in ranges:
        if lo > prev + 1:
            out.append((prev + 1, lo - 1))
        prev = hi
    return out


@dataclass
class DeviceEntry:
    """One device's ledger row, plus its covered ranges."""

    fleet: str
    ranges: list[list[int]] = field(default_factory=list)
    rows: int = 0
    rejected: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    last_ts: float = 0.0

    @property
    def acked(self) -> int:
        return contiguous(self.ranges)

    def copy(self) -> DeviceEntry:
        return DeviceEntry(
            self.fleet, [list(r) for r in self.ranges], self.rows, self.rejected, dict(self.dropped), self.last_ts
        )


@dataclass
class Pending:
    """Ledger changes of one commit, applied to memory only once SQLite has them."""

    devices: dict[str, DeviceEntry] = field(default_factory=dict)
    rejections: list[tuple[float, str | None, int | None, str]] = field(default_factory=list)


class Ledger:
    """The SQLite ledger and its in-memory copy (loaded once; every lookup is served from memory)."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        """Open (and create) the ledger; ``readonly`` for readers beside a running ingest (no lock, no writes)."""
        if readonly and not path.is_file():
            raise StoreError(f"{path.parent} is not a telemetry store (no {path.name}); run `cloud-batch ingest` first")
        try:
            if readonly:
                self.db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
            else:
                self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.executescript(_SCHEMA)
            self.devices = self._load()
            row = self.db.execute("SELECT COALESCE(MAX(commit_no), 0) FROM commits").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"ledger {path} is not readable: {exc}") from exc
        self.last_commit = int(row[0])

    def _load(self) -> dict[str, DeviceEntry]:
        out = {
            d: DeviceEntry(fleet, [], rows, rej, json.loads(dropped), last_ts)
            for d, fleet, rows, rej, dropped, last_ts in self.db.execute(
                "SELECT device_id, fleet, rows, rejected, dropped, last_ts FROM devices"
            )
        }
        for d, lo, hi in self.db.execute("SELECT device_id, lo, hi FROM ranges ORDER BY device_id, lo"):
            out[d].ranges.append([lo, hi])
        return out

    def entry(self, pending: Pending, device_id: str, fleet: str) -> DeviceEntry:
        """The device's entry as this commit will leave it (a copy, staged in ``pending``)."""
        staged = pending.devices.get(device_id)
        if staged is None:
            base = self.devices.get(device_id)
            staged = base.copy() if base is not None else DeviceEntry(fleet)
            pending.devices[device_id] = staged
        return staged

    def commit(self, pending: Pending, commit_no: int, rows: int, files: list[str]) -> None:
        """Record the commit and its devices' new ranges in one transaction, then adopt them in memory."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT INTO commits(commit_no, ts, rows, files) VALUES (?, ?, ?, ?)",
                (commit_no, time.time(), rows, json.dumps(files)),
            )
            for device_id, e in pending.devices.items():
                db.execute(
                    "INSERT OR REPLACE INTO devices VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (device_id, e.fleet, e.acked, e.rows, e.rejected, json.dumps(e.dropped), e.last_ts),
                )
                db.execute("DELETE FROM ranges WHERE device_id = ?", (device_id,))
                db.executemany("INSERT INTO ranges VALUES (?, ?, ?)", [(device_id, lo, hi) for lo, hi in e.ranges])
            db.executemany("INSERT INTO rejections VALUES (?, ?, ?, ?)", pending.rejections)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.devices.update(pending.devices)
        self.last_commit = commit_no

    def committed_files(self, after: int = 0) -> list[str]:
        """The files of every commit numbered above ``after`` (store-relative paths)."""
        out: list[str] = []
        for (files,) in self.db.execute("SELECT files FROM commits WHERE commit_no > ? ORDER BY commit_no", (after,)):
            out.extend(json.loads(files))
        return out

    def rejections(self) -> list[dict[str, Any]]:
        """Every recorded rejection, oldest first."""
        rows = self.db.execute("SELECT ts, device_id, seq, reason FROM rejections ORDER BY rowid")
        return [{"ts": ts, "device_id": d, "seq": s, "reason": r} for ts, d, s, r in rows]

    def close(self) -> None:
        self.db.close()
