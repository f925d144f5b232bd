"""The devices a fleet knows (``cloud-batch fleet add|list``): only they count toward a rollout's failure rate.

One CSV per fleet, ``<registry>/.fleets/<fleet>/devices.csv`` with columns ``device_id,added_at``,
rewritten atomically. A fleet with no file knows no device list yet: its rollouts count every
device that reports (and say so), as before this registry existed. ``cloud-batch pki issue
device`` adds the device it issues a certificate for.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterable
from pathlib import Path

from cloud_batch.errors import RegistryError, input_errors
from edge_agent.errors import EdgeError
from edge_agent.fsutil import atomic_write_bytes, locked
from edge_agent.wire.names import check_segment

FLEETS_DIR = ".fleets"


class DeviceRegistry:
    """Known device ids per fleet, on disk under the registry."""

    def __init__(self, registry_dir: str | Path) -> None:
        self.root = Path(registry_dir) / FLEETS_DIR

    def _file(self, fleet: str) -> Path:
        with input_errors():
            return self.root / check_segment(fleet, "fleet") / "devices.csv"

    def entries(self, fleet: str) -> dict[str, float]:
        """device id -> when it was added; empty when the fleet has no list."""
        path = self._file(fleet)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise RegistryError(f"cannot read {path}: {exc}") from exc
        out: dict[str, float] = {}
        for row in csv.DictReader(io.StringIO(text)):
            try:
                out[check_segment(row.get("device_id"), "device id")] = float(row.get("added_at") or 0)
            except (EdgeError, ValueError) as exc:
                raise RegistryError(f"{path}: bad row {row}: {exc}") from exc
        return out

    def known(self, fleet: str) -> frozenset[str] | None:
        """The fleet's known devices, None when it has no device list at all."""
        if not self._file(fleet).exists():
            return None
        return frozenset(self.entries(fleet))

    def add(self, fleet: str, device_ids: Iterable[str]) -> list[str]:
        """Add devices (idempotent); return the ids that were new. InputError for an invalid id."""
        ids = []
        for d in device_ids:
            with input_errors():
                ids.append(check_segment(d, "device id"))
        path = self._file(fleet)
        with locked(self.root / ".lock"):
            current = self.entries(fleet)
            new = [d for d in dict.fromkeys(ids) if d not in current]
            now = time.time()
            current.update({d: now for d in new})
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(["device_id", "added_at"])
            writer.writerows([d, f"{t:.3f}"] for d, t in sorted(current.items()))
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, buf.getvalue().encode())
            except OSError as exc:
                raise RegistryError(f"cannot write {path}: {exc}") from exc
        return new
