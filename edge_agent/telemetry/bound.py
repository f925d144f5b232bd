"""The outbox's bound: the device-wide limit and per-model quotas, shed in one drop order.

A scope is the whole outbox or one model's rows (every kind whose ``model`` is that name). Inside
a scope, while it is over its ``max_rows`` / ``max_bytes``:

1. ``inputs``: the oldest sampled inputs are stripped from their prediction rows (the predictions
   stay, marked ``inputs_dropped``); only while over ``max_bytes``;
2. ``prediction``: the oldest predictions are deleted: whole rows (a pack is up to
   ``wire.telemetry.pack.MAX_PACK`` predictions), and of the last pack that must shrink only its
   oldest ones (``pack.trim`` rewrites it), so no more go than the bound needs;
3. ``drift``, ``event``, ``feedback``: only when nothing else is left to drop and the scope is
   still over (the hard cap), oldest first.

Rows and drops are counted in records: a pack of ``n`` predictions is ``n``.
Model quotas are applied first, then the device-wide bound. :class:`Usage` keeps the counts in
step with every write, so checking the bound costs no query.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from edge_agent.wire.telemetry.pack import PACK_KIND, strip_inputs, trim

PROTECTED = ("drift", "event", "feedback")  # dropped only at the hard cap, in this order


def drop_kind(kind: str) -> str:
    """The kind a dropped row is counted as: a pack's predictions are ``prediction``."""
    return "prediction" if kind == PACK_KIND else kind


@dataclass(frozen=True)
class Quota:
    """A limit on records and bytes of record bodies; None = unbounded."""

    max_rows: int | None = None
    max_bytes: int | None = None

    def over(self, rows: int, size: int) -> bool:
        return (self.max_rows is not None and rows > self.max_rows) or (
            self.max_bytes is not None and size > self.max_bytes
        )


class Usage:
    """Records and body bytes in the outbox, in total and for each model that has a quota."""

    def __init__(self, db: sqlite3.Connection, models: Iterable[str] = ()) -> None:
        self.total = [0, 0]
        self.per: dict[str, list[int]] = {m: [0, 0] for m in models}
        self.recount(db)

    def recount(self, db: sqlite3.Connection) -> None:
        self.total = [0, 0]
        for counts in self.per.values():
            counts[:] = [0, 0]
        for model, rows, size in db.execute("SELECT model, SUM(n), COALESCE(SUM(size), 0) FROM records GROUP BY model"):
            self.add(model, rows, size)

    def add(self, model: str | None, rows: int, size: int) -> None:
        self.total[0] += rows
        self.total[1] += size
        counts = self.per.get(model) if model is not None else None
        if counts is not None:
            counts[0] += rows
            counts[1] += size

    def of(self, model: str | None) -> list[int]:
        """``[rows, bytes]`` of ``model`` (None: the whole outbox)."""
        return self.total if model is None else self.per[model]


def shed(db: sqlite3.Connection, usage: Usage, quota: Quota, model: str | None = None) -> dict[str, int]:
    """Apply the drop order to one scope inside the caller's transaction; drops by kind."""
    drops: dict[str, int] = {}
    where, args = ("", ()) if model is None else (" AND model=?", (model,))
    counts = usage.of(model)

    def bytes_over() -> bool:
        return quota.max_bytes is not None and counts[1] > quota.max_bytes

    while bytes_over():
        found = db.execute(
            f"SELECT seq, size, body, model, has_inputs FROM records WHERE has_inputs > 0{where} ORDER BY seq LIMIT 256",
            args,
        ).fetchall()
        if not found:
            break
        for seq, size, body, owner, sampled in found:
            text = strip_inputs(body)
            db.execute("UPDATE records SET body=?, size=?, has_inputs=0 WHERE seq=?", (text, len(text), seq))
            usage.add(owner, 0, len(text) - size)
            drops["inputs"] = drops.get("inputs", 0) + sampled
            if not bytes_over():
                break
    for kinds in (("prediction", PACK_KIND), *((k,) for k in PROTECTED)):
        kind, marks = kinds[0], ",".join("?" * len(kinds))
        while quota.over(*counts):
            found = db.execute(
                f"SELECT seq, size, model, n FROM records WHERE kind IN ({marks}){where} ORDER BY seq LIMIT ?",
                (*kinds, *args, _batch(quota, counts)),
            ).fetchall()
            if not found:
                break
            upto = 0
            for seq, size, owner, records in found:
                if not quota.over(*counts):
                    break
                need = _excess(quota, counts, records, size)
                if need < records:  # the oldest pack holds more than must go: drop its oldest ``need``
                    _trim(db, usage, seq, owner, need)
                    drops[kind] = drops.get(kind, 0) + need
                    break
                upto = seq
                usage.add(owner, -records, -size)
                drops[kind] = drops.get(kind, 0) + records
            db.execute(f"DELETE FROM records WHERE kind IN ({marks}){where} AND seq<=?", (*kinds, *args, upto))
    return drops


def _batch(quota: Quota, counts: list[int]) -> int:
    """Rows to fetch per round of shedding: about the excess, within 1..1000."""
    excess = counts[0] - quota.max_rows if quota.max_rows is not None else 0
    return max(1, min(excess, 1000)) if excess > 0 else 64


def _excess(quota: Quota, counts: list[int], n: int, size: int) -> int:
    """How many of a row's ``n`` records must go for the scope to fit (at least one)."""
    need = counts[0] - quota.max_rows if quota.max_rows is not None else 0
    if quota.max_bytes is not None and counts[1] > quota.max_bytes:
        need = max(need, -(-(counts[1] - quota.max_bytes) * n // max(1, size)))
    return max(1, need)


def _trim(db: sqlite3.Connection, usage: Usage, seq: int, owner: str | None, k: int) -> None:
    """Drop the oldest ``k`` predictions of the pack ``seq`` (its sampled inputs among them)."""
    (body,) = db.execute("SELECT body FROM records WHERE seq=?", (seq,)).fetchone()
    text, ids, sampled = trim(body, k)
    db.execute(
        "UPDATE records SET body=?, size=?, n=n-?, has_inputs=?, request_id=? WHERE seq=?",
        (text, len(text), k, sampled, ids, seq),
    )
    usage.add(owner, -k, len(text) - len(body))
