"""kill -9 during over-the-air updates: a real device process is killed at 20+ random points and always recovers.

The device is a separate process (``DEVICE`` below: MqttLink + ModelStore + ModelServer +
OtaAgent on a data dir, started the way the agent starts: store recovery, then
``OtaAgent.before_serving``, then the first model load) that serves the model and writes
what it served to ``probe.json``.
The cloud publishes four releases one after another; during each, the device is killed
with SIGKILL several times: after a random delay, or as soon as the update record on disk
shows a chosen state (downloading, validating, activating, health_check, rolling_back…).
After every kill the store on disk is intact (the active version and every installed version
verify, golden samples included), the restarted device serves a valid model, and in the end
every update finishes as it should: committed, or rolled back for the release whose health
window fails (a test-only health source in the device script counts every call of
version 4 as failed). The broker publishes the device's will (presence ``offline``) on the
kill and the restart announces ``online``. Downloads are bandwidth-limited and cut into
small chunks so they take a while and are resumed across kills.

``KILL9_SEED=<n>`` replays a run (the seed is printed on failure).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_batch.fleetops.publish import publish_artifact
from edge_agent.inference.modelpack import verify_version_dir
from edge_agent.models.store import ModelStore
from edge_agent.mqtt.link import MqttLink
from edge_agent.update.states import State
from edge_agent.wire.policy import Policy
from edge_agent.wire.protocol import Release, encode, pack_dir
from edge_agent.wire.signing import sign
from edge_agent.wire.topics import presence_topic, release_topic
from tests.broker import Broker
from tests.support.ota import relabel
from tests.support.wait import wait_for

FLEET = "kill9"
DEVICE_ID = "dev-k9"
REPO = Path(__file__).resolve().parents[1]

DEVICE = textwrap.dedent(
    """
    import json, logging, os, sys, time
    from pathlib import Path

    import numpy as np

    from edge_agent.fsutil import atomic_write_json
    from edge_agent.mqtt.link import MqttLink
    from edge_agent.config import OtaConfig
    from edge_agent.update.coordinator import OtaAgent, will_for
    from edge_agent.inference.runtime import RuntimeOptions
    from edge_agent.models.serving import ModelServer
    from edge_agent.wire.signing import load_public_key
    from edge_agent.models.store import ModelStore
    from edge_agent.update.seams import server_health

    cfg = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(name)s %(message)s")
    data = Path(cfg["data_dir"])
    store = ModelStore(data)
    store.recover()  # what the agent does on every start
    if not store.versions("digits"):
        store.install_dir(cfg["digits_dir"])
    server = ModelServer(store, RuntimeOptions(num_threads=1, pool_size=1), warmup_runs=1)

    real_health = server_health(server)

    def health(name):
        # Test-only seam: the "sick" version's calls all count as failures, so its health window breaches.
        version, calls, failures = real_health(name)
        return (version, calls, calls) if version == cfg["sick_version"] else (version, calls, failures)

    link = MqttLink(cfg["url"], cfg["device_id"], will=will_for(cfg["fleet"], cfg["device_id"]))
    options = OtaConfig(poll_s=0.05, rollout_settle_s=0.2, stall_timeout_s=2.0, retry_backoff_s=0.2,
                         bandwidth_bps=cfg["bandwidth_bps"], chunk_window=4)
    ota = OtaAgent(link, store, server, data, cfg["device_id"], cfg["fleet"], [load_public_key(cfg["pub"])],
                   options=options, health=health)
    ota.before_serving()  # count this start before loading anything (a candidate may be what crashed us)
    server.sync()
    server.start(0.05)
    link.start()
    ota.start()
    x = np.random.default_rng(0).random((1, 8, 8, 1)).astype(np.float32) * 16
    served = 0
    while True:  # the device's traffic: what it serves is written down for the test
        model = server.get("digits")
        model.predict({"pixels": x})
        served += 1
        atomic_write_json(data / "probe.json", {"pid": os.getpid(), "version": model.version, "served": served})
        time.sleep(0.05)
    """
)


class DeviceProcess:
    def __init__(self, cfg: dict[str, Any], log_dir: Path) -> None:
        self.cfg = cfg
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def data(self) -> Path:
        return Path(self.cfg["data_dir"])

    def start(self) -> None:
        self.starts += 1
        env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
        with open(self.log_dir / f"device-{self.starts:02d}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", DEVICE, json.dumps(self.cfg)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def record(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.data / "updates" / "digits.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def probe(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.data / "probe.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def wait_serving(self, timeout: float = 60) -> dict[str, Any]:
        """Block until this incarnation of the device answers requests; return what it served."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"device died: {self.last_log()}"
            p = self.probe()
            if p and p["pid"] == self.proc.pid:
                return p
            time.sleep(0.02)
        raise AssertionError(f"device did not serve within {timeout}s: {self.last_log()}")

    def last_log(self) -> str:
        return (self.log_dir / f"device-{self.starts:02d}.log").read_text()[-3000:]


def check_store_intact(data: Path) -> str:
    """Every installed version verifies (manifest, sha256, tensors, golden); return the active one."""
    store = ModelStore(data)
    active = store.active("digits")
    assert active is not None and active in store.versions("digits")
    for version in store.versions("digits"):
        verify_version_dir(store.version_dir("digits", version))
    return active


@dataclass
class Rig:
    device: DeviceProcess
    cloud: MqttLink  # the release job's connection
    key: Ed25519PrivateKey
    presence: list[bytes]  # the device's presence messages as the fleet sees them


@pytest.fixture
def rig(broker: Broker, tmp_path: Path, digits_dir: Path) -> Iterator[Rig]:
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "fleet.pub"
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    cfg = {
        "url": broker.url,
        "data_dir": str(tmp_path / "device"),
        "digits_dir": str(digits_dir),
        "pub": str(pub),
        "fleet": FLEET,
        "device_id": DEVICE_ID,
        "sick_version": "4",
        "bandwidth_bps": 20_000,
    }
    device = DeviceProcess(cfg, logs)
    cloud = MqttLink(broker.url, f"cloud-{uuid.uuid4().hex[:6]}")
    presence: list[bytes] = []
    cloud.subscribe(presence_topic(FLEET, DEVICE_ID), lambda t, p, r: presence.append(p))
    cloud.start()
    assert cloud.wait_connected(10)
    yield Rig(device, cloud, key, presence)
    device.stop()
    cloud.stop()


# How far along an update is ("kill at or after this state"): the device's own states, in their
# declared order except that rolling_back comes before every end (committed included).
ORDER = [s.value for s in State if s is not State.ROLLING_BACK]
ORDER.insert(ORDER.index(State.COMMITTED.value), State.ROLLING_BACK.value)
FINAL = {"committed", "rolled_back", "failed", "rejected"}
KILLS_PER_RELEASE = 6


def test_kill9_at_random_points_during_updates(rig: Rig, tmp_path: Path, digits_dir: Path) -> None:  # noqa: C901 (one scripted scenario reads best top to bottom)
    device, cloud, key = rig.device, rig.cloud, rig.key
    seed = int(os.environ.get("KILL9_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    # (version, expected final state, active version afterwards)
    plan = [
        ("2", "committed", "2"),
        ("3", "committed", "3"),
        ("4", "rolled_back", "3"),
        ("5", "committed", "5"),
        ("6", "committed", "6"),
    ]
    kills: list[str] = []

    device.start()
    device.wait_serving()
    for version, final, active_after in plan:
        vdir = relabel(digits_dir, tmp_path / f"v{version}", version)
        artifact = publish_artifact(cloud, pack_dir(vdir), 2048)
        rel = Release(
            release_id=f"digits-{version}-{uuid.uuid4().hex[:6]}",
            fleet=FLEET,
            name="digits",
            version=version,
            artifact=artifact,
            policy=Policy(health_window_s=2.0, max_error_rate=0.05),
            seq=int(version),  # the registry's counter: one per release, increasing
        )
        cloud.publish(release_topic(FLEET, "digits"), encode(sign(rel.to_dict(), key)), retain=True, wait_s=10)
        # Aim at states in lifecycle order (the update resumes in the state it was killed in, so an aim
        # is never left behind by an earlier kill); a state already passed becomes a random-delay kill.
        if final == "rolled_back":  # its health window breaches within a fraction of a second: aim at it
            aims = ["downloading", "validating", "health_check", "rolling_back", "rolling_back", "random"]
        else:
            aims = ["downloading", "downloading", "verifying", "validating", "activating", "health_check"]
            aims = sorted(rng.sample(aims, k=KILLS_PER_RELEASE - 1), key=ORDER.index)
            aims.insert(rng.randrange(len(aims) + 1), "random")

        def current(rel: Release = rel) -> dict[str, Any] | None:
            record = device.record()
            return record if record and record["release_id"] == rel.release_id else None

        saves_at_kill = -1  # history entries: one per state entered (a load alone adds none)
        for _ in range(KILLS_PER_RELEASE):
            record = current()
            state = record["state"] if record else "idle"
            if state in FINAL:
                break
            aims = [a for a in aims if a == "random" or ORDER.index(a) >= ORDER.index(state)]
            aim = aims.pop(0) if aims else "random"
            deadline = time.monotonic() + (rng.uniform(0.05, 1.0) if aim == "random" else 20)
            hit = "timer"
            while time.monotonic() < deadline:
                record = current()
                if record and record["state"] in FINAL:
                    hit = "missed"
                    break
                if aim != "random" and record and len(record["history"]) > saves_at_kill and record["state"] == aim:
                    hit = aim  # saved by this incarnation: its action is running now
                    if aim in ("downloading", "validating", "health_check"):  # long states: somewhere inside
                        time.sleep(rng.uniform(0, 0.2))
                    break
                if aim != "random" and record and ORDER.index(record["state"]) > ORDER.index(aim):
                    hit = "missed"
                    break
                time.sleep(0.002)
            on_disk = current()
            device.kill9()
            saves_at_kill = len(on_disk["history"]) if on_disk else -1
            if not kills:  # the broker tells the fleet: the device's will
                wait_for(lambda: rig.presence[-1:] == [b"offline"], 30, "presence offline after kill -9")
            kills.append(f"v{version} aim={aim} hit={hit} state={on_disk and on_disk['state']}")
            # The store is intact after every kill, whatever the moment...
            check_store_intact(device.data)
            # ...and the restarted device serves a verified version straight away.
            device.start()
            served = device.wait_serving()
            verify_version_dir(ModelStore(device.data).version_dir("digits", served["version"]))
            if len(kills) == 1:
                wait_for(lambda: rig.presence[-1:] == [b"online"], 30, "presence online after the restart")
        # Left alone, the update finishes the way it should.
        deadline = time.monotonic() + 60
        while True:
            record = current()
            if record and record["state"] in FINAL:
                break
            assert time.monotonic() < deadline, (
                f"seed {seed}: v{version} stuck in {record and record['state']}; kills: {kills}\n{device.last_log()}"
            )
            time.sleep(0.05)
        assert record["state"] == final, (
            f"seed {seed}: v{version} ended {record['state']}: {record['reason']}; kills: {kills}"
        )
        assert check_store_intact(device.data) == active_after
        deadline = time.monotonic() + 30
        while device.probe()["version"] != active_after:  # type: ignore[index]
            assert time.monotonic() < deadline, f"seed {seed}: device does not serve {active_after}"
            time.sleep(0.05)
        if final == "committed":  # the record is saved `committed` before its final action (mark good) runs
            good = lambda v=version: v in ModelStore(device.data).state("digits").good  # noqa: E731
            wait_for(good, 30, f"seed {seed}: v{version} marked good")

    print(f"seed {seed}; kills:\n  " + "\n  ".join(kills))
    assert len(kills) >= 20, f"seed {seed}: only {len(kills)} kills: {kills}"
    landed = {k.split("hit=")[1].split()[0] for k in kills}
    assert {"downloading", "validating", "health_check", "rolling_back"} <= landed, f"seed {seed}: kills: {kills}"
