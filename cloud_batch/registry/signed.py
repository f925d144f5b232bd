"""The cloud's own record of every document it signed, and the ``seq`` counter devices check.

Layout, beside the model versions (hidden from ``Registry.names`` by the dot)::

    <registry>/.signed/<fleet>/<kind>/<name>/<seq:010d>.json    one signed document each, immutable
    <registry>/.signed/.lock                                      flock held while issuing

``kind`` is an artifact kind (``model``, ``features``, ``agent``) or ``rollout``. ``issue``
takes the lock, picks the next ``seq`` (one past the highest file), lets the caller build and
sign the document with it, and writes the file (temp file, fsync, ``os.replace``) *before* the
caller publishes it: a crash after signing never reuses a number, and two operators releasing
at once get distinct ones. The rollout commands read the authentic release and rollout from
here, so a forged retained copy on the broker cannot change what they believe.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_batch.errors import RegistryError
from edge_agent.errors import EdgeError
from edge_agent.fsutil import atomic_write_json, locked
from edge_agent.wire.names import check_segment

SIGNED_DIR = ".signed"
KINDS = ("model", "features", "agent", "rollout")


class SignedLog:
    """Issue ``seq`` numbers and keep every signed document, per (fleet, kind, name)."""

    def __init__(self, registry_dir: str | Path) -> None:
        self.root = Path(registry_dir) / SIGNED_DIR

    def _dir(self, fleet: str, kind: str, name: str) -> Path:
        if kind not in KINDS:
            raise RegistryError(f"unknown signed document kind {kind!r} (use one of {', '.join(KINDS)})")
        try:
            return self.root / check_segment(fleet, "fleet") / kind / check_segment(name, "name")
        except EdgeError as exc:
            raise RegistryError(str(exc)) from exc

    def last_seq(self, fleet: str, kind: str, name: str) -> int:
        """The highest ``seq`` issued so far (0: none)."""
        seqs = [int(p.stem) for p in self._dir(fleet, kind, name).glob("*.json") if p.stem.isdigit()]
        return max(seqs, default=0)

    def issue(self, fleet: str, kind: str, name: str, build: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
        """Build (and sign) the next document with ``build(seq)``, record it durably, return it."""
        directory = self._dir(fleet, kind, name)
        try:
            with locked(self.root / ".lock"):
                seq = self.last_seq(fleet, kind, name) + 1
                doc = build(seq)
                if doc.get("seq") != seq:
                    raise RegistryError(f"the signed document does not carry the issued seq {seq}")
                atomic_write_json(directory / f"{seq:010d}.json", doc)
        except OSError as exc:
            raise RegistryError(f"cannot record the signed document in {directory}: {exc}") from exc
        return doc

    def latest(
        self, fleet: str, kind: str, name: str, where: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any] | None:
        """The newest recorded document (optionally the newest for which ``where`` holds), None if none."""
        directory = self._dir(fleet, kind, name)
        for path in sorted(directory.glob("*.json"), reverse=True):
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise RegistryError(f"unreadable signed document {path}: {exc}") from exc
            if where is None or where(doc):
                return dict(doc)
        return None
