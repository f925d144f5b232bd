"""A large feature set ("big") whose every row encodes its version, for the kill -9 tests of the cache.

Row ``i`` of version ``v`` holds ``v + i % 97`` in each of its ``F`` columns and event time ``v``,
so after a crash one look at the file tells whether it holds exactly one complete version.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.wire.bundle import FeatureSpec, write_bundle

SET = "big"
F = 8  # float64 columns per row


def big_entities(n: int) -> np.ndarray:
    """``asset-000000`` …: zero-padded, so their text order is their numeric order."""
    return np.array([f"asset-{i:06d}" for i in range(n)])


def big_values(n: int, version: int | str) -> np.ndarray:
    """Row-specific and version-encoded values."""
    return np.full((n, F), float(version)) + (np.arange(n) % 97)[:, None]


def write_big(path: Path, version: int, n: int, **kw: Any) -> Path:
    """A snapshot bundle of ``n`` rows of version ``version`` at ``path``."""
    write_bundle(
        path,
        SET,
        str(version),
        "snapshot",
        big_entities(n),
        float(version),
        big_values(n, version),
        [FeatureSpec(f"f{i}", "float64") for i in range(F)],
        ttl_s=None,
        **kw,
    )
    return path


def one_complete_version(db: Path, n: int) -> str:
    """The file is sound and holds exactly one complete version of the set; return it."""
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        (version,) = conn.execute("SELECT version FROM feature_sets WHERE name = ?", (SET,)).fetchone()
        rows = conn.execute(f'SELECT entity, event_ts, version, vals FROM "fs_{SET}" ORDER BY entity').fetchall()
        assert len(rows) == n
        entities, ts, row_versions, blobs = zip(*rows, strict=True)
        assert list(entities) == big_entities(n).tolist()
        assert set(row_versions) == {version} and set(ts) == {float(version)}
        values = np.frombuffer(b"".join(blobs), "<f8").reshape(n, F)
        assert (values == big_values(n, version)).all(), "a row holds another version's values"
        return str(version)
    finally:
        conn.close()
