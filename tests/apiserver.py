"""A real uvicorn server running the V2 app in a thread, digits request helpers, a digits version "2".

The fixtures built on it (``model_server``, ``api``) are in ``conftest.py``.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn

from edge_agent.inference.modelpack import build_version_dir
from edge_agent.inference.runtime import inspect_model
from edge_agent.wire.model.manifest import Manifest
from tests.support.env import free_port


class ApiServer:
    """An ASGI app on a real uvicorn server (httptools), in a background thread, on a free local port."""

    def __init__(self, app: Any) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        config = uvicorn.Config(
            app,
            host=self.host,
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            http="httptools",
            log_config=None,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        """``host:port``, as tritonclient wants it."""
        return f"{self.host}:{self.port}"

    def __enter__(self) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)

    def connect(self, timeout: float = 30) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(
        self, method: str, path: str, body: bytes | dict | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection; returns (status, lower-cased headers, body)."""
        conn = self.connect()
        try:
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            conn.request(method, path, body=data, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()


def digits_data() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as the model takes them: FP32 [n, 8, 8, 1] in raw 0..16, and the labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32)[..., None], d.target


def infer_body(x: np.ndarray, name: str = "pixels", datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}],
        **extra,
    }


def build_v2(digits_dir: Path, out: Path) -> Path:
    """Version "2": the shipped model file again, with the shipped tensor names and labels."""
    v1 = Manifest.load(digits_dir / "manifest.json")
    ins, outs = inspect_model(digits_dir / v1.file)
    build_version_dir(
        digits_dir / v1.file,
        out,
        name="digits",
        version="2",
        labels=v1.labels,
        preprocessing=v1.preprocessing,
        rename_inputs={s.name: d.name for s, d in zip(ins, v1.inputs, strict=False) if s.name != d.name},
        rename_outputs={s.name: d.name for s, d in zip(outs, v1.outputs, strict=False) if s.name != d.name},
    )
    return out
