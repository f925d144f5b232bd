"""``cloud-batch features build`` against the registry on disk, and the delta and partition-map arithmetic.

Builds from CSV, Parquet and the maintenance recipe write a snapshot ``read_bundle`` accepts and are
idempotent; every bad input fails with a clear error before anything is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cloud_batch.errors import InputError, RegistryError
from cloud_batch.features.build import FeatureRegistry, build
from cloud_batch.features.delta import Rows, compute_delta, read_partition_map
from cloud_batch.train.maintenance.data import generate
from cloud_batch.train.maintenance.features import asset_features
from edge_agent.wire.bundle import read_bundle
from tests.support.cloud_features import NOW, SET, build_csv, frame, write_csv
from tests.support.env import MODELS


# -- build -------------------------------------------------------------------------------------
def test_build_from_csv_writes_a_snapshot_and_is_idempotent(tmp_path: Path, reg: Path) -> None:
    df = frame()
    df.loc[0, "camera"] = "007"  # ids stay text: leading zeros survive
    res = build_csv(reg, "1", df, tmp_path, ttl_s=3600, stale_policy="serve")
    assert res.created and res.path == reg / "features" / SET / "1"
    assert sorted(p.name for p in res.path.iterdir()) == ["bundle.json", "data.npz"]
    b = read_bundle(res.path)
    info = b.info
    assert (info.set, info.version, info.kind, info.entity_key) == (SET, "1", "snapshot", "camera")
    assert info.feature_names == ("fps_mean", "dropped_frames") and info.features[0].dtype == "float32"
    assert (info.ttl_s, info.stale_policy, info.rows, dict(info.partition)) == (
        3600,
        "serve",
        6,
        {"by": None, "key": None},
    )
    assert "007" in b.entities.tolist()
    row = b.entities.tolist().index("cam-3")
    assert b.values[row].tolist() == pytest.approx([df.fps_mean[3], df.dropped_frames[3]], rel=1e-6)
    assert b.event_ts[row] == pd.Timestamp("2026-11-04T12:00:00Z").timestamp()
    assert FeatureRegistry(reg).versions(SET) == ["1"]

    before = (res.path / "data.npz").read_bytes()
    again = build_csv(reg, "1", df, tmp_path, ttl_s=3600, stale_policy="serve")
    assert not again.created and "already built" in again.summary()
    assert (res.path / "data.npz").read_bytes() == before

    changed = df.copy()
    changed.loc[2, "fps_mean"] += 1
    refused = r"version 1 already exists .* different content \(values of 1 entities\).*next free: 2"
    with pytest.raises(RegistryError, match=refused):
        build_csv(reg, "1", changed, tmp_path, ttl_s=3600, stale_policy="serve")
    assert (res.path / "data.npz").read_bytes() == before
    assert [p.name for p in (reg / "features" / SET).iterdir()] == ["1"]  # no temp dirs left


def test_build_without_event_times_stamps_now_and_rebuilding_is_still_a_no_op(tmp_path: Path, reg: Path) -> None:
    src = write_csv(frame().drop(columns="computed_at"), tmp_path / "x.csv")
    first = build(reg, SET, "1", source=src, entity_key="camera", progress=False, now=NOW, dtype="float64")
    b = read_bundle(first.path)
    assert (b.event_ts == NOW).all() and b.values.dtype == np.float64
    again = build(reg, SET, "1", source=src, entity_key="camera", progress=False, now=NOW + 60, dtype="float64")
    assert not again.created and (read_bundle(first.path).event_ts == NOW).all()


def test_build_from_parquet(tmp_path: Path, reg: Path) -> None:
    df = frame()
    df["computed_at"] = pd.to_datetime(df["computed_at"])
    df.to_parquet(tmp_path / "x.parquet")
    res = build(
        reg, SET, "1", source=tmp_path / "x.parquet", entity_key="camera", event_ts_col="computed_at", progress=False
    )
    assert read_bundle(res.path).info.rows == 6


def test_parquet_without_pyarrow_says_to_install_it(tmp_path: Path, reg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyarrow is a `cloud` dependency; a machine without it gets an actionable error, not a traceback."""
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail as if not installed
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match=r"needs pyarrow, which is not installed: `pip install pyarrow`"):
        build(reg, SET, "1", source=tmp_path / "x.parquet", entity_key="camera", progress=False)
    assert not (reg / "features" / SET / "1").exists()


def test_recipe_maintenance_matches_the_models_manifest(tmp_path: Path, reg: Path) -> None:
    res = build(reg, "asset_features", "1", recipe="maintenance", progress=False)
    b = read_bundle(res.path)
    manifest = json.loads((MODELS / "maintenance" / "1" / "manifest.json").read_text())
    assert list(b.info.feature_names) == manifest["feature_names"]["asset_features"]
    assert b.info.rows == 200 and b.info.entity_key == "asset_id" and b.values.dtype == np.float32
    history = generate()  # the recipe's default: the data the shipped model was trained on
    as_of = history["timestamp"].max()
    expected = asset_features(history, as_of)
    row = b.entities.tolist().index("asset-17")
    np.testing.assert_array_equal(b.values[row], expected.loc["asset-17"].to_numpy())
    assert (b.event_ts == pd.Timestamp(as_of, tz="UTC").timestamp()).all()

    # From a history file, as of a chosen time.
    small = generate(n_assets=5, days=10, seed=4)
    small.to_csv(tmp_path / "history.csv", index=False)
    res2 = build(
        reg,
        "asset_features",
        "2",
        recipe="maintenance",
        history=tmp_path / "history.csv",
        as_of="2024-01-08 06:00",
        progress=False,
    )
    b2 = read_bundle(res2.path)
    want = asset_features(small, "2024-01-08 06:00")
    assert b2.entities.tolist() == sorted(want.index) and b2.info.rows == 5
    np.testing.assert_allclose(b2.values, want.loc[b2.entities.tolist()].to_numpy(), rtol=1e-5)


def test_recipe_refuses_a_registered_maintenance_model_with_other_features(tmp_path: Path, reg: Path) -> None:
    model = reg / "maintenance" / "1"
    model.mkdir(parents=True)
    for f in (MODELS / "maintenance" / "1").iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["feature_names"]["asset_features"] = manifest["feature_names"]["asset_features"][::-1]
    manifest.pop("feature_joins", None)
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="registered maintenance model 1 expects"):
        build(reg, "asset_features", "1", recipe="maintenance", progress=False)
    assert not (reg / "features").exists() or not FeatureRegistry(reg).versions("asset_features")


BAD_BUILDS = [
    (
        "text column",
        lambda df: df.assign(site="north"),
        {},
        r"column 'site' \(dtype \w+, e.g. 'north'\) is not numeric",
    ),
    ("bool column", lambda df: df.assign(ok=True), {}, r"column 'ok' \(dtype bool, e.g. True\) is not numeric"),
    (
        "NaN",
        lambda df: df.assign(fps_mean=df.fps_mean.where(df.camera != "cam-4")),
        {},
        r"missing value \(NaN\) in column 'fps_mean' for entity 'cam-4' \(row 5",
    ),
    ("duplicate", lambda df: pd.concat([df, df.iloc[[2]]]), {}, r"duplicate entity 'cam-2' in rows \[3, 7\]"),
    ("no entity column", lambda df: df, {"entity_key": "asset"}, r"has no entity column 'asset' \(columns: 'camera'"),
    ("no ts column", lambda df: df, {"event_ts_col": "when"}, r"has no event-ts column 'when'"),
    (
        "bad ts",
        lambda df: df.assign(computed_at=df.computed_at.where(df.camera != "cam-1", "yesterday")),
        {},
        r"event time 'yesterday' of entity 'cam-1' \(row 2, column 'computed_at'\)",
    ),
    (
        "empty id",
        lambda df: df.assign(camera=df.camera.where(df.camera != "cam-0", None)),
        {},
        r"entity column 'camera' is empty in row 1",
    ),
    ("only ids", lambda df: df[["camera"]], {"event_ts_col": None}, r"no feature columns besides 'camera'"),
    ("no rows", lambda df: df.iloc[:0], {}, r"has no rows"),
    ("floats as int64", lambda df: df, {"dtype": "int64"}, r"columns 'fps_mean' hold floats"),
    ("float32 overflow", lambda df: df.assign(fps_mean=1e300), {}, r"value too large for float32 in column 'fps_mean'"),
    ("unknown recipe", None, {"recipe": "weather"}, r"unknown recipe 'weather'; recipes: maintenance"),
    ("both sources", lambda df: df, {"recipe": "maintenance"}, r"exactly one of --from FILE"),
    ("no entity key", lambda df: df, {"entity_key": None}, r"--from needs --entity-key COL"),
    ("bad version", lambda df: df, {"version": "v2"}, r"invalid version 'v2'"),
    ("bad set", lambda df: df, {"set_name": "a/b"}, r"invalid feature set name 'a/b'"),
    ("bad ttl", lambda df: df, {"ttl_s": 0}, r"ttl 0 s must be a positive number"),
    ("bad policy", lambda df: df, {"stale_policy": "maybe"}, r"stale policy 'maybe' is not one of"),
    ("unsupported file", "x.json", {}, r"unsupported input .*x.json: use a .csv or .parquet file"),
    ("missing file", "nope.csv", {}, r"input file not found: .*nope.csv"),
]


@pytest.mark.parametrize("change,extra,message", [b[1:] for b in BAD_BUILDS], ids=[b[0] for b in BAD_BUILDS])
def test_bad_build_input_is_a_clear_error_and_writes_nothing(
    tmp_path: Path, reg: Path, change, extra: dict, message: str
) -> None:
    args = {"set_name": SET, "version": "1", "entity_key": "camera", "event_ts_col": "computed_at"}
    args.update(extra)
    if extra.get("recipe"):
        src = None if change is None else write_csv(frame(), tmp_path / "in.csv")
        if change is None:
            args.pop("entity_key"), args.pop("event_ts_col")
    elif isinstance(change, str):
        src = tmp_path / change
        if change.endswith(".json"):
            src.write_text("{}")
    else:
        src = write_csv(change(frame()), tmp_path / "in.csv")
    with pytest.raises(InputError, match=message):
        build(reg, args.pop("set_name"), args.pop("version"), source=src, progress=False, **args)
    assert not (reg / "features").exists() or not any((reg / "features").rglob("bundle.json"))


# -- delta and partition arithmetic ------------------------------------------------------------
def test_compute_delta_upserts_changes_and_deletes_what_is_gone() -> None:
    def rows(ids: list[str], vals: list[float], ts: list[float]) -> Rows:
        return Rows(np.array(ids), np.array(ts, dtype="<f8"), np.array(vals, dtype="<f4").reshape(-1, 1))

    base = rows(["a", "b", "c", "d"], [1, 2, 3, 4], [0, 0, 0, 0])
    new = rows(["a", "b", "d", "e"], [1, 5, 4, 6], [0, 0, 9, 0])  # b value, d event_ts, e new, c gone
    d = compute_delta(base, new)
    assert d.entities.tolist() == ["b", "d", "e"] and d.deleted.tolist() == ["c"]
    assert d.values[:, 0].tolist() == [5, 4, 6] and d.event_ts.tolist() == [0, 9, 0]
    same = compute_delta(base, base)
    assert len(same.entities) == 0 and len(same.deleted) == 0


@pytest.mark.parametrize(
    "text,message",
    [
        ("entity,partition\ncam-0,device:d1\ncam-0,device:d2\n", "mapped twice"),
        ("entity,partition\ncam-0,site:north\n", "must be device:<id> or group:<name>"),
        ("entity,partition\ncam-0,device:a/b\n", "invalid device name"),
        ("entity,part\ncam-0,device:d1\n", "expected the columns entity,partition"),
        ("entity,partition\n", "has no rows"),
        ("", "is empty"),
    ],
)
def test_bad_partition_maps(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "map.csv").write_text(text)
    with pytest.raises(InputError, match=message):
        read_partition_map(tmp_path / "map.csv")
