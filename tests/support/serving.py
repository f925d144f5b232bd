"""Helpers for the serving tests (#13 sections 4-5): a real `edge-agent run` process and concurrent digits clients."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tests.support.env import MODELS, free_port

BIN = Path(sys.executable).parent


@contextmanager
def running_agent(data_dir: Path, host: str, env_extra: dict[str, str] | None = None) -> Iterator[int]:
    """`edge-agent run` listening on ``host``:a free port (shipped models), ready; yields the port; SIGTERM after."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env.update({"EDGEFLEET_MODELS_DIR": str(MODELS), "EDGEFLEET_WATCH_INTERVAL_S": "0.2", **(env_extra or {})})
    proc = subprocess.Popen(
        [str(BIN / "edge-agent"), "run", "--data-dir", str(data_dir), "--listen", f"{host}:{port}"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if call(port, "GET", "/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "agent never became ready"
            time.sleep(0.1)
        yield port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """One JSON request to 127.0.0.1:``port``; (status, decoded body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else {}
    finally:
        conn.close()


def distinct_batches(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` digits requests of 1-3 rows each, every row a different real image (FP32 [rows, 8, 8, 1])."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32)[..., None]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    out, at = [], 0
    for _ in range(n):
        rows = int(rng.integers(1, 4))
        out.append(images[order[at : at + rows]])
        at = (at + rows) % (len(images) - 3)
    return out


def infer_rows(port: int, x: np.ndarray, model: str = "digits") -> tuple[int, np.ndarray | dict]:
    """POST ``x`` as the ``pixels`` input; (status, the first output as an array, or the error body)."""
    body = {"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    status, doc = call(port, "POST", f"/v2/models/{model}/infer", body)
    if status != 200:
        return status, doc
    out = doc["outputs"][0]
    return status, np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
