"""The outbox's bound: the device-wide limit and per-model quotas, shed in one drop order.

A scope is the whole outbox or one model's rows (every kind whose ``model`` is that name). Inside
a scope, while it is over its ``max_rows`` / ``max_bytes``:

1. ``inputs``: the oldest sampled inputs are stripped from their prediction rows (the prediction
   stays, marked ``"inputs_dropped": true``); only while over ``max_bytes``;
2. ``prediction``: the oldest prediction rows are deleted;
3. ``drift``, ``event``, ``feedback``: only when nothing else is left to drop and the scope is
   still over (the hard cap), oldest first.

Model quotas are applied first, then the device-wide bound. :class:`Usage` keeps the counts in
step with every write, so checking the bound costs no query.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

PROTECTED = ("drift", "event", "feedback")  # dropped only at the hard cap, in this order


@dataclass(frozen=True)
class Quota:
    """A limit on rows and bytes of record bodies; None = unbounded."""

    max_rows: int | None = None
    max_bytes: int | None = None

    def over(self, rows: int, size: int) -> bool:
        return (self.max_rows is not None and rows > self.max_rows) or (
            self.max_bytes is not None and size > self.max_bytes
        )


class Usage:
    """Rows and body bytes in the outbox, in total and for each model that has a quota."""

    def __init__(self, db: sqlite3.Connection, models: Iterable[str] = ()) -> None:
        self.total = [0, 0]
        self.per: dict[str, list[int]] = {m: [0, 0] for m in models}
        self.recount(db)

    def recount(self, db: sqlite3.Connection) -> None:
        self.total = [0, 0]
        for counts in self.per.values():
            counts[:] = [0, 0]
        for model, rows, size in db.execute(
            "SELECT model, COUNT(*), COALESCE(SUM(size), 0) FROM records GROUP BY model"
        ):
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


def strip_inputs(body: str) -> str:
    """A prediction body without its sampled inputs, marked ``"inputs_dropped": true``."""
    doc = json.loads(body)
    doc.pop("inputs", None)
    doc["inputs_dropped"] = True
    return json.dumps(doc, separators=(",", ":"))


def shed(db: sqlite3.Connection, usage: Usage, quota: Quota, model: str | None = None) -> dict[str, int]:
    """Apply the drop order to one scope inside the caller's transaction; drops by kind."""
    drops: dict[str, int] = {}
    where, args = ("", ()) if model is None else (" AND model=?", (model,))
    counts = usage.of(model)

    def bytes_over() -> bool:
        return quota.max_bytes is not None and counts[1] > quota.max_bytes

    while bytes_over():
        found = db.execute(
            f"SELECT seq, size, body, model FROM records WHERE has_inputs = 1{where} ORDER BY seq LIMIT 256", args
        ).fetchall()
        if not found:
            break
        for seq, size, body, owner in found:
            text = strip_inputs(body)
            db.execute("UPDATE records SET body=?, size=?, has_inputs=0 WHERE seq=?", (text, len(text), seq))
            usage.add(owner, 0, len(text) - size)
            drops["inputs"] = drops.get("inputs", 0) + 1
            if not bytes_over():
                break
    for kind in ("prediction", *PROTECTED):
        while quota.over(*counts):
            excess = counts[0] - quota.max_rows if quota.max_rows is not None else 0
            n = max(1, min(excess, 1000)) if excess > 0 else 64
            found = db.execute(
                f"SELECT seq, size, model FROM records WHERE kind=?{where} ORDER BY seq LIMIT ?", (kind, *args, n)
            ).fetchall()
            if not found:
                break
            upto = 0
            for seq, size, owner in found:
                if not quota.over(*counts):
                    break
                upto = seq
                usage.add(owner, -1, -size)
                drops[kind] = drops.get(kind, 0) + 1
            db.execute(f"DELETE FROM records WHERE kind=?{where} AND seq<=?", (kind, *args, upto))
    return drops
