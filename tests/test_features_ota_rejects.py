"""Feature releases over the air that must not apply: unauthenticated, rejected, bad bundles, over the cache bound.

A real mosquitto and a real SQLite feature cache (``tests.support.features``): each case is dropped or
reported with its reason, and the cache keeps what it held.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.wire.topics import features_topic
from tests.support.features import (
    GROUP,
    SET,
    V1,
    FeatureDevice,
    applied,
    bundle,
    feature_report,
    publish_features,
    rewrite,
    wait_feature_result,
)
from tests.support.ota import FLEET, Cloud


@pytest.fixture
def device_class() -> type[FeatureDevice]:
    """``make_device`` (tests/conftest.py) builds feature devices in this module."""
    return FeatureDevice


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
