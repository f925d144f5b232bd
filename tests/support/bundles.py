"""Feature bundles from a small table of rows, written with the real ``write_bundle`` (so devices accept them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.wire.bundle import FeatureSpec, write_bundle


def write_rows(
    path: Path,
    set: str,
    version: str,
    rows: dict[str, list[float]],
    names: list[str],
    *,
    event_ts: float | dict[str, float],
    kind: str = "snapshot",
    base: str | None = None,
    deleted: tuple[str, ...] = (),
    dtype: str = "float64",
    **kw: Any,
) -> Path:
    """``rows`` (entity → one value per name) as a bundle at ``path``; ``event_ts`` is one time or one per entity."""
    ents = list(rows)
    ts = [event_ts[e] for e in ents] if isinstance(event_ts, dict) else event_ts
    values = np.array([rows[e] for e in ents], dtype=np.float64).reshape(len(ents), len(names))
    write_bundle(
        path,
        set,
        version,
        kind,
        ents,
        ts,
        values,
        [FeatureSpec(n, dtype) for n in names],
        base_version=base,
        deleted=deleted,
        **kw,
    )
    return path
