"""The frozen one-folder agent (#11 part 1): what the folder holds, and the real binary serving, predicting, validating."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge_agent.inference.interpreter import selected_runtime
from edge_agent.update.agent.slots import verify_manifest
from tests.support.env import MODELS
from tests.support.frozen import FrozenAgent, digits_body, package_tool, run_in_frozen


def test_folder_has_version_manifest_and_models_but_no_tensorflow(frozen_agent: Path) -> None:
    tool = package_tool()
    assert (frozen_agent / "VERSION").read_text().strip() == tool.agent_version()
    assert verify_manifest(frozen_agent) == []
    listed = (frozen_agent / "SHA256SUMS").read_text()
    assert "  edge-agent\n" in listed and "  VERSION\n" in listed
    assert (frozen_agent / "_internal" / "models" / "digits" / "1" / "model.tflite").is_file()
    top = [p.name.lower() for p in (frozen_agent / "_internal").iterdir()]  # tflite_runtime's own wrapper is fine
    assert not [n for n in top if n.startswith(("tensorflow", "libtensorflow", "keras", "cloud_batch", "sklearn"))]
    # One TFLite runtime, the one this environment selects (on 3.10/3.11 both are installed: the litert extra).
    assert [n for n in ("tflite_runtime", "ai_edge_litert") if n in top] == [selected_runtime()[1].split(".")[0]]


def test_build_cache_key_covers_dependency_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dependency bump (numpy, the runtime, PyInstaller...) is a new build, not a stale cached one."""
    tool = package_tool()
    pins = tool.dependency_versions()
    assert f"numpy=={np.__version__}" in pins and any(p.startswith("pyinstaller==") for p in pins)
    assert any(p.startswith(("tflite-runtime==", "ai-edge-litert==")) for p in pins)
    before = tool.source_digest(tmp_path)
    monkeypatch.setattr(tool, "dependency_versions", lambda: [*pins[:-1], "starlette==0.0.1"])
    assert tool.source_digest(tmp_path) != before


def test_manifest_names_a_changed_file(frozen_agent: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(frozen_agent, copy, symlinks=True)
    (copy / "VERSION").write_text("9.9.9\n")
    (copy / "extra.txt").write_text("not shipped\n")
    assert verify_manifest(copy) == ["VERSION", "extra.txt"]


def test_run_serves_digits_without_opencv_and_sigterm_exits_0(frozen_agent: Path, tmp_path: Path) -> None:
    agent = FrozenAgent(frozen_agent / "edge-agent", tmp_path / "data").start()
    try:
        agent.wait_ready()
        status, out = agent.request("POST", "/v2/models/digits/infer", digits_body())
        assert status == 200, out
        assert out["model_name"] == "digits" and len(out["outputs"][0]["data"]) == 10
        assert agent.request("GET", "/v2/models/nope")[0] == 404
        assert agent.proc is not None
        maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
        # The runtime is mapped (so the OpenCV check below means something): tflite_runtime, or ai_edge_litert on 3.12+.
        assert "tflite_runtime" in maps or "ai_edge_litert" in maps
        assert "cv2" not in maps and "opencv" not in maps, "OpenCV mapped by an agent serving only tensor models"
    finally:
        code = agent.terminate()
    assert code == 0, agent.log.read_text()[-2000:]


def run_cli(binary: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120)


def test_models_list_predict_and_install_through_the_frozen_validator(frozen_agent: Path, tmp_path: Path) -> None:
    binary, data = frozen_agent / "edge-agent", tmp_path / "data"
    agent = FrozenAgent(binary, data).start()  # the first start installs the shipped models
    agent.wait_ready()
    assert agent.terminate() == 0
    listed = run_cli(binary, "models", "list", "--json", "--data-dir", str(data))
    assert listed.returncode == 0, listed.stderr
    assert {r["name"]: r["active"] for r in json.loads(listed.stdout)} == {"digits": "1", "maintenance": "1"}

    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(1).random((1, 8, 8, 1)).astype(np.float32) * 16)
    pred = run_cli(binary, "predict", "digits", "--input", str(x), "--json", "--data-dir", str(data))
    assert pred.returncode == 0, pred.stderr
    assert json.loads(pred.stdout)["model_version"] == "1"
    # An untrusted file is validated in a child, forked from the frozen binary run as a forkserver.
    inst = run_cli(binary, "models", "install", str(MODELS / "digits" / "1" / "model.tflite"), "--name", "digits",
                   "--version", "2", "--data-dir", str(data))  # fmt: skip
    assert inst.returncode == 0, inst.stderr
    assert "installed digits version 2" in inst.stdout
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"TFL3" + b"\0" * 64)
    refused = run_cli(binary, "models", "install", str(bad), "--name", "digits", "--data-dir", str(data))
    assert refused.returncode == 1 and refused.stderr.startswith("error: "), refused.stderr


def _validate_twice(version_dir: str) -> dict:
    """Runs inside the frozen interpreter (``run_in_frozen``): two validations as the agent runs them."""
    import multiprocessing.forkserver
    import os

    from edge_agent.update.validate import validate_candidate

    reports = [validate_candidate(version_dir, max_latency_ms=None) for _ in range(2)]
    server = multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    return {"ok": [r["ok"] for r in reports], "pids": [r["pid"] for r in reports], "server": server, "me": os.getpid()}


def test_a_frozen_agent_validates_in_children_of_its_own_forkserver(frozen_agent: Path) -> None:
    # No binary re-run per candidate: the first validation starts the forkserver, both fork from it.
    got = run_in_frozen(frozen_agent / "edge-agent", _validate_twice, str(MODELS / "digits" / "1"))
    assert got["ok"] == [True, True]
    assert isinstance(got["server"], int) and got["server"] != got["me"]
    assert len(set(got["pids"])) == 2 and got["me"] not in got["pids"]


def test_validate_child_reports_json(frozen_agent: Path) -> None:
    done = run_cli(frozen_agent / "edge-agent", "__validate__", str(MODELS / "digits" / "1"), "--runs", "3")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ok"] is True


def _store_through_the_sink(root: str) -> dict:
    """Runs inside the frozen interpreter: chunks handed to the chunk sink, a child that re-runs the binary."""
    import hashlib
    import os
    from pathlib import Path

    from edge_agent.mqtt.chunks import ChunkStore
    from edge_agent.mqtt.sink import ChunkSink
    from edge_agent.wire.artifact import Artifact

    blob = os.urandom(300_000)
    art = Artifact.from_blob(blob, 64 * 1024)
    sink = ChunkSink()
    session = sink.session(ChunkStore(root, art))
    assert session is not None
    for i in range(len(art.chunks)):
        session.put(i, blob[i * art.chunk_size : (i + 1) * art.chunk_size])
    got: list = []
    while len(got) < len(art.chunks):
        got += session.results(5)
    out = session.assemble(Path(root) / "out", keep=False)
    session.close()
    cmd = [c.decode() for c in Path(f"/proc/{sink.pid}/cmdline").read_bytes().split(b"\0") if c]
    sink.close()
    ok = hashlib.sha256(out.read_bytes()).hexdigest() == art.sha256
    return {
        "ok": ok,
        "stored": sorted(i for i, s in got if s),
        "n": len(art.chunks),
        "cmd": cmd,
        "blake3": bool(art.chunks_blake3),
    }


def test_a_frozen_agent_runs_its_chunk_sink(frozen_agent: Path, tmp_path: Path) -> None:
    got = run_in_frozen(frozen_agent / "edge-agent", _store_through_the_sink, str(tmp_path))
    assert got["ok"] and got["stored"] == list(range(got["n"]))
    assert "__chunk_sink__" in got["cmd"], got["cmd"]
    assert got["blake3"], "the frozen build bundles blake3"
