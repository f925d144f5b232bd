"""Release → active on a real device, split into phases, beside a raw MQTT transfer of the same bytes.

    .venv/bin/python bench/ota_release_bench.py [--repeats 3]

A real mosquitto and a real `edge-agent run` process; `cloud_batch.fleetops.release.release()` publishes
digits (≈ 60 KB artifact) and a float32 MobileNetV2 (≈ 10 MB) as new versions. Phases come from the
device's persisted update record (the timestamp of each state it entered):

    release   the release() call: upload chunks, publish rollout + signed release, clear the old chunks
    to_start  release() called → device entered `downloading` (upload + receipt, signature, checks)
    transfer  downloading → verifying (chunks fetched, hashed, stored, assembled)
    verify    verifying → validating (whole sha256, unpack, manifest and model sha256)
    validate  validating → activating (isolated subprocess: load, golden samples, latency)
    swap      activating → health_check (install, atomic pointer switch, load + warm-up, serving)

The raw figure is a fresh MQTT subscriber fetching the same bytes as retained chunks of the same
size from the same broker (no hashing, no disk), i.e. the wire's floor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent

from cloud_batch.fleetops.broker import open_link  # noqa: E402
from cloud_batch.fleetops.keys import generate_keys  # noqa: E402
from cloud_batch.fleetops.publish import clear_artifact, publish_artifact  # noqa: E402
from cloud_batch.fleetops.release import release  # noqa: E402
from cloud_batch.registry.models import Registry  # noqa: E402
from edge_agent.mqtt.link import MqttLink  # noqa: E402
from edge_agent.wire.artifact import DEFAULT_CHUNK_SIZE  # noqa: E402
from edge_agent.wire.protocol import pack_dir  # noqa: E402
from edge_agent.wire.topics import chunk_filter  # noqa: E402
from tests.broker import Broker  # noqa: E402
from tests.support.env import free_port  # noqa: E402

PHASES = [
    ("to_start", None, "downloading"),
    ("transfer", "downloading", "verifying"),
    ("verify", "verifying", "validating"),
    ("validate", "validating", "activating"),
    ("swap", "activating", "health_check"),
]


def raw_fetch_s(broker_url: str, blob: bytes, chunk_size: int) -> float:
    """Seconds for a fresh subscriber to receive ``blob`` as retained chunks (wildcard subscription)."""
    pub = MqttLink(broker_url)
    pub.start()
    pub.wait_connected(10)
    art = publish_artifact(pub, blob, chunk_size)
    got: dict[str, int] = {}
    done = threading.Event()
    n = len(art.chunks)

    def on_msg(topic: str, payload: bytes, retained: bool) -> None:
        got[topic] = len(payload)
        if len(got) == n:
            done.set()

    sub = MqttLink(broker_url)
    t0 = time.perf_counter()
    sub.subscribe(chunk_filter(art.sha256), on_msg)
    sub.start()
    done.wait(120)
    elapsed = time.perf_counter() - t0
    assert sum(got.values()) == len(blob)
    sub.stop()
    clear_artifact(pub, art)
    pub.stop()
    return elapsed


def wait_state(path: Path, release_id: str, states: set[str], timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            rec = json.loads(path.read_text())
            if rec.get("release_id") == release_id and rec.get("state") in states:
                return rec
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {release_id} to reach {states}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    big = REPO / "bench" / "out" / "mobilenet_v2_f32.tflite"
    if not big.exists():
        subprocess.run([sys.executable, str(REPO / "bench" / "make_mobilenet.py"), str(big), "--float32"], check=True)

    work = Path(tempfile.mkdtemp(prefix="edgefleet-otabench-"))
    broker = Broker(work / "broker").start()
    key, pub = generate_keys(work / "keys")
    registry = Registry(work / "registry")
    versions = args.repeats + 1
    print("registering versions…", flush=True)
    for v in range(1, versions + 1):
        registry.register(
            REPO / "models" / "digits" / "1" / "model.tflite",
            "digits",
            str(v + 1),
            golden=REPO / "models" / "digits" / "1" / "golden.npz",
            rename_outputs={"output_0": "probs"},
        )
        registry.register(big, "mobilenet", str(v))
    data = work / "agent"
    subprocess.run(
        [
            str(BIN / "edge-agent"),
            "models",
            "install",
            str(registry.path("mobilenet", "1") / "model.tflite"),
            "--name",
            "mobilenet",
            "--version",
            "1",
            "--data-dir",
            str(data),
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env["EDGEFLEET_MODELS_DIR"] = str(REPO / "models")
    agent = subprocess.Popen(
        [
            str(BIN / "edge-agent"),
            "run",
            "--data-dir",
            str(data),
            "--listen",
            f"127.0.0.1:{port}",
            "--broker",
            broker.url,
            "--fleet",
            "bench",
            "--device-id",
            "dev-1",
            "--trust",
            str(pub),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    results: dict[str, list[dict[str, float]]] = {"digits": [], "mobilenet": []}
    sizes: dict[str, int] = {}
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(1.0)  # connected and subscribed
        for i in range(args.repeats):
            for name, version in (("digits", str(i + 3)), ("mobilenet", str(i + 2))):
                sizes[name] = len(pack_dir(registry.path(name, version)))
                t0 = time.time()
                with open_link(broker.url) as link:  # one connection per release, as `cloud-batch release`
                    rel = release(registry.root, name, version, "bench", key, link, health_window_s=0.5, progress=False)
                t_pub = time.time()
                rec = wait_state(data / "updates" / f"{name}.json", rel.release_id, {"health_check", "committed"})
                hist = {s: t for s, t in rec["history"]}
                row = {"release": t_pub - t0}
                for label, start, end in PHASES:
                    row[label] = hist[end] - (hist[start] if start else t0)
                row["total"] = hist["health_check"] - t0
                row["raw_mqtt"] = raw_fetch_s(broker.url, pack_dir(registry.path(name, version)), DEFAULT_CHUNK_SIZE)
                results[name].append(row)
                wait_state(data / "updates" / f"{name}.json", rel.release_id, {"committed"})
                print(name, {k: round(v * 1e3, 1) for k, v in row.items()}, flush=True)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)

    cols = ["release", "to_start", "transfer", "verify", "validate", "swap", "total", "raw_mqtt"]
    print(f"\n| model | artifact | {' | '.join(c + ' ms' for c in cols)} |")
    print("| --- | --- |" + " --- |" * len(cols))
    for name, rows in results.items():
        med = {c: statistics.median(r[c] for r in rows) * 1e3 for c in cols}
        print(f"| {name} | {sizes[name] / 1e6:.2f} MB | " + " | ".join(f"{med[c]:.1f}" for c in cols) + " |")
    print(
        f"\nmedian of {args.repeats} releases each; reproduce: .venv/bin/python bench/ota_release_bench.py "
        f"--repeats {args.repeats}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
