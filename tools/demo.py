"""`make demo`: the whole loop on this machine, with real processes and a real broker.

1. start a broker (mosquitto; the demo installs it with apt-get when missing, like `make test`);
2. start an edge agent connected to it, serving the shipped int8 digits model;
3. train, quantize and register digits v2 with `cloud-batch`, then sign and release it over MQTT;
4. the agent downloads, verifies, validates and hot-swaps to v2;
5. real predictions over the V2 API before and after;
6. `cloud-batch fleet status`;
7. build per-asset features from raw sensor history with `cloud-batch features build --recipe maintenance`,
   push them as a signed feature bundle, and make predictions that name only the asset: the agent joins
   the cached features into the maintenance model's input;
8. the field feeds the cloud: labeled traffic (predictions, then feedback labels over HTTP) flows from
   the agent's telemetry outbox over MQTT into `cloud-batch ingest` (whose persistent session was
   opened at the start, so the broker kept the batches for it), and `cloud-batch data summary` shows it.
9. a nightly batch: maintenance v2 (v1 plus a `precomputed` declaration) is released, `cloud-batch score`
   scores every asset into the `maintenance_scores` feature set and pushes it; the agent answers asset
   queries from those rows first, without running the interpreter (`source=precomputed`).
10. the nightly loop on that field data: `cloud-batch pipeline run` retrains digits, calibrates it,
   gates it against production (v2), registers and releases v3; the agent hot-swaps to it
   (docs/nightly.md). The report is copied out of the demo's temp dir and its path printed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Step 8's labeled traffic: every prediction keeps its inputs (sample_inputs = 1) and gets a label, and the
# images are a seeded choice, so the nightly run always trains on these same FIELD_ROWS rows; its data
# check asks for half of them (ingest is exactly once, so all arrive).
FIELD_ROWS = 40
SAMPLE_INPUTS = "1.0"


def free_port(preferred: int = 8080) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def http(method: str, url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"agent exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/v2/health/ready", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("agent did not become ready")


def start_broker(workdir: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        print("== mosquitto not found; installing it with apt-get")
        subprocess.run("apt-get update -qq && apt-get install -y -qq mosquitto", shell=True, check=True)
        binary = "/usr/sbin/mosquitto"
    port = free_port(1884)
    conf = workdir / "mosquitto.conf"
    conf.write_text(("user root\n" if os.geteuid() == 0 else "") + f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"mqtt://127.0.0.1:{port}"
        time.sleep(0.05)
    raise SystemExit("mosquitto did not start")


def predict(base: str, name: str, x: np.ndarray) -> tuple[str, np.ndarray, float]:
    meta = http("GET", f"{base}/v2/models/{name}")
    body = {
        "inputs": [
            {"name": meta["inputs"][0]["name"], "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    t0 = time.perf_counter()
    resp = http("POST", f"{base}/v2/models/{name}/infer", body)
    ms = (time.perf_counter() - t0) * 1e3
    out = resp["outputs"][0]
    return resp["model_version"], np.asarray(out["data"], dtype=np.float32).reshape(out["shape"]), ms


def show(title: str, version: str, probs: np.ndarray, truth: np.ndarray, ms: float) -> None:
    pred = probs.argmax(axis=1)
    print(f"== {title}: served by digits v{version} in {ms:.1f} ms")
    print("   predicted " + " ".join(str(p) for p in pred))
    print("   truth     " + " ".join(str(t) for t in truth))
    print(f"   accuracy {(pred == truth).mean():.2f}, mean confidence {probs.max(axis=1).mean():.3f}")


def run(*cmd: str) -> None:
    print("$ " + " ".join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd)))
    subprocess.run(cmd, check=True)


def publish(broker_url: str, registry: Path, keys: Path, *args: str) -> None:
    """``cloud-batch ARGS``, signed with the demo key and published from ``registry`` to fleet 'demo'."""
    target = ["--fleet", "demo", "--registry", str(registry), "--key", str(keys / "signing.key")]
    run(str(BIN / "cloud-batch"), *args, *target, "--broker", broker_url, "--no-progress")


def features_demo(base: str, broker_url: str, registry: Path, keys: Path, data_dir: Path) -> None:
    print("== cloud side: per-asset features from 60 days of raw sensor history (pandas), as a signed bundle")
    run(
        str(BIN / "cloud-batch"),
        "features",
        "build",
        "asset_features",
        "--version",
        "1",
        "--registry",
        str(registry),
        "--recipe",
        "maintenance",
        "--no-progress",
    )
    publish(broker_url, registry, keys, "features", "push", "asset_features", "--version", "1")
    deadline = time.time() + 60
    while time.time() < deadline:
        if http("GET", f"{base}/agent/status")["ota"].get("features", {}).get("asset_features") == "1":
            break
        time.sleep(0.2)
    print("== the device applied the bundle to its SQLite feature cache")
    run(str(BIN / "edge-agent"), "features", "list", "--data-dir", str(data_dir))
    run(str(BIN / "edge-agent"), "features", "get", "asset_features", "asset-17", "--data-dir", str(data_dir))
    meta = http("GET", f"{base}/v2/models/maintenance")
    print(
        f"== maintenance model inputs: {[t['name'] for t in meta['inputs']]}; joined from the cache: "
        f"{sorted(meta['parameters'].get('feature_joins', {}))}"
    )
    readings = {"normal reading": [65.0, 3.1, 6.0, 1790.0], "hot and vibrating": [88.0, 8.5, 6.9, 2150.0]}
    for asset in ("asset-17", "asset-42"):
        for label, live in readings.items():
            body = {
                "parameters": {"entity_id": asset},
                "inputs": [{"name": "live", "shape": [1, 4], "datatype": "FP32", "data": live}],
            }
            t0 = time.perf_counter()
            resp = http("POST", f"{base}/v2/models/maintenance/infer", body)
            ms = (time.perf_counter() - t0) * 1e3
            used = resp["parameters"]["features"]["asset_features"]
            print(
                f"   {asset}, {label:<17}: failure probability {resp['outputs'][0]['data'][0]:.3f} "
                f"(features v{used['version']}, {ms:.1f} ms)"
            )
    try:
        http(
            "POST",
            f"{base}/v2/models/maintenance/infer",
            {
                "parameters": {"entity_id": "asset-999"},
                "inputs": [{"name": "live", "shape": [1, 4], "datatype": "FP32", "data": readings["normal reading"]}],
            },
        )
    except urllib.error.HTTPError as exc:
        print(f"   asset-999 (not in the cache): HTTP {exc.code} {json.loads(exc.read())['error']}")


def precomputed_demo(base: str, broker_url: str, registry: Path, keys: Path, work: Path) -> None:
    """Nightly batch scores every asset into ``maintenance_scores``; the agent answers from them first."""
    from cloud_batch.train.maintenance.data import generate
    from cloud_batch.train.maintenance.features import live_readings

    shipped = REPO / "models" / "maintenance" / "1"
    m = json.loads((shipped / "manifest.json").read_text())
    fields = {k: m[k] for k in ("feature_joins", "feature_names", "validation")}
    fields |= {"outputs": {"output_0": "failure_prob"}}  # the .tflite's output tensor, named as v1 names it
    fields["precomputed"] = {"set": "maintenance_scores", "outputs": {"failure_prob": ["failure_prob"]}}
    fields["precomputed"]["max_age_s"] = 86400  # a nightly batch: older scores are not served
    (work / "maintenance-2.json").write_text(json.dumps(fields))
    print("== cloud side: maintenance v2 = v1 + a `precomputed` declaration (docs/models.md), released to the fleet")
    run(
        str(BIN / "cloud-batch"), "register", str(shipped / "model.tflite"), "--name", "maintenance", "--version", "2",
        "--registry", str(registry), "--golden", str(shipped / "golden.npz"), "--manifest", str(work / "maintenance-2.json"),
    )  # fmt: skip
    publish(broker_url, registry, keys, "release", "maintenance", "--version", "2", "--health-window-s", "1")
    history = generate()  # the sensor history the asset_features recipe used: each asset's latest reading
    live_readings(history, history["timestamp"].max()).reset_index().to_parquet(work / "live.parquet")
    print("== nightly batch: score every asset with maintenance v2 (the device's int8 runtime), publish as features")
    run(
        str(BIN / "cloud-batch"), "score", "maintenance", "--version", "2", "--registry", str(registry),
        "--input", str(work / "live.parquet"), "--output", str(work / "scores.parquet"), "--entity-key", "asset_id",
        "--features", "asset_features@1", "--publish-features", "maintenance_scores", "--features-version", "1",
        "--no-progress",
    )  # fmt: skip
    publish(broker_url, registry, keys, "features", "push", "maintenance_scores", "--version", "1")
    deadline = time.time() + 60
    while time.time() < deadline:
        active = http("GET", f"{base}/v2/models/maintenance")["parameters"].get("active_version")
        if active == "2" and http("GET", f"{base}/agent/status")["ota"].get("features", {}).get("maintenance_scores"):
            break
        time.sleep(0.2)
    print("== the agent serves maintenance v2 and holds the scores: asset queries are answered precomputed-first")
    for asset in ("asset-17", "asset-42"):
        t0 = time.perf_counter()
        resp = http("POST", f"{base}/v2/models/maintenance/infer", {"parameters": {"entity_id": asset}})
        ms, p = (time.perf_counter() - t0) * 1e3, resp["parameters"]
        pre = p.get("precomputed", {})
        print(
            f"   {asset}: failure probability {resp['outputs'][0]['data'][0]:.3f} source={p['source']} "
            f"({pre.get('set')} v{pre.get('version')}, age {pre.get('age_s', 0):.1f} s, {ms:.1f} ms)"
        )


def ingest(broker_url: str, store: Path, idle_s: float) -> None:
    """``cloud-batch ingest`` for fleet 'demo' until ``idle_s`` without a message."""
    run(
        str(BIN / "cloud-batch"), "ingest", "--fleet", "demo", "--broker", broker_url, "--store", str(store),
        "--idle-exit-s", str(idle_s), "--no-progress",
    )  # fmt: skip


def telemetry_demo(base: str, broker_url: str, store: Path) -> None:
    """Labeled traffic → the agent's outbox → MQTT → ``cloud-batch ingest`` → ``data summary``."""
    digits = load_digits()
    idx = np.random.default_rng(1).choice(len(digits.images), size=FIELD_ROWS, replace=False)
    ids = []
    for i in idx:
        x = digits.images[i].astype(np.float32)[None, ..., None]
        body = {"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        ids.append(http("POST", f"{base}/v2/models/digits/infer", body)["id"])
    items = [{"id": rid, "label": int(digits.target[i])} for rid, i in zip(ids, idx, strict=True)]
    stored = http("POST", f"{base}/v2/models/digits/feedback", {"items": items})["stored"]
    print(f"== {FIELD_ROWS} predictions served (ids {ids[0]} ...); {stored} feedback labels committed on the device")
    time.sleep(1.5)  # one flush_interval_ms (250 ms) and an upload step
    print("== cloud side: drain the fleet's telemetry into a Parquet store, exactly once per (device, seq)")
    ingest(broker_url, store, 3)
    run(str(BIN / "cloud-batch"), "data", "summary", "--store", str(store))
    outbox = http("GET", f"{base}/agent/status")["telemetry"]["outbox"]
    print(f"== device outbox after the ingest's ack: {outbox}")


def nightly_demo(base: str, broker_url: str, work: Path) -> None:
    """``cloud-batch pipeline run`` on the field data just ingested: digits v3, calibrated, released, hot-swapped."""
    config = work / "pipeline.toml"  # seed 2: the same holdout production (v2, trained with --seed 2) held out
    config.write_text(
        f'[pipeline]\nmodel = "digits"\nfleet = "demo"\nbroker = "{broker_url}"\nstore = "store"\n'
        "[ingest]\nidle_exit_s = 1.0\n"
        f"[dataset]\nmin_labeled_rows = {FIELD_ROWS // 2}\nmin_minority_fraction = 0.0\n"
        "[train]\nepochs = 20\nbatch_size = 32\nseed = 2\n"
        "[gates]\nmax_regression = 0.02\nmax_ece_regression = 0.02\n"
        '[release]\nkey = "keys/signing.key"\nhealth_window_s = 1.0\n'
    )
    print("== nightly: retrain digits on base + field rows, calibrate, gate against production, release")
    run(str(BIN / "cloud-batch"), "pipeline", "run", "--config", str(config), "--as-of", "2026-12-01")
    deadline = time.time() + 60
    while http("GET", f"{base}/v2/models/digits")["parameters"].get("active_version") != "3":
        assert time.time() < deadline, "the agent never hot-swapped to digits v3"
        time.sleep(0.2)
    cal = http("GET", f"{base}/v2/models/digits")["parameters"]["calibration"]
    report = Path(tempfile.gettempdir()) / "edgefleet-demo-nightly-report.html"
    shutil.copy(work / "runs" / "digits" / "2026-12-01" / "report" / "report.html", report)
    print(f"== the agent hot-swapped to digits v3, calibrated: T={cal['temperature']:.3f}, ECE {cal['ece']:.3f}")
    print(f"== nightly report: {report}")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    data_dir, keys, registry = work / "agent", work / "keys", work / "registry"
    broker, broker_url = start_broker(work)
    print(f"== broker {broker_url}")
    print("== open the cloud ingest's persistent MQTT session now, so the broker keeps telemetry for it")
    ingest(broker_url, work / "store", 0.5)
    run(str(BIN / "cloud-batch"), "keys", "generate", "--out", str(keys))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    print(f"== starting edge-agent on {base}, fleet 'demo', device 'demo-1'")
    agent = subprocess.Popen(
        [
            str(BIN / "edge-agent"),
            "run",
            "--data-dir",
            str(data_dir),
            "--listen",
            f"127.0.0.1:{port}",
            "--broker",
            broker_url,
            "--fleet",
            "demo",
            "--device-id",
            "demo-1",
            "--trust",
            str(keys / "signing.pub"),
        ],
        env={
            **os.environ,
            "EDGEFLEET_MODELS_DIR": str(REPO / "models"),
            "EDGEFLEET_TELEMETRY__SAMPLE_INPUTS": SAMPLE_INPUTS,
        },
    )
    try:
        wait_ready(base, agent)
        digits = load_digits()
        idx = np.random.default_rng(0).choice(len(digits.images), size=16, replace=False)
        x, truth = digits.images[idx].astype(np.float32)[..., None], digits.target[idx]
        version, probs, ms = predict(base, "digits", x)
        show("before the update", version, probs, truth, ms)

        print("== cloud side: train digits v2 (Keras → int8 TFLite → held-out evaluation → quality gate)")
        run(
            str(BIN / "cloud-batch"),
            "train",
            "digits",
            "--registry",
            str(registry),
            "--version",
            "2",
            "--seed",
            "2",
            "--no-progress",
        )
        publish(broker_url, registry, keys, "release", "digits", "--version", "2", "--health-window-s", "3")
        t0 = time.time()
        while time.time() - t0 < 120:
            version = http("GET", f"{base}/v2/models/digits")["parameters"].get("active_version")
            if version == "2":
                break
            time.sleep(0.2)
        print(f"== agent hot-swapped to v{version} {time.time() - t0:.1f} s after the release was published")
        version, probs, ms = predict(base, "digits", x)
        show("after the update", version, probs, truth, ms)

        img_path = work / "digit.png"
        import cv2

        img = (255 - digits.images[idx[0]] * (255 / 16)).astype(np.uint8)  # dark ink on white paper
        cv2.imwrite(str(img_path), cv2.resize(img, (64, 64), interpolation=cv2.INTER_NEAREST))
        print(f"== an image file through the CLI (truth {truth[0]})")
        run(str(BIN / "edge-agent"), "predict", "digits", "--input", str(img_path), "--data-dir", str(data_dir))
        print("== waiting for the device to finish its 3 s health window and report the result")
        deadline = time.time() + 30
        while time.time() < deadline:
            state = http("GET", f"{base}/agent/status")["ota"]["updates"].get("digits", {})
            if state.get("result"):
                break
            time.sleep(0.3)
        run(str(BIN / "cloud-batch"), "fleet", "status", "--fleet", "demo", "--broker", broker_url)
        features_demo(base, broker_url, registry, keys, data_dir)
        precomputed_demo(base, broker_url, registry, keys, work)
        telemetry_demo(base, broker_url, work / "store")
        nightly_demo(base, broker_url, work)
    finally:
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=30)
        print(f"== agent stopped on SIGTERM with exit code {code}")
        broker.terminate()
        broker.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
