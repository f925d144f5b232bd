"""Feature bundles over the air: a real mosquitto, a real SQLite feature cache, the same update state machine as models.

The "cloud" builds releases the way ``cloud-batch features push`` does (``bundle.write_bundle`` →
``protocol.pack_dir`` → ``transfer.publish_artifact`` → ``signing.sign`` → retained on
``topics.features_topic``) and reads the device's retained state; the "device" is
``tests.support.ota.Device`` (store, model server, MQTT link, OtaAgent) with a ``FeatureCache``
(both in ``tests.support.features``). Releases that must not apply are in
``test_features_ota_rejects.py``; kill -9 during a large apply in ``test_features_ota_kill9.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.wire.protocol import DeviceState, UpdateReport, encode
from tests.broker import Broker
from tests.support.features import GROUP, SET, V1, FeatureDevice, applied, bundle, publish_features, wait_feature_result
from tests.support.ota import CHUNK, COMMITTED_PATH, FLEET, Cloud


@pytest.fixture
def device_class() -> type[FeatureDevice]:
    """``make_device`` (tests/conftest.py) builds feature devices in this module."""
    return FeatureDevice


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


# -- end to end: cloud-batch features build/push → OTA → a joined request ---------------------------------
def test_cloud_batch_push_reaches_the_device_and_feeds_a_joined_request(
    broker: Broker, tmp_path: Path, digits_dir: Path, cloud_link: Any
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
        push(reg, SET, "1", FLEET, key, cloud_link, chunk_size=CHUNK, progress=False)
        wait = Cloud(broker.url, Ed25519PrivateKey.generate())  # only reads the device's state
        try:
            wait.wait(lambda: (s := wait.states.get(dev.device_id)) and s.features.get(SET) == "1", "version 1")
            build(reg, SET, "2", recipe="maintenance", n_assets=6, days=10, seed=4, as_of="2024-01-10", progress=False)
            push(reg, SET, "2", FLEET, key, cloud_link, delta_from="1", chunk_size=CHUNK, progress=False)
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
