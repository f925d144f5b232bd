"""Over-the-air model updates end to end: a real mosquitto, real stores, the TFLite runtime and the child validator.

A "cloud" MQTT client publishes signed releases (chunks with ``transfer.publish_artifact``, the
release document retained) and watches the device's retained state; a "device" runs
``OtaAgent`` with a real ``ModelStore`` and ``ModelServer``. Only the maintenance-window tests
inject a clock. Rejected releases and bad artifacts are in ``test_ota_rejects.py``.
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

import numpy as np
import pytest

from edge_agent.inference.modelpack import build_version_dir, verify_version_dir
from edge_agent.wire.protocol import Artifact
from tests.broker import Broker
from tests.support.ota import COMMITTED_PATH, FLEET, Cloud, Device
from tests.support.shared import built_once

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
    Built with TensorFlow in a subprocess (the test process must not import TensorFlow), once per run.
    """

    def build(root: Path) -> None:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
        proc = subprocess.run(
            [sys.executable, "-c", PROBE_BUILD, str(root)], capture_output=True, text=True, timeout=300, env=env
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    models = built_once(tmp_path_factory, "probe", build)
    root = tmp_path_factory.mktemp("probe")
    x = np.random.default_rng(1).random((1, 8, 8, 1)).astype(np.float32)
    dirs = {}
    for version, model in (("1", "good"), ("2", "batch_one")):
        dirs[version] = root / version
        build_version_dir(
            models / f"{model}.tflite", dirs[version], name="probe", version=version, golden_inputs={"pixels": x}
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
