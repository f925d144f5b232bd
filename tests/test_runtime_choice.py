"""Choosing the TFLite runtime: ``[runtime] backend`` / ``EDGEFLEET_RUNTIME__BACKEND``.

The rule (``interpreter.selected_runtime``) is checked on its own with a stand-in for "installed".
The capability is checked with real processes on every runtime installed for this Python (both on
3.10/3.11, where the set-up installs the ``litert`` extra; ai-edge-litert alone from 3.12): an
``edge-agent run`` and a ``cloud-batch score`` told to use it report it, and agree bit for bit on
300 digits rows, one HTTP request per row.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cloud_batch.errors import RegistryError
from cloud_batch.score.worker import Scorer, ScorerSpec
from edge_agent.config import load_config
from edge_agent.errors import ConfigError
from edge_agent.inference.interpreter import RUNTIME_ENV, RUNTIMES, is_installed, runtime_label, selected_runtime
from tests.support.agent import BIN, request, start_agent, stop, wait_ready
from tests.support.env import free_port
from tests.support.score import digits_rows, score_registry

INSTALLED = [name for name, module in RUNTIMES.items() if is_installed(module)]
BOTH = {"tflite_runtime.interpreter", "ai_edge_litert.interpreter"}


def test_auto_takes_the_first_runtime_installed() -> None:
    assert selected_runtime({}, BOTH.__contains__) == ("tflite-runtime", "tflite_runtime.interpreter")
    assert selected_runtime({RUNTIME_ENV: "auto"}, {"ai_edge_litert.interpreter"}.__contains__)[0] == "ai-edge-litert"
    with pytest.raises(ConfigError, match="no TFLite runtime installed"):
        selected_runtime({}, lambda module: False)


def test_a_named_runtime_is_taken_even_when_another_comes_first() -> None:
    assert selected_runtime({RUNTIME_ENV: " ai-edge-litert "}, BOTH.__contains__) == (
        "ai-edge-litert",
        "ai_edge_litert.interpreter",
    )


def test_an_unknown_or_missing_runtime_is_a_config_error_that_says_what_to_do() -> None:
    with pytest.raises(
        ConfigError, match=r"'tflite' is not a TFLite runtime; choose one of: auto, tflite-runtime, ai-edge-litert"
    ):
        selected_runtime({RUNTIME_ENV: "tflite"}, BOTH.__contains__)
    with pytest.raises(
        ConfigError, match=r"is ai-edge-litert, which is not installed here \(pip install 'edgefleet\[litert\]'\)"
    ):
        selected_runtime({RUNTIME_ENV: "ai-edge-litert"}, {"tflite_runtime.interpreter"}.__contains__)
    with pytest.raises(ConfigError, match="is tflite-runtime, which is not installed here"):
        selected_runtime({RUNTIME_ENV: "tflite-runtime"}, {"ai_edge_litert.interpreter"}.__contains__)


def test_the_config_key_is_checked_when_the_config_loads(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'xnnpack' is not a TFLite runtime"):
        load_config(env={RUNTIME_ENV: "xnnpack"})
    toml = tmp_path / "agent.toml"
    toml.write_text(f'[runtime]\nbackend = "{INSTALLED[-1]}"\n')
    assert load_config(toml, env={}).runtime.backend == INSTALLED[-1]


def test_a_scoring_worker_on_another_runtime_refuses_to_score(tmp_path: Path) -> None:
    reg = score_registry(tmp_path / "reg")
    spec = ScorerSpec(str(reg / "digits" / "1"), 64, "row", str(tmp_path), runtime="tflite-runtime 0.0.1")
    with pytest.raises(RegistryError, match=r"this worker's TFLite runtime is .*, the run's is tflite-runtime 0\.0\.1"):
        Scorer(spec)
    assert Scorer(ScorerSpec(str(reg / "digits" / "1"), 64, "row", str(tmp_path), runtime=runtime_label())).model


def test_the_commands_refuse_an_unknown_runtime_before_any_work(tmp_path: Path) -> None:
    env = {**os.environ, RUNTIME_ENV: "tensorflow"}
    agent = subprocess.run(
        [str(BIN / "edge-agent"), "run", "--data-dir", str(tmp_path / "data"), "--listen", f"127.0.0.1:{free_port()}"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert agent.returncode != 0 and "'tensorflow' is not a TFLite runtime" in agent.stderr, agent.stderr
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())
    reg = score_registry(tmp_path / "reg")
    np.save(tmp_path / "x.npy", digits_rows(10))
    out = tmp_path / "s.parquet"
    batch = subprocess.run(
        [str(BIN / "cloud-batch"), "score", "digits", "--version", "1", "--registry", str(reg),
         "--input", str(tmp_path / "x.npy"), "--output", str(out), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert batch.returncode != 0 and "'tensorflow' is not a TFLite runtime" in batch.stderr, batch.stderr
    assert not out.exists()


@pytest.mark.parametrize("name", INSTALLED)
def test_agent_and_batch_run_on_the_chosen_runtime_and_agree_exactly(name: str, tmp_path: Path) -> None:
    settings = {RUNTIME_ENV: name}
    port = free_port()
    proc = start_agent(tmp_path / "data", f"127.0.0.1:{port}", settings=settings)
    x = digits_rows(300, seed=5)
    try:
        wait_ready(lambda: http.client.HTTPConnection("127.0.0.1", port, timeout=10), proc)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        status, body = request(conn, "GET", "/agent/status")
        assert status == 200 and body["runtime"]["backend"] == name, body
        live = []
        for row in x:
            req = {
                "inputs": [{"name": "pixels", "shape": [1, 8, 8, 1], "datatype": "FP32", "data": row.ravel().tolist()}]
            }
            status, reply = request(conn, "POST", "/v2/models/digits/infer", req)
            assert status == 200, reply
            live.append(np.asarray(reply["outputs"][0]["data"], dtype=np.float32))
        conn.close()
    finally:
        assert stop(proc) == 0
    reg = score_registry(tmp_path / "reg")
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "scores.parquet"
    run = subprocess.run(
        [str(BIN / "cloud-batch"), "score", "digits", "--version", "1", "--registry", str(reg), "--input",
         str(tmp_path / "x.npy"), "--output", str(out), "--workers", "2", "--no-progress"],
        env={**os.environ, **settings}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[b"edgefleet.score"])
    assert meta["identity"]["runtime"].startswith(f"{name} ")
    batch = np.stack([table.column(f"probs_{i}").to_numpy() for i in range(10)], axis=1)
    assert batch.shape == (300, 10)
    assert float(np.abs(batch - np.stack(live)).max()) == 0.0
