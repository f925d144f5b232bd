"""Feature set names that differ only in case are two sets with two tables (#15), and old files are migrated."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np

from edge_agent.errors import FeatureSetNotFound
from edge_agent.features.cache import DB_FILE, FeatureCache
from edge_agent.features.schema import table
from tests.support.bundles import write_rows

NAMES = ["a", "b"]


def _bundle(tmp: Path, set: str, version: str, rows: dict[str, list[float]], dtype: str) -> Path:
    return write_rows(
        tmp / f"{set}-{version}", set, version, rows, NAMES, event_ts=time.time(), dtype=dtype, ttl_s=None
    )


def test_assets_and_Assets_are_two_sets(tmp_path: Path) -> None:
    with FeatureCache(tmp_path / DB_FILE) as cache:
        cache.apply(_bundle(tmp_path, "Assets", "1", {"x": [1.5, 2.5], "y": [3.0, 4.0]}, "float64"))
        cache.apply(_bundle(tmp_path, "assets", "1", {"z": [9.0, 8.0]}, "float32"))  # the review's corruption
        big = cache.get("Assets", "x")
        assert big is not None and big.values.dtype == np.float64 and list(big.values) == [1.5, 2.5]
        assert cache.get("Assets", "y") is not None and cache.get("Assets", "z") is None
        small = cache.get("assets", "z")
        assert small is not None and small.values.dtype == np.float32 and list(small.values) == [9.0, 8.0]
        assert cache.get("assets", "x") is None
        assert {s.name: s.rows for s in cache.list_sets()} == {"Assets": 2, "assets": 1}
        assert cache.delete_set("assets")
        assert cache.get("Assets", "x") is not None
    assert table("Assets") != table("assets") and table("Assets").lower() != table("assets").lower()


def test_an_old_file_is_migrated_and_collided_sets_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / DB_FILE
    with FeatureCache(path) as cache:
        for name in ("Pumps", "Assets", "assets"):
            cache.apply(_bundle(tmp_path, name, "1", {"p": [1.0, 2.0]}, "float64"))
    with sqlite3.connect(path) as conn:  # rewind to schema 1: tables named fs_<set>, as an old agent left them
        conn.execute(f'ALTER TABLE {table("Pumps")} RENAME TO "fs_Pumps"')
        conn.execute(f"DROP TABLE {table('Assets')}")  # "fs_assets" is left: the one table both shared
        conn.execute("DELETE FROM _migrations WHERE id = 2")
    with FeatureCache(path) as cache:
        assert cache.schema_version() == 2
        row = cache.get("Pumps", "p")
        assert row is not None and list(row.values) == [1.0, 2.0]
        assert [s.name for s in cache.list_sets()] == ["Pumps"]
        for name in ("Assets", "assets"):
            try:
                cache.get(name, "p")
            except FeatureSetNotFound:
                continue
            raise AssertionError(f"{name} survived the migration")
