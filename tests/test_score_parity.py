"""Parity: ``cloud-batch score`` under both engines and a running edge agent over HTTP agree bit for bit.

2,000 digits rows (and 500 maintenance rows) are scored by the local engine and by Ray Data, then
sent one request per row to the agent's V2 API on a real uvicorn server with both models installed.
max |diff| must be exactly 0: same artifact, same kernels. Ray runs as an existing cluster would:
``ray start --head --num-cpus 2`` in a subprocess, started once for this module (the only Ray start-up
of the suite) and stopped at its end; every Ray run joins it with ``--ray-address``.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cloud_batch.cli.main import main
from cloud_batch.score.job import score
from cloud_batch.score.parts import read_metadata
from edge_agent.http.app import create_app
from edge_agent.models.serving import ModelServer
from edge_agent.models.store import ModelStore
from tests.apiserver import ApiServer
from tests.support.env import free_port
from tests.support.score import LIVE, digits_rows, live_frame, read_scores, score_registry

N = 2000
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a Ray head started with ``ray start --head --block`` (terminating it stops the cluster)."""
    ray = pytest.importorskip("ray")  # the `batch` extra (Ray may lag behind the newest Python)
    port = free_port()
    # Token authentication is Ray's own business, not what this test checks: off for this loopback cluster.
    # No 30 s node drain on SIGTERM (that is for Serve replicas on Kubernetes): the head stops at once.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    ports = [f"--{flag}={free_port()}" for flag in ("ray-client-server-port", "dashboard-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port")]  # fmt: skip
    log = tmp_path_factory.mktemp("ray") / "head.log"
    with open(log, "wb") as out:  # the child keeps its own descriptor
        head = subprocess.Popen(
            [cli, "start", "--head", "--block", "--num-cpus", "2", f"--port={port}", "--include-dashboard=false",
             "--disable-usage-stats", *ports],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the GCS listens: then a driver can join (and leave: each score() joins with --ray-address)
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head did not come up ({head.poll()}):\n{log.read_text()[-3000:]}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        ray.shutdown()
        yield address
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # what `ray stop` would remove
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


@pytest.fixture(scope="module")
def sreg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return score_registry(tmp_path_factory.mktemp("parity") / "registry")


@pytest.fixture
def agent(sreg: Path, tmp_path: Path) -> Iterator[ApiServer]:
    """The agent's HTTP API over a store with the registry's digits 1 and maintenance 1 installed."""
    store = ModelStore(tmp_path / "data")
    for name in ("digits", "maintenance"):
        store.install_dir(sreg / name / "1")
    server = ModelServer(store)
    server.sync()
    try:
        with ApiServer(create_app(server)) as api:
            yield api
    finally:
        server.stop()


def _agent_rows(api: ApiServer, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
    """One V2 infer request per row on one keep-alive connection; the output rows as float32."""
    conn = api.connect()
    rows = []
    try:
        for i in range(len(next(iter(inputs.values())))):
            body = {"inputs": [
                {"name": k, "shape": [1, *v.shape[1:]], "datatype": "FP32", "data": v[i].ravel().tolist()}
                for k, v in inputs.items()
            ]}  # fmt: skip
            conn.request("POST", f"/v2/models/{model}/infer", body=json.dumps(body))
            resp = conn.getresponse()
            reply = json.loads(resp.read())
            assert resp.status == 200, reply
            out = next(o for o in reply["outputs"] if o["name"] == output)
            rows.append(np.asarray(out["data"], dtype=np.float32))
    finally:
        conn.close()
    assert isinstance(conn, http.client.HTTPConnection)
    return np.stack(rows)


def _digits(sreg: Path, tmp_path: Path, engine: str, address: str | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    x = digits_rows(N, seed=21)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / f"digits-{engine}.parquet"
    result = score(sreg, "digits", "1", tmp_path / "x.npy", out, engine=engine, workers=2, batch_size=128,
                   partition_rows=300, progress=False, ray_address=address)  # fmt: skip
    assert result.rows == N and result.parts == 7
    assert read_metadata(out)["engine"] == engine  # type: ignore[index]
    return x, read_scores(out)


def _maintenance(sreg: Path, tmp_path: Path, engine: str, address: str | None = None) -> dict[str, np.ndarray]:
    """The inputs, and the output ``failure_prob`` under ``out``."""
    rng = np.random.default_rng(8)
    df = live_frame(500, seed=9)
    arrays = {
        "live": df[list(LIVE)].to_numpy(np.float32),
        "asset_features": rng.uniform(0, 5, (500, 18)).astype(np.float32),
    }
    np.savez(tmp_path / "m.npz", **arrays)
    out = tmp_path / f"m-{engine}.parquet"
    score(sreg, "maintenance", "1", tmp_path / "m.npz", out, engine=engine, workers=2, partition_rows=200,
          progress=False, ray_address=address)  # fmt: skip
    return {**arrays, "out": read_scores(out)["failure_prob"].to_numpy()}


def test_digits_local_engine_and_agent_agree_exactly(sreg: Path, tmp_path: Path, agent: ApiServer) -> None:
    x, got = _digits(sreg, tmp_path, "local")
    cloud = got[[f"probs_{i}" for i in range(10)]].to_numpy()
    edge = _agent_rows(agent, "digits", {"pixels": x}, "probs")
    assert float(np.max(np.abs(cloud - edge))) == 0.0
    assert len(np.unique(cloud.argmax(axis=1))) > 1  # not a constant answer


def test_maintenance_local_engine_and_agent_agree_exactly(sreg: Path, tmp_path: Path, agent: ApiServer) -> None:
    m = _maintenance(sreg, tmp_path, "local")
    edge = _agent_rows(agent, "maintenance", {"live": m["live"], "asset_features": m["asset_features"]},
                       "failure_prob")[:, 0]  # fmt: skip
    assert float(np.max(np.abs(m["out"] - edge))) == 0.0
    assert np.unique(edge).size > 10


class _Stop(Exception):
    pass


def test_ray_on_an_existing_cluster_agrees_with_local_and_the_agent_and_finishes_a_local_run(
    ray_cluster: str, sreg: Path, tmp_path: Path, agent: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every Ray case in one test, so that the suite starts one Ray cluster even when xdist spreads the tests."""
    x, ray_digits = _digits(sreg, tmp_path, "ray", ray_cluster)
    assert _digits(sreg, tmp_path, "local")[1].equals(ray_digits)  # Ray's output equals the local engine's, in order
    edge = _agent_rows(agent, "digits", {"pixels": x}, "probs")
    assert float(np.max(np.abs(ray_digits[[f"probs_{i}" for i in range(10)]].to_numpy() - edge))) == 0.0
    m = _maintenance(sreg, tmp_path, "ray", ray_cluster)
    edge = _agent_rows(agent, "maintenance", {"live": m["live"], "asset_features": m["asset_features"]},
                       "failure_prob")[:, 0]  # fmt: skip
    assert float(np.max(np.abs(m["out"] - edge))) == 0.0

    # a run interrupted on the local engine is finished by Ray, from the CLI with --ray-address
    np.save(tmp_path / "y.npy", digits_rows(600, seed=4))
    reference = tmp_path / "reference.parquet"
    score(sreg, "digits", "1", tmp_path / "y.npy", reference, workers=1, partition_rows=100, progress=False)

    def stop(parts: int, rows: int) -> None:
        raise _Stop

    out = tmp_path / "out.parquet"
    with pytest.raises(_Stop):
        score(sreg, "digits", "1", tmp_path / "y.npy", out, workers=1, partition_rows=100, progress=False, on_part=stop)
    assert not out.exists()
    args = ["score", "digits", "--version", "1", "--registry", str(sreg), "--input", str(tmp_path / "y.npy"),
            "--output", str(out), "--engine", "ray", "--ray-address", ray_cluster, "--workers", "2",
            "--partition-rows", "100", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "already written" in capsys.readouterr().out
    assert read_scores(out).equals(read_scores(reference))
