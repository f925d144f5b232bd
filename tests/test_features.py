"""The feature cache on real SQLite: apply (snapshot, delta, refusals), reads, TTL, bounds, history, schema.

Concurrent readers are in ``test_features_concurrency.py``, the CLI in ``test_features_cli.py``.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import (
    CacheFull,
    DeltaBaseMismatch,
    FailedError,
    FeatureCacheError,
    FeatureExpired,
    FeatureNotFound,
    FeatureSetNotFound,
    NotFoundError,
    RejectedError,
    VersionNotNewer,
)
from edge_agent.features.cache import DB_FILE, FeatureCache
from edge_agent.features.schema import SCHEMA_VERSION, table
from edge_agent.wire.bundle import FeatureSpec, write_bundle
from tests.support.feature_cache import NAMES, T0, make


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def dump(cache: FeatureCache, set: str = "maint") -> dict[str, Any]:
    """Everything a reader can see of a set, straight from SQLite."""
    with sqlite3.connect(cache.path) as conn:
        rows = conn.execute(f"SELECT entity, event_ts, version, vals FROM {table(set)} ORDER BY entity").fetchall()
        meta = conn.execute("SELECT * FROM feature_sets WHERE name = ?", (set,)).fetchone()
    return {"rows": rows, "meta": meta}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(tmp_path: Path, clock: Clock):
    c = FeatureCache(tmp_path / DB_FILE, clock=clock)
    yield c
    c.close()


def test_snapshot_then_delta(cache: FeatureCache, tmp_path: Path) -> None:
    r1 = cache.apply(make(tmp_path, "1", {"p1": [1, 2, 3], "p2": [4, 5, 6], "p3": [7, 8, 9]}))
    assert (r1.version, r1.previous_version, r1.rows, r1.upserted, r1.noop) == ("1", None, 3, 3, False)
    row = cache.get("maint", "p2")
    assert row is not None and row.values.tolist() == [4, 5, 6] and row.as_dict() == {"a": 4, "b": 5, "c": 6}
    assert (row.version, row.row_version, row.expired, row.age_s) == ("1", "1", False, 0.0)

    r2 = cache.apply(
        make(
            tmp_path,
            "2",
            {"p2": [40, 50, 60], "p4": [10, 11, 12]},
            kind="delta",
            base="1",
            deleted=("p3", "never-existed"),
            ts=T0 + 60,
        )
    )
    assert (r2.kind, r2.previous_version, r2.rows, r2.upserted, r2.deleted) == ("delta", "1", 3, 2, 1)
    got = {e: cache.get("maint", e) for e in ("p1", "p2", "p3", "p4")}
    assert got["p3"] is None
    assert got["p1"].values.tolist() == [1, 2, 3] and (got["p1"].version, got["p1"].row_version) == ("2", "1")
    assert got["p2"].values.tolist() == [40, 50, 60] and got["p2"].row_version == "2"
    assert got["p4"].values.tolist() == [10, 11, 12] and got["p4"].event_ts == T0 + 60
    info = cache.set_info("maint")
    assert info is not None and (info.version, info.kind, info.rows, info.base_version) == ("2", "delta", 3, "1")

    # A later snapshot replaces everything, including rows deltas added.
    cache.apply(make(tmp_path, "3", {"p9": [0, 0, 0]}))
    assert cache.get("maint", "p1") is None and cache.get("maint", "p4") is None
    assert cache.get("maint", "p9").values.tolist() == [0, 0, 0]
    assert cache.set_info("maint").rows == 1


def test_get_many_keeps_request_order(cache: FeatureCache, tmp_path: Path) -> None:
    cache.apply(make(tmp_path, "1", {"x": [1, 1, 1], "y": [2, 2, 2]}))
    rows = cache.get_many("maint", ["y", "nope", "x"])
    assert [r.entity if r else None for r in rows] == ["y", None, "x"]
    assert rows[0].values.tolist() == [2, 2, 2]


def test_empty_delta_bumps_the_version_and_empty_snapshot_clears(cache: FeatureCache, tmp_path: Path) -> None:
    cache.apply(make(tmp_path, "1", {"x": [1, 1, 1]}))
    cache.apply(make(tmp_path, "2", {}, kind="delta", base="1"))
    assert cache.version("maint") == "2" and cache.get("maint", "x").version == "2"
    cache.apply(make(tmp_path, "3", {}))
    assert cache.get("maint", "x") is None
    info = cache.set_info("maint")
    assert (info.rows, info.bytes, info.oldest_ts, info.newest_ts) == (0, 0, None, None)


def test_wrong_base_delta_is_refused_and_changes_nothing(cache: FeatureCache, tmp_path: Path) -> None:
    cache.apply(make(tmp_path, "1", {"x": [1, 1, 1]}))
    cache.apply(make(tmp_path, "2", {"x": [2, 2, 2]}, kind="delta", base="1"))
    before = dump(cache)
    with pytest.raises(DeltaBaseMismatch, match="delta from 1 but the cache has maint 2") as err:
        cache.apply(make(tmp_path, "3", {"x": [3, 3, 3], "z": [0, 0, 0]}, kind="delta", base="1"))
    assert (err.value.set, err.value.current_version, err.value.base_version) == ("maint", "2", "1")
    assert err.value.code == "delta_base" and isinstance(err.value, RejectedError)
    # A delta whose features differ needs a snapshot too.
    with pytest.raises(DeltaBaseMismatch, match="features"):
        cache.apply(make(tmp_path, "3", {"x": [3, 3]}, kind="delta", base="2", names=["a", "b"]))
    assert dump(cache) == before
    assert cache.get("maint", "x").values.tolist() == [2, 2, 2]
    # A delta for a set the device has never had.
    with pytest.raises(DeltaBaseMismatch, match="no other") as err:
        cache.apply(make(tmp_path, "5", {"x": [1, 1, 1]}, kind="delta", base="4", set="other"))
    assert err.value.current_version is None
    assert [s.name for s in cache.list_sets()] == ["maint"]


def test_version_not_newer_is_refused(cache: FeatureCache, tmp_path: Path) -> None:
    b3 = make(tmp_path, "3", {"x": [3, 3, 3]})
    cache.apply(b3)
    before = dump(cache)
    with pytest.raises(VersionNotNewer, match="version 2 is not newer than the cached maint version 3"):
        cache.apply(make(tmp_path, "2", {"x": [2, 2, 2]}))
    with pytest.raises(VersionNotNewer, match="same version, different data"):
        cache.apply(make(tmp_path, "3", {"x": [9, 9, 9]}))
    with pytest.raises(VersionNotNewer):  # checked before the delta's base
        cache.apply(make(tmp_path, "2.9", {"x": [9, 9, 9]}, kind="delta", base="2"))
    assert dump(cache) == before
    # Numeric comparison: 10 is newer than 9.
    cache.apply(make(tmp_path, "9", {"x": [9, 9, 9]}))
    assert cache.apply(make(tmp_path, "10", {"x": [10, 10, 10]})).previous_version == "9"


def test_reapplying_the_same_bundle_is_a_noop(cache: FeatureCache, tmp_path: Path) -> None:
    b = make(tmp_path, "1", {"x": [1, 1, 1]})
    cache.apply(b)
    before = dump(cache)
    again = cache.apply(b.path)  # from the directory, as after a restart
    assert again.noop and again.rows == 1
    assert dump(cache) == before


def test_signed_rollback_may_apply_an_older_snapshot(cache: FeatureCache, tmp_path: Path) -> None:
    cache.apply(make(tmp_path, "5", {"x": [5, 5, 5]}))
    old = make(tmp_path, "4", {"x": [4, 4, 4]})
    with pytest.raises(VersionNotNewer):
        cache.apply(old)
    assert cache.apply(old, allow_downgrade=True).previous_version == "5"
    assert cache.get("maint", "x").values.tolist() == [4, 4, 4]


def test_ttl_is_enforced_at_read_time(cache: FeatureCache, tmp_path: Path, clock: Clock) -> None:
    cache.apply(
        make(tmp_path, "1", {"old": [1, 1, 1], "new": [2, 2, 2]}, ts={"old": T0 - 4000, "new": T0 - 10}, ttl_s=3600)
    )
    old, new = cache.get("maint", "old"), cache.get("maint", "new")
    assert old.expired and old.age_s == 4000 and not old.usable
    assert not new.expired and new.age_s == 10
    assert not cache.get("maint", "new", now=T0 + 3590).expired  # an injected now wins over the clock (age == ttl)
    assert cache.get("maint", "new", now=T0 + 3590.5).expired
    clock.t = T0 + 4000
    assert cache.get("maint", "new").expired
    with pytest.raises(FeatureExpired, match="expired: age 4010s > ttl 3600s") as err:
        cache.lookup("maint", "new")
    assert err.value.row.entity == "new" and isinstance(err.value, NotFoundError)
    with pytest.raises(FeatureNotFound):
        cache.lookup("maint", "missing")
    assert cache.lookup("maint", "new", now=T0).values.tolist() == [2, 2, 2]
    # stale_policy "serve": expired values stay usable, flagged.
    cache.apply(make(tmp_path, "2", {"old": [1, 1, 1]}, ts=T0 - 4000, policy="serve"))
    row = cache.lookup("maint", "old")
    assert row.expired and row.usable
    # ttl null: never expires.
    cache.apply(make(tmp_path, "3", {"old": [1, 1, 1]}, ts=0.0, ttl_s=None))
    assert not cache.get("maint", "old").expired


def test_unknown_set_and_entity(cache: FeatureCache, tmp_path: Path) -> None:
    with pytest.raises(FeatureSetNotFound):
        cache.get("nope", "x")
    cache.apply(make(tmp_path, "1", {"x": [1, 1, 1]}))
    assert cache.get("maint", "y") is None
    assert cache.delete_set("maint") is True
    assert cache.delete_set("maint") is False
    with pytest.raises(FeatureSetNotFound):
        cache.get("maint", "x")
    assert cache.list_sets() == []


def test_size_bound_rejects_and_changes_nothing(tmp_path: Path, clock: Clock) -> None:
    cache = FeatureCache(tmp_path / DB_FILE, max_rows=3, clock=clock)
    cache.apply(make(tmp_path, "1", {"x": [1, 1, 1], "y": [1, 1, 1]}))
    before = dump(cache)
    with pytest.raises(CacheFull, match="4 rows, above max_rows=3") as err:
        cache.apply(make(tmp_path, "2", {e: [2, 2, 2] for e in "wxyz"}))
    assert err.value.code == "too_large"
    with pytest.raises(CacheFull, match="4 rows"):
        cache.apply(make(tmp_path, "2", {"v": [2, 2, 2], "w": [2, 2, 2]}, kind="delta", base="1"))
    assert dump(cache) == before
    # Upserting existing rows and deleting some stays within the bound.
    r = cache.apply(
        make(tmp_path, "2", {"x": [2, 2, 2], "v": [2, 2, 2], "w": [2, 2, 2]}, kind="delta", base="1", deleted=("y",))
    )
    assert r.rows == 3
    # The bound covers the whole cache: another set competes for the same rows.
    with pytest.raises(CacheFull):
        cache.apply(make(tmp_path, "1", {"q": [1, 1, 1]}, set="other"))
    cache.close()

    row_bytes = 1 + 3 * 8 + 16  # entity, 3 float64, ROW_OVERHEAD
    cache = FeatureCache(tmp_path / DB_FILE, max_bytes=4 * row_bytes, clock=clock)
    with pytest.raises(CacheFull, match="max_bytes"):
        cache.apply(make(tmp_path, "1", {e: [1, 1, 1] for e in "abcde"}, set="other"))
    assert cache.apply(make(tmp_path, "1", {"q": [1, 1, 1]}, set="other")).bytes == row_bytes
    cache.close()


def test_list_sets_reports_freshness(cache: FeatureCache, tmp_path: Path, clock: Clock) -> None:
    cache.apply(
        make(
            tmp_path,
            "1",
            {"x": [1, 1, 1], "y": [1, 1, 1], "z": [1, 1, 1]},
            ts={"x": T0 - 7200, "y": T0 - 60, "z": T0 - 30},
            ttl_s=3600,
        )
    )
    (s,) = cache.list_sets()
    assert (s.name, s.version, s.rows, s.ttl_s, s.features, s.dtype) == ("maint", "1", 3, 3600, tuple(NAMES), "float64")
    assert (s.oldest_age_s, s.newest_age_s, s.some_expired, s.all_expired) == (7200, 30, True, False)
    assert s.bytes == 3 * (1 + 24 + 16)
    # Overwriting the oldest row moves "oldest" forward (recomputed), deleting the newest moves "newest" back.
    cache.apply(make(tmp_path, "2", {"x": [2, 2, 2]}, kind="delta", base="1", ts=T0 - 45, deleted=("z",)))
    s = cache.set_info("maint")
    assert (s.oldest_age_s, s.newest_age_s, s.some_expired, s.rows) == (60, 45, False, 2)
    assert cache.list_sets(now=T0 + 4000)[0].all_expired
    d = s.to_dict()
    assert d["features"] == NAMES and d["some_expired"] is False and json.dumps(d)


def test_another_process_sees_new_versions_and_feature_lists(tmp_path: Path) -> None:
    """A reader's cached metadata never decodes rows of another version (e.g. a CLI applies meanwhile)."""
    reader = FeatureCache(tmp_path / DB_FILE)
    writer = FeatureCache(tmp_path / DB_FILE)
    writer.apply(make(tmp_path, "1", {"x": [1, 2, 3]}))
    assert reader.get("maint", "x").as_dict() == {"a": 1, "b": 2, "c": 3}
    writer.apply(make(tmp_path, "2", {"x": [7, 8]}, names=["d", "e"], dtype="float32"))
    row = reader.get("maint", "x")
    assert row.as_dict() == {"d": 7, "e": 8} and row.values.dtype == np.float32 and row.version == "2"
    writer.delete_set("maint")
    with pytest.raises(FeatureSetNotFound):
        reader.get("maint", "x")
    writer.apply(make(tmp_path, "1", {"x": [4, 5, 6]}))
    assert reader.get("maint", "x").values.tolist() == [4, 5, 6]
    # Deleted and re-applied under the same version number with another feature list: still noticed.
    writer.delete_set("maint")
    writer.apply(make(tmp_path / "again", "1", {"x": [1, 2]}, names=["p", "q"], dtype="float32"))
    assert reader.get("maint", "x").as_dict() == {"p": 1, "q": 2}
    assert reader.get_many("maint", ["x"])[0].as_dict() == {"p": 1, "q": 2}
    reader.close()
    writer.close()


def test_history_records_every_apply(cache: FeatureCache, tmp_path: Path) -> None:
    cache.apply(make(tmp_path, "1", {"x": [1, 1, 1]}))
    b2 = make(tmp_path, "2", {"y": [1, 1, 1]}, kind="delta", base="1", deleted=("x",))
    cache.apply(b2)
    cache.apply(b2)  # a no-op is not logged
    cache.apply(make(tmp_path, "1", {"x": [1, 1, 1]}, set="other"))
    h = cache.history("maint")
    assert [(e["version"], e["kind"], e["rows"], e["upserted"], e["deleted"]) for e in h] == [
        ("2", "delta", 1, 1, 1),
        ("1", "snapshot", 1, 1, 0),
    ]
    assert h[0]["bundle_id"] == b2.info.id and h[0]["id"] == cache.set_info("maint").apply_id
    assert [e["set"] for e in cache.history()] == ["other", "maint", "maint"]


def test_int64_and_float32_sets_round_trip(cache: FeatureCache, tmp_path: Path) -> None:
    big = 2**62 + 1
    path = tmp_path / "ints"
    write_bundle(
        path,
        "counts",
        "1",
        "snapshot",
        ["x"],
        T0,
        np.array([[big, -1]], dtype=np.int64),
        [FeatureSpec("n", "int64"), FeatureSpec("m", "int64")],
        ttl_s=None,
    )
    cache.apply(path)
    assert cache.get("counts", "x").as_dict() == {"n": big, "m": -1}


def test_schema_is_migrated_once_and_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / DB_FILE
    with FeatureCache(path) as c:
        assert c.schema_version() == SCHEMA_VERSION == 2
    with FeatureCache(path) as c:  # reopening runs nothing twice
        assert c.schema_version() == SCHEMA_VERSION
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT count(*) FROM _migrations").fetchone()[0] == SCHEMA_VERSION
        conn.execute("INSERT INTO _migrations VALUES (99, 'from the future', '')")
    with pytest.raises(FeatureCacheError, match="schema version 99") as err:
        FeatureCache(path)
    assert isinstance(err.value, FailedError)


def test_synchronous_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        FeatureCache(tmp_path / DB_FILE, synchronous="OFF")
    for mode, code in (("FULL", 2), ("normal", 1)):
        with FeatureCache(tmp_path / DB_FILE, synchronous=mode) as c:
            assert c._writer.execute("PRAGMA synchronous").fetchone()[0] == code


def test_closed_cache_raises(tmp_path: Path) -> None:
    c = FeatureCache(tmp_path / DB_FILE)
    c.apply(make(tmp_path, "1", {"x": [1, 1, 1]}))
    assert c.get("maint", "x") is not None
    c.close()
    with pytest.raises(FeatureCacheError):
        c.get("maint", "x")
    with pytest.raises(FeatureCacheError):
        c.apply(make(tmp_path, "2", {"x": [1, 1, 1]}))
