"""Over-the-air model releases that must not take traffic: unauthenticated, rejected, or bad artifacts.

A real mosquitto, real stores, the TFLite runtime and the child validator: unauthenticated releases are
dropped and counted, rejected ones reported and final (across reconnects and restarts), and bad artifacts
fail before activation.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.wire.artifact import Artifact, iter_chunks
from edge_agent.wire.protocol import pack_dir
from edge_agent.wire.topics import chunk_topic
from tests.broker import Broker
from tests.support.models import BROKEN_MODEL_REASONS, crashing_model, replace_model
from tests.support.ota import CHUNK, Cloud, Device, relabel


# -- building candidates ---------------------------------------------------------------------
def tamper_golden(version_dir: Path) -> Path:
    with np.load(version_dir / "golden.npz") as data:
        samples = {k: data[k] for k in data.files}
    samples["out:probs"] = samples["out:probs"] + np.float32(0.25)
    with open(version_dir / "golden.npz", "wb") as fh:
        np.savez(fh, **samples)
    return version_dir


# -- rejections: final, reported, nothing installed -------------------------------------------
def _unsigned(cloud: Cloud, v2: Path, keys: dict[str, Any], tmp: Path) -> str:
    return cloud.release(v2, key=None)["release_id"]


def _untrusted(cloud: Cloud, v2: Path, keys: dict[str, Any], tmp: Path) -> str:
    return cloud.release(v2, key=keys["stranger"])["release_id"]


def _tampered(cloud: Cloud, v2: Path, keys: dict[str, Any], tmp: Path) -> str:
    return cloud.release(v2, after_sign=lambda d: d["policy"].update(urgent=True))["release_id"]


def _wrong_fleet(cloud: Cloud, v2: Path, keys: dict[str, Any], tmp: Path) -> str:
    return cloud.release(v2, fleet="plant-9")["release_id"]


def _not_newer(cloud: Cloud, v2: Path, keys: dict[str, Any], tmp: Path) -> str:
    return cloud.release(relabel(v2, tmp / "again1", "1"))["release_id"]


def _too_large(cloud: Cloud, v2: Path, keys: dict[str, Any], tmp: Path) -> str:
    big = relabel(v2, tmp / "big", "2")
    (big / "padding.bin").write_bytes(os.urandom(200_000))  # the device accepts 120 kB
    return cloud.release(big)["release_id"]


def _malformed_doc(cloud: Cloud, v2: Path, keys: dict[str, Any], tmp: Path) -> str:
    cloud.publish_release("digits", b'{"type": "release", "schema_version": 1, "release_id": "junk-1"}')
    return "junk-1"


def _not_json(cloud: Cloud, v2: Path, keys: dict[str, Any], tmp: Path) -> str:
    cloud.publish_release("digits", b"\x00\x01 definitely not json")
    return "?"


# Authentic releases that may not apply: rejected, and reported under their (proven) release id.
REJECTIONS = {
    "wrong fleet": (_wrong_fleet, "wrong fleet"),
    "anti-rollback": (_not_newer, "anti-rollback: version 1 is not newer than the active version 1"),
    "artifact too large": (_too_large, "too large"),
}
# Documents that are not authentic: dropped and counted, nothing of them reported (#14: a forged
# copy under a real release id must not overwrite that release's outcome).
UNAUTHENTICATED = {
    "unsigned": _unsigned,
    "untrusted key": _untrusted,
    "tampered document": _tampered,
    "malformed release": _malformed_doc,
    "not JSON": _not_json,
}


@pytest.mark.parametrize("case", list(UNAUTHENTICATED))
def test_unauthenticated_releases_are_dropped_counted_and_never_reported(
    case: str, cloud: Cloud, v2: Path, tmp_path: Path, make_device: Callable[..., Device], keys: dict[str, Any]
) -> None:
    dev = make_device()
    before = cloud.states.get(dev.device_id)
    UNAUTHENTICATED[case](cloud, v2, keys, tmp_path)
    cloud.wait(lambda: dev.dropped("release") >= 1, "the agent to drop the document")
    assert "digits" not in dev.ota.device_state().updates  # no "rejected" under a claimed id
    assert before is None or "digits" not in before.updates
    dev.nothing_installed()
    downloads = dev.data_dir / "downloads"
    assert not downloads.exists() or not any(downloads.iterdir()), "a dropped release downloaded something"
    assert not (dev.data_dir / "updates" / ".rejected.json").exists(), "junk reached the disk"


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_rejected_releases_are_reported_and_install_nothing(
    case: str, cloud: Cloud, v2: Path, tmp_path: Path, make_device: Callable[..., Device], keys: dict[str, Any]
) -> None:
    dev = make_device()
    build, reason = REJECTIONS[case]
    release_id = build(cloud, v2, keys, tmp_path)
    report = cloud.wait_result(dev.device_id, release_id)
    assert (report.state, report.result) == ("rejected", "rejected")
    assert reason in (report.reason or ""), report.reason
    dev.nothing_installed()
    downloads = dev.data_dir / "downloads"
    assert not downloads.exists() or not any(downloads.iterdir()), "a rejected release downloaded something"
    assert cloud.states[dev.device_id].models == {"digits": "1"}


def _publish_under(cloud: Cloud, blob: bytes, sha: str) -> None:
    for i, data in iter_chunks(blob, CHUNK):
        cloud.link.publish(chunk_topic(sha, i), data, retain=True, wait_s=10)


def _whole_sha_wrong(cloud: Cloud, v2: Path, tmp: Path) -> str:
    """Every chunk matches its hash but the signed whole-artifact sha256 does not match their concatenation."""
    blob = pack_dir(v2)
    real = Artifact.from_blob(blob, CHUNK)
    fake = Artifact(sha256="ab" * 32, size=real.size, chunk_size=CHUNK, chunks=real.chunks)
    _publish_under(cloud, blob, fake.sha256)
    return cloud.release(v2, artifact=fake)["release_id"]


def _inner_sha_wrong(cloud: Cloud, v2: Path, tmp: Path) -> str:
    bad = relabel(v2, tmp / "inner", "2", lambda m: m.update(sha256="0" * 64))
    return cloud.release(bad)["release_id"]


def _malformed_manifest(cloud: Cloud, v2: Path, tmp: Path) -> str:
    bad = relabel(v2, tmp / "malformed", "2", lambda m: m.update(inputs=[]))
    return cloud.release(bad)["release_id"]


def _version_mismatch(cloud: Cloud, v2: Path, tmp: Path) -> str:
    return cloud.release(v2, version="3")["release_id"]


def _golden_mismatch(cloud: Cloud, v2: Path, tmp: Path) -> str:
    return cloud.release(tamper_golden(relabel(v2, tmp / "golden", "2")))["release_id"]


def _segfaults(cloud: Cloud, v2: Path, tmp: Path) -> str:
    cand = relabel(v2, tmp / "segv", "2")
    replace_model(cand, crashing_model((v2 / "model.tflite").read_bytes()))
    return cloud.release(cand)["release_id"]


FAILURES = {
    "whole-artifact sha256 mismatch": (_whole_sha_wrong, "verifying", "artifact sha256 mismatch"),
    "inner manifest sha256 mismatch": (_inner_sha_wrong, "verifying", "sha256 mismatch"),
    "malformed manifest": (_malformed_manifest, "verifying", "manifest.inputs: expected a non-empty list"),
    "manifest is another version": (_version_mismatch, "verifying", "the artifact holds digits 2"),
    "golden samples differ": (_golden_mismatch, "validating", "golden output 'probs' differs"),
    "model segfaults the runtime": (_segfaults, "validating", BROKEN_MODEL_REASONS),  # crash or refusal
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_bad_artifacts_fail_before_activation_and_never_take_traffic(
    case: str, cloud: Cloud, v2: Path, tmp_path: Path, make_device: Callable[..., Device]
) -> None:
    dev = make_device()
    build, failed_in, reason = FAILURES[case]
    release_id = build(cloud, v2, tmp_path)
    report = cloud.wait_result(dev.device_id, release_id)
    assert (report.state, report.result) == ("failed", "failed")
    reasons = (reason,) if isinstance(reason, str) else reason
    assert any(r in (report.reason or "") for r in reasons), report.reason
    record = json.loads((dev.data_dir / "updates" / "digits.json").read_text())
    assert [s for s, _ in record["history"]][-2:] == [failed_in, "failed"]
    dev.nothing_installed()
    assert dev.swaps == [], "the candidate took traffic"


def test_a_rejection_is_final_across_reconnects_and_restarts(
    cloud: Cloud, v2: Path, broker: Broker, make_device: Callable[..., Device]
) -> None:
    dev = make_device()
    doc = cloud.release(v2, fleet="plant-9")  # authentic, for another fleet: a final rejection
    first = cloud.wait_result(dev.device_id, doc["release_id"])
    connects = dev.link.connects
    broker.restart()  # the retained release is delivered again on resubscribe
    cloud.wait(lambda: dev.link.connects > connects and dev.link.connected, "the device to reconnect")
    dev.restart_agent()  # and again to a fresh agent on the same data dir
    time.sleep(1.0)  # give a wrong implementation the time to reject it again
    assert cloud.report(dev.device_id, "digits") == first
    assert dev.ota.device_state().updates["digits"] == first
    dev.nothing_installed()
