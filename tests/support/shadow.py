"""Shared parts of the shadow-release and model-health tests: candidates that differ, live client traffic.

``offer`` hands a ``ShadowRunner`` one-row copies as the active digits version answered them.
``skewed`` makes a digits version that predicts other classes (its input quantization scale is
changed in the manifest and its golden samples re-recorded, so it validates); ``renamed``
one whose output has another name (a signature change). ``Traffic`` is a client thread that
sends digits requests to a real HTTP server and records which version answered each one.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.fsutil import sha256_file
from edge_agent.inference.golden import IN, golden_bytes, load_golden, make_golden
from edge_agent.inference.runtime import LoadedModel, RuntimeOptions
from edge_agent.models.shadow import ShadowRunner
from edge_agent.wire.model.manifest import MANIFEST_FILE, Manifest
from edge_agent.wire.protocol import UpdateReport
from tests.apiserver import ApiServer
from tests.support.ota import Cloud, relabel


def offer(runner: ShadowRunner, digits_dir: Path, copies: int) -> None:
    """``copies`` one-row requests of the golden inputs (round and round) with digits' answers, offered to ``runner``."""
    manifest = Manifest.load(digits_dir / MANIFEST_FILE)
    active = LoadedModel(digits_dir / manifest.file, manifest, RuntimeOptions(num_threads=1, pool_size=1))
    x = load_golden(digits_dir / "golden.npz")[f"{IN}pixels"]
    rows = [({"pixels": x[i : i + 1]}, active.predict({"pixels": x[i : i + 1]})) for i in range(len(x))]
    for i in range(copies):
        runner.offer(manifest.version, *rows[i % len(rows)], 0.001)


def skewed(digits_dir: Path, out: Path, version: str, factor: float = 6.0) -> Path:
    """A digits version whose answers differ from digits 1: its input scale is ``factor`` times smaller.

    The scale is patched in the model file itself (one float32 in the flatbuffer) and in the
    manifest, so the version is consistent and validates; its golden samples are re-recorded.
    """
    scale = load_manifest_scale(digits_dir)
    new = np.float32(scale / factor)

    def edit(m: dict[str, Any]) -> None:
        m["inputs"][0]["quantization"]["scale"] = float(new)

    d = relabel(digits_dir, out, version, edit)
    model = d / "model.tflite"
    blob, old = model.read_bytes(), np.float32(scale).tobytes()
    assert blob.count(old) == 1, "the input scale must occur once in the model file"
    model.write_bytes(blob.replace(old, new.tobytes()))
    raw = json.loads((d / MANIFEST_FILE).read_text())
    raw["sha256"], raw["size"] = sha256_file(model), model.stat().st_size
    (d / MANIFEST_FILE).write_text(json.dumps(raw))
    manifest = Manifest.load(d / MANIFEST_FILE)
    inputs = {k[len(IN) :]: v for k, v in load_golden(d / "golden.npz").items() if k.startswith(IN)}
    (d / "golden.npz").write_bytes(golden_bytes(make_golden(LoadedModel(d / manifest.file, manifest), inputs)))
    return d


def load_manifest_scale(version_dir: Path) -> float:
    return float(json.loads((version_dir / MANIFEST_FILE).read_text())["inputs"][0]["quantization"]["scale"])


def renamed(digits_dir: Path, out: Path, version: str, output: str = "output_0") -> Path:
    """A digits version whose output is called ``output`` (its golden samples follow)."""

    def edit(m: dict[str, Any]) -> None:
        m["outputs"][0]["name"] = output

    d = relabel(digits_dir, out, version, edit)
    golden = load_golden(d / "golden.npz")
    golden = {(f"out:{output}" if k.startswith("out:") else k): v for k, v in golden.items()}
    (d / "golden.npz").write_bytes(golden_bytes(golden))
    return d


def digits_body(digits_dir: Path, rows: int = 4) -> bytes:
    x = load_golden(digits_dir / "golden.npz")["in:pixels"][:rows]
    return json.dumps(
        {"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    ).encode()


class Traffic:
    """A client sending digits requests to ``host:port`` until stopped; ``versions`` lists who answered."""

    def __init__(self, host: str, port: int, body: bytes, on_answer: Callable[[str], None] | None = None) -> None:
        self.host, self.port, self.body = host, port, body
        self.versions: list[str] = []
        self.statuses: list[int] = []
        self.on_answer = on_answer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        while not self._stop.is_set():
            try:
                conn.request("POST", "/v2/models/digits/infer", self.body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException):  # the agent was killed mid-answer: reconnect
                conn.close()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                self._stop.wait(0.05)
                continue
            self.statuses.append(resp.status)
            if resp.status == 200:
                version = json.loads(data)["model_version"]
                self.versions.append(version)
                if self.on_answer is not None:
                    self.on_answer(version)
            self._stop.wait(0.002)
        conn.close()

    def answered_by(self) -> set[str]:
        return set(self.versions)


def classes(outputs: dict[str, Any]) -> np.ndarray:
    """Predicted classes of a V2 JSON response's first output."""
    out = outputs["outputs"][0]
    return np.argmax(np.asarray(out["data"]).reshape(out["shape"]), axis=-1)


def release_under_traffic(
    cloud: Cloud, device_id: str, api: ApiServer, candidate: Path, body: bytes, warm: int = 0, **policy: Any
) -> tuple[UpdateReport, Traffic]:
    """Release ``candidate`` while a client sends ``body`` (after ``warm`` answers of version 1); its report."""
    with Traffic(api.host, api.port, body) as traffic:
        if warm:
            cloud.wait(lambda: traffic.versions.count("1") >= warm, f"{warm} answers of version 1")
        doc = cloud.release(candidate, **policy)
        report = cloud.wait_result(device_id, doc["release_id"])
    return report, traffic
