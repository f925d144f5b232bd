"""Feature OTA under kill -9: a device process killed while applying a large snapshot release, then resumed.

The device runs in a subprocess against a real mosquitto; it is killed inside the apply transaction and at a
random moment, and the cache must always hold exactly one complete version until the update commits.
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
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_batch.fleetops.publish import publish_artifact
from edge_agent.features.cache import DB_FILE, FeatureCache
from edge_agent.mqtt.link import MqttLink
from edge_agent.wire.protocol import Release, encode, pack_dir
from edge_agent.wire.signing import sign
from edge_agent.wire.topics import features_topic
from tests.broker import Broker
from tests.support.big_features import one_complete_version, write_big
from tests.support.ota import FLEET
from tests.support.wait import wait_for

REPO = Path(__file__).resolve().parents[1]


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

    def log() -> str:
        return f"seed {seed}: " + (tmp_path / f"device-{len(procs) - 1}.log").read_text()[-3000:]

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
            wait_for(lambda proc=proc: proc.poll() is not None, 120, "the kill", detail=log)
            assert proc.returncode == -signal.SIGKILL, log()
            r = record()
            assert r is not None and r["state"] == "activating" and len(r["history"]) > saves
            outcomes.append(_one_complete_version(db))
            assert outcomes[-1] == "1"  # the transaction never committed
        saves = len(record()["history"])  # type: ignore[index]
        timed = start(kill_at=0)
        wait_for(
            lambda: len((record() or {"history": []})["history"]) > saves, 120, "the resume", proc=timed, detail=log
        )
        time.sleep(rng.uniform(0.0, 0.5))
        timed.send_signal(signal.SIGKILL)
        timed.wait(timeout=10)
        outcomes.append(_one_complete_version(db))
        last = start(kill_at=0)
        wait_for(
            lambda: (r := record()) is not None and r["state"] == "committed",
            120,
            "the update to commit",
            proc=last,
            detail=log,
        )
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
