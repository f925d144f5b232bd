"""Over-the-air model updates end to end: a real mosquitto, real stores, the TFLite runtime and the child validator.

A "cloud" MQTT client publishes signed releases (chunks with ``transfer.publish_artifact``, the
release document retained) and watches the device's retained state; a "device" runs
``OtaAgent`` with a real ``ModelStore`` and ``ModelServer``. Only the maintenance-window tests
inject a clock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.inference.modelpack import build_version_dir, verify_version_dir
from edge_agent.wire.protocol import Artifact, iter_chunks, pack_dir
from edge_agent.wire.topics import chunk_topic
from tests.broker import Broker
from tests.support.models import BROKEN_MODEL_REASONS, crashing_model, replace_model
from tests.support.ota import CHUNK, COMMITTED_PATH, FLEET, Cloud, Device, relabel


# -- building candidates ---------------------------------------------------------------------
def tamper_golden(version_dir: Path) -> Path:
    with np.load(version_dir / "golden.npz") as data:
        samples = {k: data[k] for k in data.files}
    samples["out:probs"] = samples["out:probs"] + np.float32(0.25)
    with open(version_dir / "golden.npz", "wb") as fh:
        np.savez(fh, **samples)
    return version_dir


PROBE_BUILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    w = tf.constant((rng.standard_normal((64, 10)) * 0.1).astype(np.float32))

    class Probe(tf.Module):
        def __init__(self, batch_one):
            self.batch_one = batch_one

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32, name="pixels")])
        def __call__(self, pixels):
            flat = tf.reshape(pixels, [1, 64] if self.batch_one else [-1, 64])
            return {"probs": tf.nn.softmax(tf.matmul(flat, w))}

    for name, batch_one in (("good", False), ("batch_one", True)):
        m = Probe(batch_one)
        conv = tf.lite.TFLiteConverter.from_concrete_functions([m.__call__.get_concrete_function()], m)
        open(f"{sys.argv[1]}/{name}.tflite", "wb").write(conv.convert())
    """
)


@pytest.fixture(scope="session")
def probe_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``probe`` 1 (a plain dense model) and 2: the same, but its graph reshapes to a batch of exactly one.

    Version 2 passes validation (golden samples and warm-up use a batch of one) and then fails
    every real request with a batch of 8 inside the interpreter: a model that breaks in service.
    Built with TensorFlow in a subprocess (the test process must not import TensorFlow).
    """
    root = tmp_path_factory.mktemp("probe")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE_BUILD, str(root)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    x = np.random.default_rng(1).random((1, 8, 8, 1)).astype(np.float32)
    dirs = {}
    for version, model in (("1", "good"), ("2", "batch_one")):
        dirs[version] = root / version
        build_version_dir(
            root / f"{model}.tflite", dirs[version], name="probe", version=version, golden_inputs={"pixels": x}
        )
    return dirs


# -- the happy path ------------------------------------------------------------------------------
def test_a_release_is_downloaded_validated_activated_and_committed(
    cloud: Cloud, make_device: Callable[..., Device], v2: Path, broker: Broker
) -> None:
    dev = make_device()
    cloud.wait(lambda: cloud.states.get(dev.device_id), "the device's first state")
    assert cloud.states[dev.device_id].models == {"digits": "1"}
    doc = cloud.release(v2)
    report = cloud.wait_result(dev.device_id, doc["release_id"])
    assert (report.state, report.result, report.reason) == ("committed", "success", None)
    assert dev.server.get("digits").version == "2"
    # "committed" is saved and reported first, then its action marks the version good and cleans up.
    cloud.wait(
        lambda: "2" in dev.store.state("digits").good and not any((dev.data_dir / "downloads").iterdir()),
        "the commit's clean-up",
    )
    assert dev.store.active("digits") == "2"
    verify_version_dir(dev.store.version_dir("digits", "2"))
    assert ("digits", "1", "2") in dev.swaps
    # Every step was reported, in order.
    record = json.loads((dev.data_dir / "updates" / "digits.json").read_text())
    assert [s for s, _ in record["history"]] == COMMITTED_PATH
    assert record["details"]["validation"]["p50_ms"] > 0
    # The downloads and the staging copy are gone.
    assert not any((dev.data_dir / "downloads").iterdir()) and not any((dev.data_dir / "staging").iterdir())
    # A newcomer reads the retained state and presence: what the device runs and how its last update went.
    late = Cloud(broker.url, cloud.key)
    try:
        late.wait(lambda: late.states.get(dev.device_id) and late.presence.get(dev.device_id), "retained state")
        state = late.states[dev.device_id]
        assert state.models == {"digits": "2"} and state.fleet == FLEET
        assert state.updates["digits"].state == "committed" and state.updates["digits"].result == "success"
        assert late.presence[dev.device_id] == b"online"
    finally:
        late.close()


def test_requests_keep_succeeding_during_the_update(cloud: Cloud, make_device: Callable[..., Device], v2: Path) -> None:
    dev = make_device()
    x = np.random.default_rng(0).random((4, 8, 8, 1)).astype(np.float32) * 16
    stop = threading.Event()
    failures: list[str] = []
    versions: set[str] = set()
    calls = [0]

    def client() -> None:
        while not stop.is_set():
            try:
                model = dev.server.get("digits")
                out = model.predict({"pixels": x})["probs"]
                if out.shape != (4, 10):
                    failures.append(f"bad shape {out.shape}")
                versions.add(model.version)
                calls[0] += 1
            except Exception as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        doc = cloud.release(v2)
        report = cloud.wait_result(dev.device_id, doc["release_id"])
        cloud.wait(lambda: "2" in versions, "traffic on version 2")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert report.result == "success"
    assert failures == []
    assert versions == {"1", "2"} and calls[0] > 0


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


# -- signed rollback ---------------------------------------------------------------------------
def test_an_explicit_signed_rollback_is_accepted(
    cloud: Cloud, v2: Path, digits_dir: Path, make_device: Callable[..., Device]
) -> None:
    dev = make_device()
    assert cloud.wait_result(dev.device_id, cloud.release(v2)["release_id"]).result == "success"
    plain = cloud.release(digits_dir)  # version 1 again, not marked as a rollback
    report = cloud.wait_result(dev.device_id, plain["release_id"])
    assert report.result == "rejected" and "anti-rollback" in (report.reason or "")
    back = cloud.release(digits_dir, rollback=True)
    report = cloud.wait_result(dev.device_id, back["release_id"])
    assert report.result == "success", report.reason
    assert dev.store.active("digits") == "1" and dev.server.get("digits").version == "1"


# -- health window -----------------------------------------------------------------------------
def test_a_model_failing_in_service_is_rolled_back_by_the_health_window(
    cloud: Cloud, make_device: Callable[..., Device], probe_models: dict[str, Path]
) -> None:
    """Probe 2 validates (batch of one) but every batch-of-8 request fails in the interpreter.

    Clients alternate batches of 8 and of 1: on version 2 half the calls fail, and an
    interpreter whose ``allocate_tensors`` failed is reused for the next batch size (this
    used to segfault tflite-runtime, taking the whole agent down; see runtime._Session).
    """
    dev = make_device(install=[probe_models["1"]])
    rng = np.random.default_rng(2)
    batches = [rng.random((8, 8, 8, 1)).astype(np.float32), rng.random((1, 8, 8, 1)).astype(np.float32)]
    stop = threading.Event()
    outcomes: dict[str, list[int]] = {}

    def client() -> None:
        n = 0
        while not stop.is_set():
            model = dev.server.get("probe")
            ok = 1
            n += 1
            try:
                model.predict({"pixels": batches[n % 2]})
            except Exception:
                ok = 0
            outcomes.setdefault(model.version, []).append(ok)
            time.sleep(0.002)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        doc = cloud.release(probe_models["2"], health_window_s=30.0, max_error_rate=0.05)
        report = cloud.wait_result(dev.device_id, doc["release_id"], name="probe")
        cloud.wait(lambda: len(outcomes.get("1", [])) > 100, "traffic after the rollback")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert (report.state, report.result) == ("rolled_back", "rolled-back")
    assert "above the release's maximum error rate 5%" in (report.reason or "")
    assert dev.store.active("probe") == "1" and dev.server.get("probe").version == "1"
    assert "2" not in dev.store.state("probe").good
    assert 0 in outcomes["2"]  # it really failed in service...
    assert all(outcomes["1"][-100:])  # ...and version 1 serves cleanly again


# -- maintenance window and superseding ---------------------------------------------------------
class Clock:
    def __init__(self, hour: int, minute: int = 0) -> None:
        self.set(hour, minute)

    def set(self, hour: int, minute: int = 0) -> None:
        t = time.localtime()
        self.t = time.mktime((t.tm_year, t.tm_mon, t.tm_mday, hour, minute, 0, 0, 0, -1))

    def __call__(self) -> float:
        return self.t


def test_outside_the_window_it_downloads_and_validates_but_activates_only_in_the_window(
    cloud: Cloud, v2: Path, make_device: Callable[..., Device]
) -> None:
    clock = Clock(12)
    dev = make_device(now=clock)
    doc = cloud.release(v2, window="02:00-03:00")
    cloud.wait_result(dev.device_id, doc["release_id"], state="waiting_window")
    time.sleep(0.5)
    dev.nothing_installed(staged=True)  # validated and staged, not installed or activated
    assert any((dev.data_dir / "staging").iterdir())
    clock.set(2, 30)
    report = cloud.wait_result(dev.device_id, doc["release_id"])
    assert report.result == "success" and dev.server.get("digits").version == "2"


def test_an_urgent_release_supersedes_one_waiting_for_the_window(
    cloud: Cloud, v2: Path, make_device: Callable[..., Device]
) -> None:
    dev = make_device(now=Clock(12))
    waiting = cloud.release(v2, window="02:00-03:00")
    cloud.wait_result(dev.device_id, waiting["release_id"], state="waiting_window")
    urgent = cloud.release(v2, window="02:00-03:00", urgent=True, artifact=Artifact(**waiting["artifact"]))
    report = cloud.wait_result(dev.device_id, urgent["release_id"])
    assert report.result == "success" and dev.server.get("digits").version == "2"
    history = [s for s, _ in json.loads((dev.data_dir / "updates" / "digits.json").read_text())["history"]]
    assert "waiting_window" not in history


# -- rollouts ---------------------------------------------------------------------------------------
def test_the_rollout_gates_the_release_and_an_abort_rolls_it_back(
    cloud: Cloud, v2: Path, make_device: Callable[..., Device]
) -> None:
    dev = make_device()
    cloud.wait(lambda: cloud.states.get(dev.device_id), "the device's first state")
    release_id = f"digits-2-{uuid.uuid4().hex[:6]}"
    cloud.rollout("digits", release_id, percent=0)
    cloud.release(v2, release_id=release_id)
    time.sleep(1.5)  # settle time and more: a device outside the cohort must not start
    assert cloud.report(dev.device_id, "digits") is None
    dev.nothing_installed()

    cloud.rollout("digits", release_id, percent=100)
    assert cloud.wait_result(dev.device_id, release_id).result == "success"
    assert dev.server.get("digits").version == "2"

    cloud.rollout("digits", release_id, percent=100, status="aborted")
    report = cloud.wait_result(dev.device_id, release_id, state="rolled_back")
    assert report.result == "rolled-back" and "aborted" in (report.reason or "")
    assert dev.store.active("digits") == "1" and dev.server.get("digits").version == "1"
    # The aborted release stays retained; seeing it again changes nothing.
    dev.restart_agent()
    time.sleep(1.0)
    assert dev.store.active("digits") == "1" and cloud.report(dev.device_id, "digits") == report
