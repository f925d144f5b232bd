"""``cloud-batch features build`` and ``features push`` against the registry on disk and a real mosquitto.

What the broker holds after a push is read back by a separate MQTT client: the signed release
(verifies with the public key, parses, kind "features", the partition of its topic) and the
retained chunks, which reassemble and unpack into a bundle ``read_bundle`` accepts and a device's
``FeatureCache`` applies. Every bad input fails with a clear error before anything is written
or published.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cloud_batch.cli import features as features_cli
from cloud_batch.cli.main import build_parser as cloud_parser
from cloud_batch.errors import BrokerUnreachableError, CloudError, InputError, RegistryError
from cloud_batch.features.build import FeatureRegistry, build
from cloud_batch.features.delta import Rows, compute_delta, read_partition_map
from cloud_batch.features.push import push
from cloud_batch.train.maintenance_data import generate
from cloud_batch.train.maintenance_features import asset_features
from edge_agent.features.cache import FeatureCache
from edge_agent.wire.bundle import read_bundle
from edge_agent.wire.protocol import Artifact, Release, pack_dir, unpack_to
from edge_agent.wire.signing import load_public_key, verify
from edge_agent.wire.topics import features_topic, parse_chunk_topic
from tests.broker import Broker, retained
from tests.support.bad_inputs import case_ids, resolve_key
from tests.support.env import MODELS, free_port

FLEET = "plant-7"
SET = "cam_stats"
CHUNK = 512  # small bundles still become several chunks
NOW = 1_790_000_000.0
CLI = Path(sys.executable).parent / "cloud-batch"


# -- helpers -------------------------------------------------------------------------------
def released(held: dict[str, bytes], topic: str, pub: Path) -> Release:
    doc = json.loads(held[topic])
    verify(doc, [load_public_key(pub)])
    return Release.from_dict(doc)


def download(held: dict[str, bytes], art: Artifact, out: Path):
    """Reassemble an artifact from its retained chunks (each checked), unpack it and read the bundle."""
    chunks = []
    for i, digest in enumerate(art.chunks):
        data = held[f"edgefleet/v1/artifacts/{art.sha256}/{i}"]
        assert hashlib.sha256(data).hexdigest() == digest
        chunks.append(data)
    blob = b"".join(chunks)
    assert hashlib.sha256(blob).hexdigest() == art.sha256 and len(blob) == art.size
    (out.parent / f"{out.name}.tar").write_bytes(blob)
    assert sorted(unpack_to(out.parent / f"{out.name}.tar", out)) == ["bundle.json", "data.npz"]
    return read_bundle(out)


def chunk_shas(held: dict[str, bytes]) -> set[str]:
    return {p[0] for t in held if (p := parse_chunk_topic(t))}


def frame(n: int = 6, *, shift: float = 0.0, drop: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Per-camera stats; each row depends only on its camera's number, so versions differ only where asked."""
    ids = [f"cam-{i}" for i in range(n) if f"cam-{i}" not in drop] + list(extra)
    num = np.array([int(i.split("-")[1]) for i in ids])
    return pd.DataFrame(
        {
            "camera": ids,
            "fps_mean": (10 + (num * 7.3) % 20).round(3) + shift,
            "dropped_frames": (num * 37) % 100,
            "computed_at": [f"2026-11-0{1 + k % 9}T12:00:00Z" for k in num],
        }
    )


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path, index=False)
    return path


def build_csv(reg: Path, version: str, df: pd.DataFrame, tmp: Path, **kw):
    src = write_csv(df, tmp / f"in-{version}-{uuid.uuid4().hex[:6]}.csv")
    return build(reg, SET, version, source=src, entity_key="camera", event_ts_col="computed_at", progress=False, **kw)


def push_argv(reg: Path, key_files: tuple[Path, Path], url: str, *extra: str) -> list[str]:
    """``cloud-batch features push`` of version 1 to the test fleet, plus ``extra`` options."""
    where = ["--fleet", FLEET, "--registry", str(reg), "--key", str(key_files[0]), "--broker", url]
    return ["features", "push", SET, "--version", "1", *where, *extra]


@pytest.fixture
def reg(tmp_path: Path) -> Path:
    return tmp_path / "registry"


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


# -- push ------------------------------------------------------------------------------------------
def test_push_snapshot_publishes_a_signed_features_release_and_retained_chunks(
    broker: Broker, key_files: tuple[Path, Path], reg: Path, tmp_path: Path
) -> None:
    build_csv(reg, "1", frame(40), tmp_path)
    res = push(reg, SET, "1", FLEET, key_files[0], broker.url, chunk_size=CHUNK, progress=True)
    held = retained(broker.url)
    topic = features_topic(FLEET, SET)
    assert topic == f"edgefleet/v1/fleets/{FLEET}/features/{SET}/all/all" and [r.topic for r in res.releases] == [topic]
    rel = released(held, topic, key_files[1])
    assert (rel.kind, rel.name, rel.version, rel.fleet, rel.partition) == (
        "features",
        SET,
        "1",
        FLEET,
        {"by": "all", "key": "all"},
    )
    assert rel.release_id == res.releases[0].release.release_id and rel.release_id.startswith(f"{SET}-1-")
    assert rel.fallback is None and rel.artifact.chunk_size == CHUNK and len(rel.artifact.chunks) > 2
    assert rel.artifact.sha256 == hashlib.sha256(pack_dir(reg / "features" / SET / "1")).hexdigest()
    b = download(held, rel.artifact, tmp_path / "got")
    assert (b.info.kind, b.info.rows) == ("snapshot", 40)
    np.testing.assert_array_equal(b.values, read_bundle(reg / "features" / SET / "1").values)
    assert "pushed feature set cam_stats 1 to fleet plant-7: 1 release" in res.summary()

    # Pushing the same version again ships the same bytes: a device holding it sees nothing new.
    again = push(reg, SET, "1", FLEET, key_files[0], broker.url, chunk_size=CHUNK, progress=False)
    assert again.releases[0].release.artifact.sha256 == rel.artifact.sha256 and not again.cleared
    assert chunk_shas(retained(broker.url)) == {rel.artifact.sha256}


def test_push_delta_with_snapshot_fallback_and_superseded_artifacts_cleared(
    broker: Broker, key_files: tuple[Path, Path], reg: Path, tmp_path: Path
) -> None:
    v1 = frame(30)
    v2 = frame(30, drop=("cam-3", "cam-8"), extra=("cam-99", "cam-100"))
    v2.loc[v2.camera == "cam-5", "fps_mean"] += 1.0  # a changed value
    v2.loc[v2.camera == "cam-6", "computed_at"] = "2026-11-28T00:00:00Z"  # a newer observation, same value
    build_csv(reg, "1", v1, tmp_path)
    build_csv(reg, "2", v2, tmp_path)
    first = push(reg, SET, "1", FLEET, key_files[0], broker.url, chunk_size=CHUNK, progress=False)
    res = push(reg, SET, "2", FLEET, key_files[0], broker.url, delta_from="1", chunk_size=CHUNK, progress=False)

    held = retained(broker.url)
    rel = released(held, features_topic(FLEET, SET), key_files[1])
    assert rel.version == "2" and rel.fallback is not None
    delta_dir = reg / "features" / SET / "2.delta-from-1"
    assert res.releases[0].bundle_dir == delta_dir and delta_dir.is_dir()
    delta = download(held, rel.artifact, tmp_path / "delta")
    assert (delta.info.kind, delta.info.base_version, delta.info.version) == ("delta", "1", "2")
    assert delta.entities.tolist() == ["cam-100", "cam-5", "cam-6", "cam-99"]
    assert delta.deleted.tolist() == ["cam-3", "cam-8"]
    snap = download(held, rel.fallback, tmp_path / "fallback")
    assert (snap.info.kind, snap.info.version, snap.info.rows) == ("snapshot", "2", 30)
    assert rel.fallback.sha256 == hashlib.sha256(pack_dir(reg / "features" / SET / "2")).hexdigest()

    # Version 1's artifact is superseded and cleared; the delta's and the fallback's chunks stay.
    assert first.releases[0].release.artifact.sha256 in res.cleared
    assert chunk_shas(held) == {rel.artifact.sha256, rel.fallback.sha256}

    # A device on version 1 applies the delta; one on nothing applies the fallback: both end at version 2.
    with FeatureCache(tmp_path / "on-v1.db") as on_v1, FeatureCache(tmp_path / "fresh.db") as fresh:
        on_v1.apply(read_bundle(reg / "features" / SET / "1"))
        on_v1.apply(delta)
        fresh.apply(snap)
        want = read_bundle(reg / "features" / SET / "2")
        for cache in (on_v1, fresh):
            assert cache.version(SET) == "2"
            rows = cache.get_many(SET, want.entities.tolist(), now=NOW)
            np.testing.assert_array_equal(np.stack([r.values for r in rows]), want.values)
            assert cache.get(SET, "cam-3", now=NOW) is None


def test_push_with_a_partition_map_publishes_one_release_per_partition(
    broker: Broker, key_files: tuple[Path, Path], reg: Path, tmp_path: Path
) -> None:
    build_csv(reg, "1", frame(6), tmp_path)
    (tmp_path / "map1.csv").write_text(
        "entity,partition\ncam-0,device:dev-a\ncam-1,device:dev-a\ncam-2,device:dev-b\n"
        "cam-3,group:north\ncam-4,group:north\ncam-5,group:north\n"
    )
    first = push(
        reg,
        SET,
        "1",
        FLEET,
        key_files[0],
        broker.url,
        partition_map=tmp_path / "map1.csv",
        chunk_size=CHUNK,
        progress=False,
    )
    held = retained(broker.url)
    want = {
        ("device", "dev-a"): ["cam-0", "cam-1"],
        ("device", "dev-b"): ["cam-2"],
        ("group", "north"): ["cam-3", "cam-4", "cam-5"],
    }
    assert sorted(r.partition for r in first.releases) == sorted(want)
    for part, ents in want.items():
        rel = released(held, features_topic(FLEET, SET, *part), key_files[1])
        assert rel.partition == {"by": part[0], "key": part[1]} and rel.kind == "features" and rel.fallback is None
        assert f"{SET}-1-{part[0]}.{part[1]}-" in rel.release_id
        b = download(held, rel.artifact, tmp_path / f"p1-{part[1]}")
        assert b.entities.tolist() == ents and dict(b.info.partition) == {"by": part[0], "key": part[1]}
    assert features_topic(FLEET, SET) not in held

    # Version 2 with a delta: cam-1 moves to dev-b, cam-4 changes, cam-5 is gone.
    v2 = frame(6, drop=("cam-5",))
    v2.loc[v2.camera == "cam-4", "fps_mean"] += 2
    build_csv(reg, "2", v2, tmp_path)
    (tmp_path / "map2.csv").write_text(
        "entity,partition\ncam-0,device:dev-a\ncam-1,device:dev-b\ncam-2,device:dev-b\n"
        "cam-3,group:north\ncam-4,group:north\n"
    )
    res = push(
        reg,
        SET,
        "2",
        FLEET,
        key_files[0],
        broker.url,
        delta_from="1",
        partition_map=tmp_path / "map2.csv",
        chunk_size=CHUNK,
        progress=False,
    )
    held = retained(broker.url)
    expect = {  # partition: (upserts, deletions, fallback snapshot entities)
        ("device", "dev-a"): ([], ["cam-1"], ["cam-0"]),
        ("device", "dev-b"): (["cam-1"], [], ["cam-1", "cam-2"]),
        ("group", "north"): (["cam-4"], ["cam-5"], ["cam-3", "cam-4"]),
    }
    for part, (ups, dels, snap_ents) in expect.items():
        rel = released(held, features_topic(FLEET, SET, *part), key_files[1])
        d = download(held, rel.artifact, tmp_path / f"d2-{part[1]}")
        assert (d.info.kind, d.info.base_version, dict(d.info.partition)) == (
            "delta",
            "1",
            {"by": part[0], "key": part[1]},
        )
        assert (d.entities.tolist(), d.deleted.tolist()) == (ups, dels), part
        s = download(held, rel.fallback, tmp_path / f"s2-{part[1]}")
        assert s.info.kind == "snapshot" and s.entities.tolist() == snap_ents
    part_dir = reg / "features" / SET / "2.partitions"
    assert sorted(p.name for p in part_dir.iterdir()) == sorted(
        [f"{b}-{k}" for b, k in expect] + [f"{b}-{k}.delta-from-1" for b, k in expect]
    )
    # Every version-1 partition artifact was superseded and cleared.
    assert sorted(res.cleared) == sorted(r.release.artifact.sha256 for r in first.releases)
    assert chunk_shas(held) == {a.sha256 for r in res.releases for a in (r.release.artifact, r.release.fallback)}


BAD_PUSHES = [
    ({"set_name": "nosuch"}, RegistryError, "feature set 'nosuch' is not in the registry"),
    ({"version": "9"}, RegistryError, r"has no version '9' .*versions: \['1', '2'\]"),
    ({"version": "x"}, InputError, "invalid version 'x'"),
    ({"delta_from": "2", "version": "1"}, InputError, "--delta-from 2 is not older than version 1"),
    ({"delta_from": "2"}, InputError, "--delta-from 2 is not older than version 2"),
    ({"delta_from": "0.5"}, RegistryError, "has no version '0.5'"),
    ({"fleet": "a/b"}, InputError, "invalid fleet"),
    ({"key": "missing"}, InputError, "cannot read signing key"),
    ({"key": "public"}, InputError, "cannot read signing key"),
    ({"partition_map": "missing"}, InputError, "partition map not found"),
    (
        {"partition_map": "entity,partition\ncam-0,device:d1\n"},
        InputError,
        r"does not place 5 of the 6 entities of cam_stats 2: 'cam-1', ",
    ),
    ({"partition_map": "entity,partition\ncam-0,shelf:1\n"}, InputError, "must be device:<id> or group:<name>"),
    ({"chunk_size": 0}, InputError, "chunk size 0 must be a positive"),
]


@pytest.mark.parametrize("change,error,message", BAD_PUSHES, ids=case_ids(BAD_PUSHES, 20))
def test_bad_push_input_is_a_clear_error_and_publishes_nothing(
    broker: Broker,
    key_files: tuple[Path, Path],
    reg: Path,
    tmp_path: Path,
    change: dict,
    error: type[CloudError],
    message: str,
) -> None:
    build_csv(reg, "1", frame(6), tmp_path)
    build_csv(reg, "2", frame(6, shift=1.0), tmp_path)
    args = {
        "set_name": SET,
        "version": "2",
        "fleet": FLEET,
        "key": key_files[0],
        "delta_from": None,
        "partition_map": None,
        "chunk_size": CHUNK,
    }
    args.update(change)
    resolve_key(args, key_files, tmp_path)
    if args["partition_map"] == "missing":
        args["partition_map"] = tmp_path / "nope.csv"
    elif isinstance(args["partition_map"], str):
        (tmp_path / "map.csv").write_text(args["partition_map"])
        args["partition_map"] = tmp_path / "map.csv"
    with pytest.raises(error, match=message):
        push(
            reg,
            args.pop("set_name"),
            args.pop("version"),
            args.pop("fleet"),
            args.pop("key"),
            broker.url,
            progress=False,
            **args,
        )
    assert retained(broker.url) == {}


def test_unreachable_broker_names_the_url_and_publishes_nothing(
    key_files: tuple[Path, Path], reg: Path, tmp_path: Path
) -> None:
    build_csv(reg, "1", frame(6), tmp_path)
    url = f"mqtt://127.0.0.1:{free_port()}"
    with pytest.raises(BrokerUnreachableError, match=f"cannot reach the MQTT broker at {url}"):
        push(reg, SET, "1", FLEET, key_files[0], url, connect_timeout_s=1.0, progress=False)


# -- CLI wiring ---------------------------------------------------------------------------------
def test_cli_build_and_push(
    broker: Broker, key_files: tuple[Path, Path], reg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_csv(frame(6), tmp_path / "stats.csv")
    assert (
        features_cli.main(
            [
                "features",
                "build",
                SET,
                "--version",
                "1",
                "--registry",
                str(reg),
                "--from",
                str(src),
                "--entity-key",
                "camera",
                "--event-ts-col",
                "computed_at",
                "--ttl-s",
                "86400",
                "--stale-policy",
                "serve",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"built: feature set {SET} version 1" in out and "6 entities (camera) x 2 features (float32)" in out
    assert read_bundle(reg / "features" / SET / "1").info.ttl_s == 86400

    assert features_cli.main(push_argv(reg, key_files, broker.url, "--no-progress")) == 0
    out = capsys.readouterr().out
    assert f"pushed feature set {SET} 1 to fleet {FLEET}" in out and features_topic(FLEET, SET) in out
    assert features_topic(FLEET, SET) in retained(broker.url)

    # Errors: `error: ...`, exit 2, no traceback.
    assert (
        features_cli.main(["features", "build", SET, "--version", "2", "--registry", str(reg), "--recipe", "weather"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: unknown recipe 'weather'; recipes: maintenance") and "Traceback" not in err
    assert features_cli.main(push_argv(reg, key_files, broker.url, "--delta-from", "1")) == 2
    assert capsys.readouterr().err == "error: --delta-from 1 is not older than version 1\n"


def test_every_features_command_has_help_ending_with_an_example() -> None:
    parser = cloud_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    features = sub.choices["features"]
    leaves = next(a for a in features._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert sorted(leaves) == ["build", "push"]
    for p in (features, *leaves.values()):
        tail = p.format_help().rstrip().rsplit("Example:", 1)
        assert len(tail) == 2, p.prog
        assert all(line.strip().startswith("cloud-batch features") for line in tail[1].strip().splitlines())
    for flag in (
        "--version",
        "--registry",
        "--from",
        "--entity-key",
        "--recipe",
        "--ttl-s",
        "--stale-policy",
        "--event-ts-col",
    ):
        assert flag in leaves["build"].format_help()
    for flag in ("--version", "--fleet", "--registry", "--key", "--broker", "--delta-from", "--partition-map"):
        assert flag in leaves["push"].format_help()


def test_console_script_wiring(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            str(CLI),
            "features",
            "build",
            "x",
            "--version",
            "1",
            "--registry",
            str(tmp_path),
            "--from",
            str(tmp_path / "nope.csv"),
            "--entity-key",
            "id",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr == f"error: input file not found: {tmp_path / 'nope.csv'}\n"
    proc = subprocess.run(
        [str(CLI), "features", "build", "x", "--version", "1", "--registry", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "one of the arguments --from --recipe is required" in proc.stderr
