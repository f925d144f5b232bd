"""Feature bundles over the air: a real mosquitto, a real SQLite feature cache, the same update state machine as models.

The "cloud" builds releases the way ``cloud-batch features push`` does (``bundle.write_bundle`` →
``protocol.pack_dir`` → ``transfer.publish_artifact`` → ``signing.sign`` → retained on
``topics.features_topic``) and reads the device's retained state; the "device" is
``tests.test_ota.Device`` (store, model server, MQTT link, OtaAgent) with a ``FeatureCache``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_batch.fleetops.publish import publish_artifact
from edge_agent.features.cache import DB_FILE, FeatureCache
from edge_agent.features.schema import table
from edge_agent.mqtt.link import MqttLink
from edge_agent.wire.protocol import Artifact, DeviceState, Release, UpdateReport, encode, pack_dir
from edge_agent.wire.signing import sign
from edge_agent.wire.topics import features_topic
from tests.broker import Broker
from tests.support.big_features import one_complete_version, write_big
from tests.support.bundles import write_rows
from tests.support.ota import CHUNK, COMMITTED_PATH, FLEET, Cloud, Device

SET = "asset_features"
NAMES = ["temp_mean", "vib_std", "rpm_mean"]
GROUP = "line-3"
REPO = Path(__file__).resolve().parents[1]


# -- the cloud side --------------------------------------------------------------------------
def bundle(tmp: Path, version: str, rows: dict[str, list[float]], *, set: str = SET, **kw: Any) -> Path:
    """A bundle of ``rows`` (kind, base, deleted, ttl_s … as ``write_rows`` takes them), written a minute ago."""
    path = tmp / f"{set}-{version}-{kw.get('kind', 'snapshot')}-{uuid.uuid4().hex[:4]}"
    kw.setdefault("ttl_s", 86400)
    return write_rows(path, set, version, rows, NAMES, event_ts=time.time() - 60, dtype="float32", **kw)


def rewrite(path: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> Path:
    """Change a bundle's arrays behind ``write_bundle``'s back (keeping bundle.json consistent): a bad bundle."""
    with np.load(path / "data.npz") as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    with open(path / "data.npz", "wb") as fh:
        np.savez(fh, **arrays)
    info = json.loads((path / "bundle.json").read_text())
    info["data_sha256"] = hashlib.sha256((path / "data.npz").read_bytes()).hexdigest()
    info["rows"] = len(arrays["entities"])
    (path / "bundle.json").write_text(json.dumps(info))
    return path


def publish_features(
    cloud: Cloud,
    path: Path,
    *,
    version: str | None = None,
    set: str = SET,
    partition: tuple[str, str] = ("all", "all"),
    topic_partition: tuple[str, str] | None = None,
    fallback: Path | None = None,
    key: Any = "default",
    fleet: str = FLEET,
    kind: str = "features",
    release_id: str | None = None,
    after_sign: Callable[[dict[str, Any]], None] | None = None,
    topic_set: str | None = None,
) -> dict[str, Any]:
    """What ``cloud-batch features push`` does: chunks retained, then the signed release retained on its partition."""
    info = json.loads((path / "bundle.json").read_text())
    artifact = publish_artifact(cloud.link, pack_dir(path), CHUNK)
    fb: Artifact | None = publish_artifact(cloud.link, pack_dir(fallback), CHUNK) if fallback is not None else None
    rel = Release(
        release_id=release_id or f"{set}-{version or info['version']}-{uuid.uuid4().hex[:6]}",
        fleet=fleet,
        name=set,
        version=version or info["version"],
        artifact=artifact,
        kind=kind,
        partition={"by": partition[0], "key": partition[1]},
        fallback=fb,
    )
    signer = cloud.key if key == "default" else key

    def build(seq: int) -> dict[str, Any]:  # the next seq of (fleet, features, set), as the registry issues it
        rel.seq = seq
        return sign(rel.to_dict(), signer) if signer is not None else rel.to_dict()

    doc = cloud.signed.issue(fleet, kind if kind == "model" else "features", set, build)
    if after_sign is not None:
        after_sign(doc)
    topic = features_topic(FLEET, topic_set or set, *(topic_partition or partition))
    cloud.link.publish(topic, encode(doc), retain=True, wait_s=10)
    return doc


def feature_report(cloud: Cloud, device_id: str, set: str = SET) -> UpdateReport | None:
    state = cloud.states.get(device_id)
    return state.feature_updates.get(set) if state else None


def wait_feature_result(cloud: Cloud, device_id: str, release_id: str, set: str = SET) -> UpdateReport:
    def done() -> UpdateReport | None:
        r = feature_report(cloud, device_id, set)
        return r if r is not None and r.release_id == release_id and r.result is not None else None

    return cloud.wait(done, f"{release_id} on {device_id} to finish")


# -- the device side -------------------------------------------------------------------------------
class FeatureDevice(Device):
    """``tests.test_ota.Device`` with a feature cache and a group."""

    def __init__(self, url: str, data_dir: Path, trusted: list[Any], install: list[Path], **kw: Any) -> None:
        self.cache = FeatureCache(data_dir / DB_FILE, max_rows=kw.pop("max_rows", None))
        super().__init__(url, data_dir, trusted, install, features=self.cache, groups=[GROUP], **kw)

    def restart_agent(self, **seams: Any) -> None:
        super().restart_agent(features=self.cache, groups=[GROUP], **seams)

    def close(self) -> None:
        super().close()
        self.cache.close()

    def rows(self, set: str = SET) -> dict[str, list[float]]:
        """Everything the cache holds for the set, as a reader sees it."""
        info = self.cache.set_info(set)
        if info is None:
            return {}
        with sqlite3.connect(self.cache.path) as conn:
            ents = [r[0] for r in conn.execute(f"SELECT entity FROM {table(set)} ORDER BY entity")]
        got = self.cache.get_many(set, ents)
        return {e: [round(float(v), 4) for v in r.values] for e, r in zip(ents, got, strict=True) if r is not None}

    def record(self, set: str = SET) -> dict[str, Any]:
        return json.loads((self.data_dir / "updates" / "features" / f"{set}.json").read_text())

    def nothing_left_over(self) -> None:
        for d in ("downloads", "staging"):
            path = self.data_dir / d
            assert not path.exists() or not any(path.iterdir()), f"{d} not cleaned up: {list(path.iterdir())}"


@pytest.fixture
def device_class() -> type[FeatureDevice]:
    """``make_device`` (tests/conftest.py) builds feature devices in this module."""
    return FeatureDevice


V1 = {"a-1": [1, 2, 3], "a-2": [4, 5, 6], "a-3": [7, 8, 9], "a-4": [10, 11, 12]}


def applied(dev: FeatureDevice, cloud: Cloud, path: Path, **kw: Any) -> UpdateReport:
    doc = publish_features(cloud, path, **kw)
    report = wait_feature_result(cloud, dev.device_id, doc["release_id"], doc["name"])
    assert (report.state, report.result) == ("committed", "success"), report.reason
    return report


# -- snapshot, delta, fallback ---------------------------------------------------------------------------
def test_a_snapshot_then_a_delta_are_applied_over_mqtt(
    cloud: Cloud, make_device: Callable[..., FeatureDevice], tmp_path: Path
) -> None:
    dev = make_device()
    first = cloud.wait(lambda: cloud.states.get(dev.device_id), "the device's first state")
    assert first.features == {} and first.models == {"digits": "1"}

    # A snapshot for this device's group.
    doc = publish_features(cloud, bundle(tmp_path, "1", V1), partition=("group", GROUP))
    report = wait_feature_result(cloud, dev.device_id, doc["release_id"])
    assert (report.state, report.result, report.reason, report.name, report.version) == (
        "committed",
        "success",
        None,
        SET,
        "1",
    )
    assert dev.rows() == V1
    record = dev.record()
    assert [s for s, _ in record["history"]] == COMMITTED_PATH
    assert record["kind"] == "features" and record["details"]["apply"]["rows"] == 4
    state = cloud.wait(lambda: (s := cloud.states[dev.device_id]).features == {SET: "1"} and s, "features in the state")
    assert state.models == {"digits": "1"} and "digits" not in state.feature_updates and SET not in state.updates

    # A delta for this device only: upserts (one changed, one new) and deletions.
    delta = bundle(
        tmp_path, "2", {"a-2": [40, 50, 60], "a-5": [13, 14, 15]}, kind="delta", base="1", deleted=("a-1", "a-4")
    )
    applied(dev, cloud, delta, partition=("device", dev.device_id))
    assert dev.rows() == {"a-2": [40, 50, 60], "a-3": [7, 8, 9], "a-5": [13, 14, 15]}
    assert dev.cache.version(SET) == "2"
    cloud.wait(lambda: cloud.states[dev.device_id].features == {SET: "2"}, "version 2 in the state")
    cloud.wait(lambda: not any((dev.data_dir / "downloads").iterdir()), "the clean-up")
    dev.nothing_left_over()
    assert dev.server.get("digits").version == "1"  # the model lane was never involved

    # The retained releases come again after a restart: nothing is applied twice.
    applies = len(dev.cache.history(SET))
    dev.restart_agent()
    time.sleep(1.0)
    assert len(dev.cache.history(SET)) == applies and dev.cache.version(SET) == "2"


def test_a_delta_on_the_wrong_base_falls_back_to_the_snapshot(
    cloud: Cloud, tmp_path: Path, make_device: Callable[..., FeatureDevice]
) -> None:
    dev = make_device()
    applied(dev, cloud, bundle(tmp_path, "1", V1))
    # Version 3 as a delta from 2 (which this device never got), with the full snapshot of 3 as fallback.
    v3 = {"a-2": [4, 5, 6], "a-9": [9, 9, 9]}
    delta = bundle(tmp_path, "3", {"a-9": [9, 9, 9]}, kind="delta", base="2", deleted=("a-3",))
    report = applied(dev, cloud, delta, fallback=bundle(tmp_path, "3", v3))
    assert dev.rows() == v3 and dev.cache.version(SET) == "3"
    record = dev.record()
    assert [s for s, _ in record["history"]] == [
        "idle",
        "downloading",
        "verifying",
        "validating",
        "downloading",
        "verifying",
        "validating",
        "activating",
        "health_check",
        "committed",
    ]
    assert "from asset_features 2 but the cache holds asset_features 1" in record["details"]["fallback"]
    assert record["details"]["bundle"]["kind"] == "snapshot" and report.reason is None
    assert dev.cache.history(SET, limit=1)[0]["kind"] == "snapshot"
    cloud.wait(lambda: not any((dev.data_dir / "downloads").iterdir()), "both downloads cleaned up")

    # A device that holds nothing yet takes the snapshot as well.
    fresh = make_device()
    wait_feature_result(cloud, fresh.device_id, report.release_id)
    assert fresh.rows() == v3


def test_a_delta_on_the_wrong_base_without_fallback_fails(
    cloud: Cloud, tmp_path: Path, make_device: Callable[..., FeatureDevice]
) -> None:
    dev = make_device()
    applied(dev, cloud, bundle(tmp_path, "1", V1))
    doc = publish_features(cloud, bundle(tmp_path, "3", {"a-9": [9, 9, 9]}, kind="delta", base="2"))
    report = wait_feature_result(cloud, dev.device_id, doc["release_id"])
    assert (report.state, report.result) == ("failed", "failed")
    assert "delta" in (report.reason or "") and "the release carries no fallback snapshot" in (report.reason or "")
    assert [s for s, _ in dev.record()["history"]][-2:] == ["validating", "failed"]
    assert dev.rows() == V1 and dev.cache.version(SET) == "1"
    cloud.wait(lambda: cloud.states[dev.device_id].features == {SET: "1"}, "the state")


def test_the_newest_release_wins_whatever_order_the_partitions_arrive_in(
    cloud: Cloud, tmp_path: Path, make_device: Callable[..., FeatureDevice]
) -> None:
    # Both retained before the device exists: it receives them in whatever order the broker sends.
    publish_features(cloud, bundle(tmp_path, "2", {"a-1": [2, 2, 2]}), partition=("all", "all"))
    newest = publish_features(cloud, bundle(tmp_path, "3", {"a-1": [3, 3, 3]}), partition=("group", GROUP))
    dev = make_device()

    def committed() -> bool:
        try:
            record = dev.record()
        except FileNotFoundError:
            return False
        return record["release_id"] == newest["release_id"] and record["state"] == "committed"

    cloud.wait(committed, "version 3 committed")
    time.sleep(1.0)  # time for the older release to arrive, if it came second
    assert dev.cache.version(SET) == "3" and dev.rows() == {"a-1": [3, 3, 3]}
    assert next(h["version"] for h in dev.cache.history(SET)) == "3"


# -- rejections: final, reported, nothing downloaded or applied -------------------------------------------
def _unsigned(cloud: Cloud, tmp: Path, dev: FeatureDevice, keys: dict[str, Any]) -> str:
    return publish_features(cloud, bundle(tmp, "2", V1), key=None)["release_id"]


def _untrusted(cloud: Cloud, tmp: Path, dev: FeatureDevice, keys: dict[str, Any]) -> str:
    return publish_features(cloud, bundle(tmp, "2", V1), key=keys["stranger"])["release_id"]


def _tampered(cloud: Cloud, tmp: Path, dev: FeatureDevice, keys: dict[str, Any]) -> str:
    def widen(doc: dict[str, Any]) -> None:
        doc["partition"] = {"by": "all", "key": "all"}

    # Signed for another group, then re-labelled for everyone: the signature no longer verifies.
    return publish_features(
        cloud, bundle(tmp, "2", V1), partition=("group", "line-9"), topic_partition=("all", "all"), after_sign=widen
    )["release_id"]


def _wrong_fleet(cloud: Cloud, tmp: Path, dev: FeatureDevice, keys: dict[str, Any]) -> str:
    return publish_features(cloud, bundle(tmp, "2", V1), fleet="plant-9")["release_id"]


def _wrong_partition(cloud: Cloud, tmp: Path, dev: FeatureDevice, keys: dict[str, Any]) -> str:
    # Signed for another device, published on this device's topic.
    return publish_features(
        cloud, bundle(tmp, "2", V1), partition=("device", "dev-other"), topic_partition=("device", dev.device_id)
    )["release_id"]


def _other_group(cloud: Cloud, tmp: Path, dev: FeatureDevice, keys: dict[str, Any]) -> str:
    return publish_features(
        cloud, bundle(tmp, "2", V1), partition=("group", "line-9"), topic_partition=("group", GROUP)
    )["release_id"]


def _not_newer(cloud: Cloud, tmp: Path, dev: FeatureDevice, keys: dict[str, Any]) -> str:
    return publish_features(cloud, bundle(tmp, "1", {"a-1": [0, 0, 0]}))["release_id"]


def _older(cloud: Cloud, tmp: Path, dev: FeatureDevice, keys: dict[str, Any]) -> str:
    return publish_features(cloud, bundle(tmp, "0.9", {"a-1": [0, 0, 0]}))["release_id"]


def _model_kind(cloud: Cloud, tmp: Path, dev: FeatureDevice, keys: dict[str, Any]) -> str:
    return publish_features(cloud, bundle(tmp, "2", V1), kind="model")["release_id"]


def _other_set(cloud: Cloud, tmp: Path, dev: FeatureDevice, keys: dict[str, Any]) -> str:
    return publish_features(cloud, bundle(tmp, "2", V1, set="other_set"), set="other_set", topic_set=SET)["release_id"]


def _too_large(cloud: Cloud, tmp: Path, dev: FeatureDevice, keys: dict[str, Any]) -> str:
    rng = np.random.default_rng(0)
    big = {f"e-{i:05d}": list(rng.random(3)) for i in range(12_000)}  # ~150 kB uncompressed; the device takes 120 kB
    return publish_features(cloud, bundle(tmp, "2", big, compress=False))["release_id"]


def _malformed(cloud: Cloud, tmp: Path, dev: FeatureDevice, keys: dict[str, Any]) -> str:
    cloud.link.publish(
        features_topic(FLEET, SET),
        b'{"type": "release", "schema_version": 1, "release_id": "junk-1"}',
        retain=True,
        wait_s=10,
    )
    return "junk-1"


# Not authentic: dropped and counted, never reported under the claimed id (#14).
UNAUTHENTICATED = {"unsigned": _unsigned, "untrusted key": _untrusted, "tampered partition": _tampered}
UNAUTHENTICATED["malformed"] = _malformed


@pytest.mark.parametrize("case", list(UNAUTHENTICATED))
def test_unauthenticated_feature_releases_are_dropped_and_apply_nothing(
    case: str, cloud: Cloud, tmp_path: Path, make_device: Callable[..., FeatureDevice], keys: dict[str, Any]
) -> None:
    dev = make_device()
    applied(dev, cloud, bundle(tmp_path, "1", V1))
    cloud.wait(lambda: not any((dev.data_dir / "downloads").iterdir()), "the first release's clean-up")
    first = feature_report(cloud, dev.device_id)
    UNAUTHENTICATED[case](cloud, tmp_path, dev, keys)
    cloud.wait(lambda: dev.dropped("release") >= 1, "the agent to drop the document")
    assert dev.ota.device_state().feature_updates[SET] == first  # the real outcome stands
    assert dev.rows() == V1 and dev.cache.version(SET) == "1"
    assert not any((dev.data_dir / "downloads").iterdir()), "a dropped release downloaded something"


REJECTIONS = {
    "wrong fleet": (_wrong_fleet, "wrong fleet"),
    "partition is not the topic's": (
        _wrong_partition,
        "wrong partition: the release is signed for device/dev-other but arrived on device/",
    ),
    "another group": (
        _other_group,
        "wrong partition: the release is signed for group/line-9 but arrived on group/line-3",
    ),
    "same version": (
        _not_newer,
        "anti-rollback: feature set asset_features version 1 is not newer than the cached version 1",
    ),
    "older version": (_older, "anti-rollback: feature set asset_features version 0.9 is not newer"),
    "kind model on a feature topic": (_model_kind, "a release of kind 'model' on a feature topic"),
    "another set's release": (
        _other_set,
        "release for feature set 'other_set' published on the topic of 'asset_features'",
    ),
    "too large": (_too_large, "too large: the artifact is"),
}


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_rejected_feature_releases_are_reported_and_apply_nothing(
    case: str, cloud: Cloud, tmp_path: Path, make_device: Callable[..., FeatureDevice], keys: dict[str, Any]
) -> None:
    dev = make_device()
    applied(dev, cloud, bundle(tmp_path, "1", V1))
    cloud.wait(lambda: not any((dev.data_dir / "downloads").iterdir()), "the first release's clean-up")
    build, reason = REJECTIONS[case]
    release_id = build(cloud, tmp_path, dev, keys)
    report = wait_feature_result(cloud, dev.device_id, release_id)
    assert (report.state, report.result) == ("rejected", "rejected")
    assert reason in (report.reason or ""), report.reason
    assert dev.rows() == V1 and dev.cache.version(SET) == "1"
    assert not any((dev.data_dir / "downloads").iterdir()), "a rejected release downloaded something"
    assert cloud.states[dev.device_id].features == {SET: "1"}


# -- bad bundles: found after the download, so the update fails (nothing applied) --------------------------
def _nan(tmp: Path) -> Path:
    def edit(a: dict[str, np.ndarray]) -> None:
        a["values"][1, 2] = np.nan

    return rewrite(bundle(tmp, "2", V1), edit)


def _duplicate_keys(tmp: Path) -> Path:
    def edit(a: dict[str, np.ndarray]) -> None:
        a["entities"][1] = a["entities"][0]

    return rewrite(bundle(tmp, "2", V1), edit)


def _bad_data_hash(tmp: Path) -> Path:
    path = bundle(tmp, "2", V1)
    info = json.loads((path / "bundle.json").read_text())
    info["data_sha256"] = "0" * 64
    (path / "bundle.json").write_text(json.dumps(info))
    return path


def _other_version_inside(tmp: Path) -> Path:
    return bundle(tmp, "5", V1)  # released as version 2 below


def _too_many_rows(tmp: Path) -> Path:
    return bundle(tmp, "2", {f"e-{i}": [i, i, i] for i in range(9)})  # the device holds at most 8 rows


def _partition_differs(tmp: Path) -> Path:
    return bundle(tmp, "2", V1, partition={"by": "group", "key": "line-9"})  # released for everyone


BAD_BUNDLES = {
    "NaN value": (_nan, "verifying", "rpm_mean of entity 'a-2' is nan; NaN and infinity are refused"),
    "duplicate entity ids": (_duplicate_keys, "verifying", "duplicate entity id 'a-1'"),
    "data does not match its hash": (_bad_data_hash, "verifying", "bundle.json says 000000000000"),
    "bundle is another version": (
        _other_version_inside,
        "verifying",
        "the artifact holds feature set asset_features version 5, the release says asset_features 2",
    ),
    "more rows than the device holds": (_too_many_rows, "verifying", "9 rows exceed this device's limit of 8"),
    "bundle's partition differs": (
        _partition_differs,
        "verifying",
        "is for partition group/line-9, the release for all/all",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BUNDLES))
def test_bad_bundles_fail_with_the_reason_and_apply_nothing(
    case: str, cloud: Cloud, tmp_path: Path, make_device: Callable[..., FeatureDevice]
) -> None:
    dev = make_device(max_rows=8)
    applied(dev, cloud, bundle(tmp_path, "1", V1))
    build, failed_in, reason = BAD_BUNDLES[case]
    doc = publish_features(cloud, build(tmp_path), version="2")
    report = wait_feature_result(cloud, dev.device_id, doc["release_id"])
    assert (report.state, report.result) == ("failed", "failed")
    assert reason in (report.reason or ""), report.reason
    assert [s for s, _ in dev.record()["history"]][-2:] == [failed_in, "failed"]
    assert dev.rows() == V1 and dev.cache.version(SET) == "1"
    cloud.wait(lambda: not any((dev.data_dir / "downloads").iterdir()), "the clean-up")
    dev.nothing_left_over()


def test_a_snapshot_above_the_cache_bound_fails_before_activation(
    cloud: Cloud, tmp_path: Path, make_device: Callable[..., FeatureDevice]
) -> None:
    dev = make_device(max_rows=6)
    applied(dev, cloud, bundle(tmp_path, "1", V1, set="other"), set="other")  # 4 rows of another set
    doc = publish_features(cloud, bundle(tmp_path, "1", {"x-1": [1, 1, 1], "x-2": [2, 2, 2], "x-3": [3, 3, 3]}))
    report = wait_feature_result(cloud, dev.device_id, doc["release_id"])
    assert (report.state, report.result) == ("failed", "failed")
    assert "the cache would hold 7 rows, above max_rows=6" in (report.reason or ""), report.reason
    assert [s for s, _ in dev.record()["history"]][-2:] == ["validating", "failed"]
    assert dev.cache.version(SET) is None and dev.cache.version("other") == "1"


# -- end to end: cloud-batch features build/push → OTA → a joined request ---------------------------------
def test_cloud_batch_push_reaches_the_device_and_feeds_a_joined_request(
    broker: Broker, tmp_path: Path, digits_dir: Path
) -> None:
    from cloud_batch.features.build import build
    from cloud_batch.features.push import push
    from cloud_batch.fleetops.keys import generate_keys
    from edge_agent.http.app import create_app
    from edge_agent.wire.bundle import read_bundle
    from edge_agent.wire.signing import load_public_key
    from tests.apiserver import ApiServer
    from tests.support.env import MODELS

    key, pub = generate_keys(tmp_path / "keys")
    reg = tmp_path / "registry"
    dev = FeatureDevice(
        broker.url, tmp_path / "device", [load_public_key(pub)], [digits_dir, MODELS / "maintenance" / "1"]
    )
    try:
        build(reg, SET, "1", recipe="maintenance", n_assets=6, days=10, seed=4, as_of="2024-01-09", progress=False)
        push(reg, SET, "1", FLEET, key, broker.url, chunk_size=CHUNK, progress=False)
        wait = Cloud(broker.url, Ed25519PrivateKey.generate())  # only reads the device's state
        try:
            wait.wait(lambda: (s := wait.states.get(dev.device_id)) and s.features.get(SET) == "1", "version 1")
            build(reg, SET, "2", recipe="maintenance", n_assets=6, days=10, seed=4, as_of="2024-01-10", progress=False)
            push(reg, SET, "2", FLEET, key, broker.url, delta_from="1", chunk_size=CHUNK, progress=False)
            report = wait.wait(
                lambda: (
                    (r := wait.states[dev.device_id].feature_updates.get(SET))
                    and r.version == "2"
                    and r.result is not None
                    and r
                ),
                "version 2's result",
            )
            assert wait.states[dev.device_id].features == {SET: "2"}
        finally:
            wait.close()
        assert (report.version, report.result) == ("2", "success")
        assert dev.cache.history(SET, limit=1)[0]["kind"] == "delta"  # it held version 1: the delta applied
        want = read_bundle(reg / "features" / SET / "2")
        np.testing.assert_array_equal(
            np.stack([r.values for r in dev.cache.get_many(SET, want.entities.tolist())]), want.values
        )

        live = np.asarray([[71.0, 3.2, 6.1, 1790.0]], np.float32)
        row = want.entities.tolist().index("asset-3")
        with ApiServer(create_app(dev.server, features=dev.cache)) as api:
            body = {
                "parameters": {"entity_id": "asset-3"},
                "inputs": [{"name": "live", "shape": [1, 4], "datatype": "FP32", "data": live.ravel().tolist()}],
            }
            status, _, raw = api.request("POST", "/v2/models/maintenance/infer", body)
        assert status == 200, raw
        resp = json.loads(raw)
        expected = dev.server.get("maintenance").predict({"live": live, "asset_features": want.values[row : row + 1]})
        np.testing.assert_array_equal(
            np.asarray(resp["outputs"][0]["data"], np.float32), expected["failure_prob"].ravel()
        )
        assert resp["parameters"]["features"][SET]["version"] == "2"
    finally:
        dev.close()


# -- records and documents -----------------------------------------------------------------------------
def test_feature_set_records_live_apart_from_model_records(tmp_path: Path) -> None:
    """A feature set may share its name with a model: each has its own record, lane and report."""
    from edge_agent.update.states import RecordStore, UpdateRecord

    records = RecordStore(tmp_path)
    records.save(UpdateRecord("m-1", "maintenance", "2", {}))
    records.save(UpdateRecord("f-1", "maintenance", "7", {}, kind="features"))
    assert records.names() == ["maintenance", "features:maintenance"]
    model, features = records.load("maintenance"), records.load("features:maintenance")
    assert model is not None and (model.kind, model.release_id, model.key) == ("model", "m-1", "maintenance")
    assert features is not None and (features.kind, features.release_id, features.key) == (
        "features",
        "f-1",
        "features:maintenance",
    )
    assert (tmp_path / "updates" / "features" / "maintenance.json").is_file()
    raw = json.loads(records.path("maintenance").read_text())
    del raw["kind"]  # a record written by an older agent
    records.path("maintenance").write_text(json.dumps(raw))
    assert records.load("maintenance").kind == "model"  # type: ignore[union-attr]


def test_device_state_documents_of_older_agents_still_parse() -> None:
    old = {
        "type": "device_state",
        "schema_version": 1,
        "device_id": "d",
        "fleet": "f",
        "models": {"digits": "2"},
        "updates": {},
        "agent_version": "0.1.0",
        "last_seen": 1.0,
    }
    state = DeviceState.from_dict(old)
    assert (state.models, state.features, state.feature_updates) == ({"digits": "2"}, {}, {})
    new = DeviceState(
        "d", "f", features={SET: "3"}, feature_updates={SET: UpdateReport("r", SET, "3", "committed", "success")}
    )
    assert DeviceState.from_dict(json.loads(encode(new.to_dict()))) == new


# -- kill -9 while a large snapshot is being applied -----------------------------------------------------
N = 120_000
KILL_DEVICE = textwrap.dedent(
    """
    import json, logging, os, signal, sys, time
    from pathlib import Path

    from edge_agent.features.cache import FeatureCache
    from edge_agent.mqtt.link import MqttLink
    from edge_agent.config import OtaConfig
    from edge_agent.update.coordinator import OtaAgent, will_for
    from edge_agent.inference.runtime import RuntimeOptions
    from edge_agent.models.serving import ModelServer
    from edge_agent.wire.signing import load_public_key
    from edge_agent.models.store import ModelStore

    cfg = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(name)s %(message)s")
    data = Path(cfg["data_dir"])
    store = ModelStore(data)
    store.recover()
    if not store.versions("digits"):
        store.install_dir(cfg["digits_dir"])
    server = ModelServer(store, RuntimeOptions(num_threads=1, pool_size=1), warmup_runs=1)
    cache = FeatureCache(data / "features.db")
    if cfg["kill_at"]:
        # SIGKILL from inside the apply transaction: the writer connection runs nothing else.
        calls = [0]

        def progress():
            calls[0] += 1
            if calls[0] == cfg["kill_at"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return 0

        cache._writer.set_progress_handler(progress, 1000)
    link = MqttLink(cfg["url"], cfg["device_id"], will=will_for(cfg["fleet"], cfg["device_id"]))
    ota = OtaAgent(link, store, server, data, cfg["device_id"], cfg["fleet"], [load_public_key(cfg["pub"])],
                   options=OtaConfig(poll_s=0.05, stall_timeout_s=2.0, retry_backoff_s=0.2), features=cache)
    ota.before_serving()
    server.sync()
    link.start()
    ota.start()
    print("started", flush=True)
    while True:
        time.sleep(1)
    """
)


def _big_bundle(tmp: Path, version: int) -> Path:
    return write_big(tmp / f"big-{version}", version, N)


def _one_complete_version(db: Path) -> str:
    return one_complete_version(db, N)


def test_kill9_during_the_apply_of_a_large_snapshot_release(broker: Broker, tmp_path: Path, digits_dir: Path) -> None:
    seed = int(os.environ.get("KILL9_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "fleet.pub"
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    data = tmp_path / "device"
    db = data / DB_FILE
    with FeatureCache(db) as cache:  # the device holds version 1 already
        cache.apply(_big_bundle(tmp_path, 1))
    cfg = {
        "url": broker.url,
        "data_dir": str(data),
        "digits_dir": str(digits_dir),
        "pub": str(pub),
        "fleet": FLEET,
        "device_id": "dev-fk9",
        "kill_at": 0,
    }
    cloud = MqttLink(broker.url, f"cloud-{uuid.uuid4().hex[:6]}")
    cloud.start()
    assert cloud.wait_connected(10)
    procs: list[subprocess.Popen[bytes]] = []

    def start(kill_at: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
        with open(tmp_path / f"device-{len(procs)}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", KILL_DEVICE, json.dumps({**cfg, "kill_at": kill_at})],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        procs.append(proc)
        return proc

    def record() -> dict[str, Any] | None:
        try:
            return json.loads((data / "updates" / "features" / "big.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def wait_for(pred: Callable[[], Any], what: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            log = (tmp_path / f"device-{len(procs) - 1}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"seed {seed}: timed out waiting for {what}\n{log}"
            assert proc.poll() is None or what == "the kill", f"seed {seed}: device died\n{log}"
            time.sleep(0.01)

    try:
        rel = Release(
            release_id=f"big-2-{uuid.uuid4().hex[:6]}",
            fleet=FLEET,
            name="big",
            version="2",
            artifact=publish_artifact(cloud, pack_dir(_big_bundle(tmp_path, 2))),
            kind="features",
            seq=1,  # the first release this fresh device sees
        )
        cloud.publish(features_topic(FLEET, "big"), encode(sign(rel.to_dict(), key)), retain=True, wait_s=30)
        outcomes = []
        # Twice killed from inside the apply transaction (certain: the writer runs nothing else), the
        # first time during the update's first activation, then during its resumed activation; then
        # once at a random moment of the resumed activation (re-reading the staged bundle, applying, done).
        for kill_at in (rng.randint(20, 400), rng.randint(20, 400)):
            saves = len((record() or {"history": []})["history"])
            proc = start(kill_at=kill_at)
            wait_for(lambda proc=proc: proc.poll() is not None, "the kill", proc)
            assert proc.returncode == -signal.SIGKILL, (tmp_path / f"device-{len(procs) - 1}.log").read_text()[-3000:]
            r = record()
            assert r is not None and r["state"] == "activating" and len(r["history"]) > saves
            outcomes.append(_one_complete_version(db))
            assert outcomes[-1] == "1"  # the transaction never committed
        saves = len(record()["history"])  # type: ignore[index]
        timed = start(kill_at=0)
        wait_for(lambda: len((record() or {"history": []})["history"]) > saves, "the resume", timed)
        time.sleep(rng.uniform(0.0, 0.5))
        timed.send_signal(signal.SIGKILL)
        timed.wait(timeout=10)
        outcomes.append(_one_complete_version(db))
        last = start(kill_at=0)
        wait_for(lambda: (r := record()) is not None and r["state"] == "committed", "the update to commit", last)
        assert _one_complete_version(db) == "2"
        final = record()
        assert final is not None and final["release_id"] == rel.release_id
        history = [s for s, _ in final["history"]]
        assert history.count("activating") >= 3 and history[-2:] == ["health_check", "committed"]
        assert not (data / "staging").exists() or not any((data / "staging").iterdir())
        print(f"seed {seed}: after the kills the cache held versions {outcomes}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        cloud.stop()
