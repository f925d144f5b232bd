"""The telemetry store: a Hive-partitioned Parquet dataset plus the ledger that makes it exactly-once.

Layout (docs/telemetry.md, "Store")::

    <store>/kind=prediction/date=2026-12-01/part-000000000042-0.parquet   visible, committed data
    <store>/kind=.../date=.../.part-000000000043-0.parquet.pending        written, not yet committed
    <store>/_ledger.sqlite                                                the commit point (ledger.py)
    <store>/_ingest.lock                                                  one writer at a time

One commit (``commit``) takes a group of MQTT messages and, in this order:

1. decodes them (``edge_agent.wire.telemetry.decode_batch``), counts every refused message or record;
2. drops every record whose ``(device_id, seq)`` a ledger range already covers (redelivery, re-send);
3. writes each (kind, date) part as a hidden ``.pending`` file: temp, fsync, rename, fsync dir;
4. commits the ledger (new ranges + the commit's file list) in one SQLite transaction;
5. renames the pending files to their visible names and fsyncs their directories.

Only then may the caller ack the MQTT messages and publish the devices' acks. ``kill -9`` before
step 4 leaves pending files that ``reconcile`` deletes on the next open (the broker redelivers the
unacked messages); after step 4, ``reconcile`` finishes step 5. So a reader never sees a row
twice and a device is never acked for a row that is not durable.

``EDGEFLEET_INGEST_KILL_AT=<point>[:<n>]`` kills the process (SIGKILL) at ``point`` of the
``n``-th commit (default 1): ``before_ledger``, ``after_ledger``, ``after_write`` (here) and
``after_mqtt_ack`` (the consumer). A crash point for tests, not a mock.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cloud_batch.errors import StoreError
from cloud_batch.ingest.ledger import Ledger, Pending, add_range, covers
from edge_agent.errors import TelemetryRejected
from edge_agent.fsutil import fsync_dir
from edge_agent.wire.telemetry import TelemetryBatch, decode_batch
from edge_agent.wire.topics import parse_telemetry_topic

LEDGER_FILE = "_ledger.sqlite"
LOCK_FILE = "_ingest.lock"
PENDING_SUFFIX = ".pending"
KILL_ENV = "EDGEFLEET_INGEST_KILL_AT"
SCHEMA = pa.schema(
    [
        ("device_id", pa.string()),
        ("seq", pa.int64()),
        ("ts", pa.float64()),
        ("fleet", pa.string()),
        ("model", pa.string()),
        ("version", pa.string()),
        ("request_id", pa.string()),
        ("body", pa.string()),
        ("commit_no", pa.int64()),
    ]
)
_COMMITS = {"n": 0}
_BODY_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # built once, not per row


def crash_point(point: str) -> None:
    """SIGKILL this process if ``EDGEFLEET_INGEST_KILL_AT`` names ``point`` (and this is the chosen commit)."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name == point and _COMMITS["n"] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class CommitResult:
    """What one commit did: rows stored, duplicates skipped, rejections, and the acks to publish."""

    commit_no: int
    rows: int = 0
    duplicates: int = 0
    rejected: int = 0
    acks: dict[tuple[str, str], int] = field(default_factory=dict)  # (fleet, device) -> highest contiguous seq
    reasons: list[str] = field(default_factory=list)


class _Parts:
    """Column lists per (kind, date) partition for one commit."""

    def __init__(self, commit_no: int) -> None:
        self.commit_no = commit_no
        self.parts: dict[tuple[str, str], dict[str, list[Any]]] = {}
        self._days: dict[int, str] = {}

    def add(self, batch: TelemetryBatch, rec: Any) -> None:
        day = int(rec.ts // 86400)
        date = self._days.get(day)
        if date is None:
            date = self._days[day] = time.strftime("%Y-%m-%d", time.gmtime(day * 86400))
        cols = self.parts.get((rec.kind, date))
        if cols is None:
            cols = self.parts[(rec.kind, date)] = {name: [] for name in SCHEMA.names}
        body = rec.body
        cols["device_id"].append(batch.device_id)
        cols["seq"].append(rec.seq)
        cols["ts"].append(rec.ts)
        cols["fleet"].append(batch.fleet)
        cols["model"].append(_text(body.get("model")))
        cols["version"].append(_text(body.get("version")))
        cols["request_id"].append(_text(body.get("request_id")))
        cols["body"].append(_BODY_JSON(body))
        cols["commit_no"].append(self.commit_no)

    def tables(self) -> Iterator[tuple[str, pa.Table]]:
        for i, ((kind, date), cols) in enumerate(sorted(self.parts.items())):
            rel = f"kind={kind}/date={date}/part-{self.commit_no:012d}-{i}.parquet"
            yield rel, pa.Table.from_pydict(cols, schema=SCHEMA)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _pending(path: Path) -> Path:
    return path.with_name(f".{path.name}{PENDING_SUFFIX}")


class TelemetryStore:
    """The store at ``root`` (created if missing), opened for one writer; reconciled on open."""

    def __init__(self, root: str | os.PathLike[str], fleet: str | None = None) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store {self.root} is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        self.fleet = fleet
        self._lock = open(self.root / LOCK_FILE, "a+")  # noqa: SIM115 (held open for the store's lifetime)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock.close()
            raise StoreError(f"store {self.root} is in use by another ingest ({LOCK_FILE} is locked)") from exc
        self.ledger = Ledger(self.root / LEDGER_FILE)
        self.reconcile()

    def close(self) -> None:
        self.ledger.close()
        self._lock.close()  # releases the flock

    def __enter__(self) -> TelemetryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- recovery ----------------------------------------------------------------
    def reconcile(self) -> tuple[int, int]:
        """Finish committed renames, delete uncommitted pending files: ``(finished, deleted)``."""
        committed = set(self.ledger.committed_files(0))
        finished = deleted = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if not name.endswith(PENDING_SUFFIX) or not name.startswith("."):
                    continue
                path = Path(dirpath) / name
                final = path.with_name(name[1 : -len(PENDING_SUFFIX)])
                if str(final.relative_to(self.root)) in committed:
                    os.replace(path, final)
                    finished += 1
                else:
                    path.unlink()
                    deleted += 1
                fsync_dir(dirpath)
        return finished, deleted

    # -- one commit --------------------------------------------------------------
    def commit(self, messages: Iterable[tuple[str, bytes]]) -> CommitResult:
        """Store a group of ``(topic, payload)`` messages exactly once (see the module docstring)."""
        _COMMITS["n"] += 1
        commit_no = self.ledger.last_commit + 1
        result, pending, parts = CommitResult(commit_no), Pending(), _Parts(commit_no)
        for topic, payload in messages:
            batch = self._decode(topic, payload, pending, result)
            if batch is not None:
                self._stage(batch, pending, parts, result)
        files = self._write_pending(parts)
        crash_point("before_ledger")
        self.ledger.commit(pending, commit_no, result.rows, [rel for rel, _ in files])
        crash_point("after_ledger")
        for rel, path in files:
            os.replace(path, self.root / rel)
        for d in {(self.root / rel).parent for rel, _ in files}:
            fsync_dir(d)
        crash_point("after_write")
        result.acks = {(e.fleet, d): e.acked for d, e in pending.devices.items()}
        return result

    def _reject(self, pending: Pending, result: CommitResult, device: str | None, seq: int | None, why: str) -> None:
        result.rejected += 1
        result.reasons.append(why)
        pending.rejections.append((time.time(), device, seq, why))

    def _decode(self, topic: str, payload: bytes, pending: Pending, result: CommitResult) -> TelemetryBatch | None:
        where = parse_telemetry_topic(topic)
        device = where[1] if where else None
        try:
            batch = decode_batch(payload)
        except TelemetryRejected as exc:
            self._reject(pending, result, device, None, f"{topic}: {exc}")
            return None
        if where is None or (batch.fleet, batch.device_id) != where or (self.fleet and batch.fleet != self.fleet):
            self._reject(pending, result, device, None, f"{topic}: batch of {batch.fleet}/{batch.device_id} here")
            return None
        return batch

    def _stage(self, batch: TelemetryBatch, pending: Pending, parts: _Parts, result: CommitResult) -> None:
        entry = self.ledger.entry(pending, batch.device_id, batch.fleet)
        for seq, why in batch.rejects:
            self._reject(pending, result, batch.device_id, seq, why)
            entry.rejected += 1
        ranges = entry.ranges
        for rec in batch.records:
            if covers(ranges, rec.seq):
                result.duplicates += 1
                continue
            parts.add(batch, rec)
            result.rows += 1
            entry.rows += 1
            entry.last_ts = max(entry.last_ts, rec.ts)
        add_range(ranges, batch.first_seq, batch.last_seq)
        for kind, n in batch.dropped.items():  # cumulative on the device: keep the highest seen
            entry.dropped[kind] = max(entry.dropped.get(kind, 0), n)

    def _write_pending(self, parts: _Parts) -> list[tuple[str, Path]]:
        out = []
        for rel, table in parts.tables():
            path = _pending(self.root / rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as fh:
                pq.write_table(table, fh, compression="zstd")
                fh.flush()
                os.fsync(fh.fileno())
            out.append((rel, path))
        for d in {p.parent for _, p in out}:
            fsync_dir(d)
        return out
