"""`make demo`: start a real edge agent, send it real predictions over the V2 API, show its status, stop it.

Everything runs locally against the shipped int8 digits model; no TensorFlow is needed.
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
import urllib.request
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


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


def main() -> int:
    data_dir = Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    print(f"== starting edge-agent on {base} (data dir {data_dir})")
    agent = subprocess.Popen(
        [str(BIN / "edge-agent"), "run", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}"],
        env={**os.environ, "EDGEFLEET_MODELS_DIR": str(REPO / "models")},
    )
    try:
        wait_ready(base, agent)
        meta = http("GET", base + "/v2/models/digits")
        print(f"== model metadata: {meta['name']} versions {meta['versions']} inputs "
              f"{[(t['name'], t['datatype'], t['shape']) for t in meta['inputs']]}")
        digits = load_digits()
        rng = np.random.default_rng(0)
        idx = rng.choice(len(digits.images), size=12, replace=False)
        batch = digits.images[idx].astype(np.float32)[..., None]
        body = {"inputs": [{"name": meta["inputs"][0]["name"], "shape": list(batch.shape), "datatype": "FP32",
                            "data": batch.ravel().tolist()}]}
        t0 = time.perf_counter()
        resp = http("POST", base + "/v2/models/digits/infer", body)
        ms = (time.perf_counter() - t0) * 1e3
        out = resp["outputs"][0]
        probs = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        pred = probs.argmax(axis=1)
        print(f"== V2 infer, batch of {len(idx)} real digits -> model_version {resp['model_version']} in {ms:.1f} ms")
        for i, (p, truth, conf) in enumerate(zip(pred, digits.target[idx], probs.max(axis=1))):
            print(f"   sample {i:2d}: predicted {p} (p={conf:.2f})  truth {truth}  {'ok' if p == truth else 'MISS'}")
        print(f"   accuracy on this batch: {(pred == digits.target[idx]).mean():.2f}")

        img_path = data_dir / "digit.png"
        import cv2

        img = (255 - digits.images[idx[0]] * (255 / 16)).astype(np.uint8)  # dark ink on white paper
        cv2.imwrite(str(img_path), cv2.resize(img, (64, 64), interpolation=cv2.INTER_NEAREST))
        print(f"== edge-agent predict digits --input {img_path.name}  (image, truth {digits.target[idx[0]]})")
        subprocess.run([str(BIN / "edge-agent"), "predict", "digits", "--input", str(img_path),
                        "--data-dir", str(data_dir)], check=True)
        print("== edge-agent status")
        subprocess.run([str(BIN / "edge-agent"), "status", "--data-dir", str(data_dir),
                        "--listen", f"127.0.0.1:{port}"], check=True)
    finally:
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=30)
        print(f"== agent stopped on SIGTERM with exit code {code}")
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
