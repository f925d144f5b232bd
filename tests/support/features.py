"""Feature bundles over the air, both sides: the cloud's ``features push`` steps and a device with a feature cache.

``publish_features`` builds and retains a signed features release the way ``cloud-batch features push``
does; ``FeatureDevice`` is ``tests.support.ota.Device`` with a ``FeatureCache`` and a group. Shared by
``tests/test_features_ota.py`` and ``tests/test_features_ota_rejects.py``.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cloud_batch.fleetops.publish import publish_artifact
from edge_agent.features.cache import DB_FILE, FeatureCache
from edge_agent.features.schema import table
from edge_agent.wire.protocol import Artifact, Release, UpdateReport, encode, pack_dir
from edge_agent.wire.signing import sign
from edge_agent.wire.topics import features_topic
from tests.support.bundles import write_rows
from tests.support.ota import CHUNK, FLEET, Cloud, Device

SET = "asset_features"
NAMES = ["temp_mean", "vib_std", "rpm_mean"]
GROUP = "line-3"


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
    """``tests.support.ota.Device`` with a feature cache and a group."""

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


V1 = {"a-1": [1, 2, 3], "a-2": [4, 5, 6], "a-3": [7, 8, 9], "a-4": [10, 11, 12]}


def applied(dev: FeatureDevice, cloud: Cloud, path: Path, **kw: Any) -> UpdateReport:
    doc = publish_features(cloud, path, **kw)
    report = wait_feature_result(cloud, dev.device_id, doc["release_id"], doc["name"])
    assert (report.state, report.result) == ("committed", "success"), report.reason
    return report
