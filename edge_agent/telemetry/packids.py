"""Which packs in the outbox may hold an inference id: the feedback 404 rule's lookup past the in-memory index.

A pack keeps its ids as one JSON list (``wire.telemetry.pack``), so there is no SQL index on them.
Scanning every pack's list for each lookup cost 4–5 ms with 100,000 ids held, and a client could
make the agent pay that per request with ids it never issued. :class:`PackIds` keeps, in memory,
the 64-bit ``hash`` of every id of every pack (~16 bytes per id: 1.6 MB at 100,000), and brings
itself up to date at each lookup from the packs' ``(seq, n)`` (small columns: no pack body is
read), parsing only the packs that are new or were trimmed since the last lookup. A lookup then
reads only the packs whose hashes match, and confirms the id in them.
"""

from __future__ import annotations

import json
import sqlite3

import numpy as np

from edge_agent.wire.telemetry.pack import PACK_KIND


class PackIds:
    """Hashes of the ids of each pack in one outbox (not thread-safe: the outbox's lock guards it)."""

    def __init__(self) -> None:
        self._packs: dict[int, tuple[int, np.ndarray]] = {}  # seq -> (n, hashes)
        self._flat: tuple[np.ndarray, np.ndarray] | None = None  # (hashes, seqs) of every pack, joined

    def _sync(self, db: sqlite3.Connection) -> None:
        present = dict(db.execute("SELECT seq, n FROM records WHERE kind=?", (PACK_KIND,)).fetchall())
        gone = [seq for seq, (n, _) in self._packs.items() if present.get(seq) != n]
        for seq in gone:  # acked, shed or trimmed (a trimmed pack is read again below)
            del self._packs[seq]
        new = [seq for seq in present if seq not in self._packs]
        for seq in new:
            row = db.execute("SELECT n, request_id FROM records WHERE seq=?", (seq,)).fetchone()
            ids = json.loads(row[1])
            self._packs[seq] = (int(row[0]), np.fromiter(map(hash, ids), np.int64, len(ids)))
        if gone or new:
            self._flat = None

    def candidates(self, db: sqlite3.Connection, request_id: str) -> list[int]:
        """Seqs of the packs that may hold ``request_id``, newest first (a hash match: confirm it in the pack)."""
        self._sync(db)
        if self._flat is None:
            parts = [h for _, h in self._packs.values()]
            self._flat = (
                np.concatenate(parts) if parts else np.empty(0, np.int64),
                np.repeat(np.fromiter(self._packs, np.int64, len(self._packs)), [len(h) for h in parts]),
            )
        flat, seqs = self._flat
        return sorted({int(s) for s in seqs[flat == hash(request_id)]}, reverse=True)

    def find(self, db: sqlite3.Connection, request_id: str) -> str | None:
        """The model of the pack that holds ``request_id``, else None."""
        for seq in self.candidates(db, request_id):
            row = db.execute("SELECT model, request_id FROM records WHERE seq=?", (seq,)).fetchone()
            if row is not None and request_id in json.loads(row[1]):
                return str(row[0])
        return None
