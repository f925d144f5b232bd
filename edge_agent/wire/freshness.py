"""Freshness and anti-replay for signed documents, as TUF does it: a ``seq`` per (fleet, kind, name).

The registry issues every signed document (release, feature release, rollout) the next ``seq``
of its ``(fleet, kind, name)``; a device keeps the highest ``seq`` it has accepted per
``(kind, name)`` and refuses anything older. The same document again (same ``seq``, same id)
is a re-delivery, not a replay: retained messages come back on every connect. A rollback is a
*new* release with a higher ``seq`` that points at an older version, and it must carry
``expires_at`` so a captured one cannot be replayed later either.

``require_fresh`` and ``require_unexpired`` are the rules; ``SeqLedger`` is the device's
persisted memory of the highest ``seq`` (temp file, fsync, ``os.replace``), written before the
step that acts on the document. The keys sign, the counter orders: rotating keys does not
reset it (see docs/protocol.md, "Freshness").
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from edge_agent.errors import StaleRejected
from edge_agent.fsutil import atomic_write_json

log = logging.getLogger(__name__)

LEDGER_SCHEMA = 1


def require_fresh(what: str, seq: int, doc_id: str, highest: tuple[int, str] | None) -> bool:
    """Raise StaleRejected unless ``seq`` is newer than ``highest`` (``(seq, id)`` accepted last).

    Returns False for a re-delivery of the document accepted last (same ``seq`` and id), True
    for a newer one. Anything unsequenced (``seq`` 0) is refused.
    """
    if seq < 1:
        raise StaleRejected(f"replay protection: {what} carries no seq (signed by a tool that predates seq)")
    if highest is None or seq > highest[0]:
        return True
    if seq == highest[0] and doc_id == highest[1]:
        return False
    raise StaleRejected(
        f"replay: {what} {doc_id} has seq {seq}, not newer than seq {highest[0]} ({highest[1]}) already accepted"
    )


def require_unexpired(what: str, expires_at: float | None, now: float) -> None:
    """Raise StaleRejected once ``expires_at`` has passed (None: the document does not expire)."""
    if expires_at is not None and now >= expires_at:
        raise StaleRejected(f"expired: {what} expired at {expires_at:.0f} (now {now:.0f})")


class SeqLedger:
    """The highest accepted ``(seq, id)`` per key (``"model/digits"``, ``"rollout/digits"``), persisted.

    ``path`` None keeps it in memory (the fleet simulator). Thread-safe.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._highest: dict[str, tuple[int, str]] = {}
        if path is not None:
            self._load(path)

    def highest(self, key: str) -> tuple[int, str] | None:
        with self._lock:
            return self._highest.get(key)

    def check(self, key: str, what: str, seq: int, doc_id: str) -> bool:
        """``require_fresh`` against this ledger (True: newer, False: the same document again)."""
        return require_fresh(what, seq, doc_id, self.highest(key))

    def accept(self, key: str, seq: int, doc_id: str) -> None:
        """Record ``seq`` as accepted for ``key`` (durable on return when persisted); never lowers it."""
        with self._lock:
            current = self._highest.get(key)
            if current is not None and current[0] >= seq:
                return
            self._highest[key] = (seq, doc_id)
            if self.path is not None:
                body = {k: [s, i] for k, (s, i) in self._highest.items()}
                atomic_write_json(self.path, {"schema_version": LEDGER_SCHEMA, "highest": body})

    def _load(self, path: Path) -> None:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            # Written atomically, so only a disk fault gets here. Refusing every release would brick
            # updates; the version rule (names.require_newer) still refuses non-rollback downgrades.
            log.error("unreadable seq ledger %s (%s): starting from scratch", path, exc)
            return
        for key, value in (raw.get("highest") or {}).items() if isinstance(raw, dict) else ():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], int):
                self._highest[str(key)] = (value[0], str(value[1]))
