"""The models a device ships with (``models_dir``), installed into the store on the agent's first start only."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from edge_agent.errors import EdgeError
from edge_agent.models.store import ModelStore
from edge_agent.wire.model.manifest import MANIFEST_FILE

log = logging.getLogger("edge_agent")

BOOTSTRAP_MARKER = ".bootstrapped"  # in the data dir: the shipped models were installed once (never again)


def install_shipped_models(store: ModelStore, models_dir: Path | None, data_dir: Path) -> list[str]:
    """On the first start only, install every version found in the shipped registry folder."""
    marker = Path(data_dir) / BOOTSTRAP_MARKER
    if marker.exists() or models_dir is None or not Path(models_dir).is_dir():
        return []
    installed = []
    for manifest_path in sorted(Path(models_dir).glob(f"*/*/{MANIFEST_FILE}")):
        try:
            m = store.install_dir(manifest_path.parent)
            installed.append(f"{m.name}:{m.version}")
        except EdgeError as exc:
            log.error("shipped model %s not installed: %s", manifest_path.parent, exc)
    marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
    return installed
