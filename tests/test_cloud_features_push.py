"""``cloud-batch features push`` against the registry on disk and a real mosquitto.

What the broker holds after a push is read back by a separate MQTT client: the signed release
(verifies with the public key, parses, kind "features", the partition of its topic) and the
retained chunks, which reassemble and unpack into a bundle ``read_bundle`` accepts and a device's
``FeatureCache`` applies. Every bad push fails with a clear error before anything is published.
``features build`` is in ``test_cloud_features_build.py``, the CLI in ``test_cloud_features_cli.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_batch.cli.main import main as cloud_batch
from cloud_batch.errors import CloudError, InputError, RegistryError
from cloud_batch.features.push import push
from edge_agent.features.cache import FeatureCache
from edge_agent.wire.bundle import read_bundle
from edge_agent.wire.protocol import Artifact, Release, pack_dir, unpack_to
from edge_agent.wire.signing import load_public_key, verify
from edge_agent.wire.topics import features_topic, parse_chunk_topic
from tests.broker import Broker, retained
from tests.support.bad_inputs import case_ids, resolve_key
from tests.support.cloud_features import FLEET, NOW, SET, build_csv, frame
from tests.support.env import free_port

CHUNK = 512  # small bundles still become several chunks


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


# -- push ------------------------------------------------------------------------------------------
def test_push_snapshot_publishes_a_signed_features_release_and_retained_chunks(
    broker: Broker, key_files: tuple[Path, Path], reg: Path, tmp_path: Path, cloud_link: Any
) -> None:
    build_csv(reg, "1", frame(40), tmp_path)
    res = push(reg, SET, "1", FLEET, key_files[0], cloud_link, chunk_size=CHUNK, progress=True)
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
    again = push(reg, SET, "1", FLEET, key_files[0], cloud_link, chunk_size=CHUNK, progress=False)
    assert again.releases[0].release.artifact.sha256 == rel.artifact.sha256 and not again.cleared
    assert chunk_shas(retained(broker.url)) == {rel.artifact.sha256}


def test_push_delta_with_snapshot_fallback_and_superseded_artifacts_cleared(
    broker: Broker, key_files: tuple[Path, Path], reg: Path, tmp_path: Path, cloud_link: Any
) -> None:
    v1 = frame(30)
    v2 = frame(30, drop=("cam-3", "cam-8"), extra=("cam-99", "cam-100"))
    v2.loc[v2.camera == "cam-5", "fps_mean"] += 1.0  # a changed value
    v2.loc[v2.camera == "cam-6", "computed_at"] = "2026-11-28T00:00:00Z"  # a newer observation, same value
    build_csv(reg, "1", v1, tmp_path)
    build_csv(reg, "2", v2, tmp_path)
    first = push(reg, SET, "1", FLEET, key_files[0], cloud_link, chunk_size=CHUNK, progress=False)
    res = push(reg, SET, "2", FLEET, key_files[0], cloud_link, delta_from="1", chunk_size=CHUNK, progress=False)

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
    broker: Broker, key_files: tuple[Path, Path], reg: Path, tmp_path: Path, cloud_link: Any
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
        cloud_link,
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
        cloud_link,
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
    cloud_link: Any,
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
            cloud_link,
            progress=False,
            **args,
        )
    assert retained(broker.url) == {}


def test_unreachable_broker_names_the_url_and_publishes_nothing(
    key_files: tuple[Path, Path], reg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI opens the link once every input checked out; an unreachable broker is one error line."""
    build_csv(reg, "1", frame(6), tmp_path)
    url = f"mqtt://127.0.0.1:{free_port()}"
    args = ["features", "push", SET, "--version", "1", "--fleet", FLEET, "--registry", str(reg)]
    code = cloud_batch([*args, "--key", str(key_files[0]), "--broker", url, "--no-progress"])
    assert code != 0 and f"cannot reach the MQTT broker at {url}" in capsys.readouterr().err
