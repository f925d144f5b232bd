"""The nightly loop end to end: real mosquitto, two real agents, real TensorFlow (few epochs).

1. Two agents serve maintenance v1 (installed from the shipped registry on first start).
2. Their field traffic is a new asset type whose failures v1 ranks backwards; it comes with labels.
3. ``pipeline run`` ingests it, retrains, calibrates, passes every gate and releases v2.
4. Both agents hot-swap to v2 and ``fleet status`` shows them committed; the model metadata and
   ``edge-agent status`` show the temperature and ECE the run fitted.
5. A second run with a deliberately bad config (1 epoch, one huge batch) fails a gate, releases
   nothing, and its report names the gate; it is killed with SIGKILL after ``train`` finished
   and rerun (progress on: the step lines on stderr say which steps were already done): the
   finished steps are not redone. Production is now v2, the release recorded for the fleet.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from cloud_batch.cli import main as cli
from cloud_batch.cli import ota as ota_cli
from cloud_batch.fleetops.broker import BrokerLink
from cloud_batch.fleetops.fleet import fleet_status
from cloud_batch.fleetops.keys import generate_keys
from cloud_batch.ingest.consumer import IngestOptions, run_ingest
from cloud_batch.pipeline.config import load_config
from cloud_batch.pipeline.context import DONE, STEP_NAMES, Run, read_marker
from cloud_batch.pipeline.runner import run_pipeline
from cloud_batch.registry.models import Registry
from cloud_batch.registry.signed import SignedLog
from tests.broker import Broker
from tests.support.env import MODELS
from tests.support.nightly import shifted_field, write_config
from tests.support.telemetry import BIN, AgentProcess, call, wait_until

FLEET = "tfleet"
PER_AGENT = 300


def _tensor(x: np.ndarray) -> dict[str, object]:
    return {"shape": [1, *x.shape], "datatype": "FP32", "data": [float(v) for v in x.ravel()]}


def send_field_traffic(agent: AgentProcess, seed: int) -> None:
    """Predictions of the new asset type with their inputs, then one feedback label each."""
    live, feats, label = shifted_field(PER_AGENT, seed=seed)
    conn = agent.connect()
    ids = []
    for i in range(PER_AGENT):
        body = {"inputs": [{"name": "live", **_tensor(live[i])}, {"name": "asset_features", **_tensor(feats[i])}]}
        status, out = call(conn, "POST", "/v2/models/maintenance/infer", body)
        assert status == 200, out
        ids.append(out["id"])
    for i in range(0, PER_AGENT, 50):
        items = [{"id": rid, "label": int(label[i + j])} for j, rid in enumerate(ids[i : i + 50])]
        status, out = call(conn, "POST", "/v2/models/maintenance/feedback", {"items": items})
        assert status == 200, out
    conn.close()


def assert_report(run: Run, release_id: str | None) -> None:
    """The report's sections: verdict, metrics against production, both figures, data checks, drift, timings."""
    report = run.step_dir("report").joinpath("report.html").read_text()
    assert "Every gate passed" in report and f"as {release_id};" in report
    assert "<th>production v1 (no release recorded: the newest registered version)</th>" in report
    for row in ("holdout auc", "field-slice auc", "ECE (15 bins)", "Brier", "NLL", "p50 latency, 1 row (ms)"):
        assert f"<tr><td>{row}</td><td>" in report, row
    assert "<h2>Calibration (T = " in report and report.count('src="data:image/png;base64,') == 2  # reliability, ROC
    for check in run.data("dataset")["checks"]:
        assert f"<tr><td>{check['name']}</td><td>pass</td>" in report
    assert "<h2>Drift seen in the field</h2>" in report  # v1 has no drift reference: no drift records (docs)
    for step in STEP_NAMES[:-1]:
        assert f"<tr><td>{step}</td><td>{run.marker(step)['seconds']}</td>" in report, step


def committed(link: BrokerLink, version: str, n: int) -> bool:
    rows = fleet_status(link, FLEET)
    return len(rows) == n and all(
        r.models.get("maintenance") == version
        and r.updates.get("maintenance") is not None
        and r.updates["maintenance"].state == "committed"
        for r in rows
    )


def test_nightly_loop_releases_a_calibrated_v2_and_refuses_a_bad_one(
    broker: Broker, cloud_link: BrokerLink, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "cloud"
    _key, pub = generate_keys(work / "keys")
    shutil.copytree(MODELS / "maintenance" / "1", work / "registry" / "maintenance" / "1")
    features = {"build": [{"set": "asset_features", "recipe": "maintenance", "n_assets": 20, "days": 10}]}
    config_path = write_config(
        work / "pipeline.toml",
        pipeline={"broker": broker.url},
        ingest={"idle_exit_s": 3.0},
        release={"stages": [100]},
        features=features,
    )
    config = load_config(config_path)
    # The ingest's persistent session exists before the traffic, so the broker keeps it (as in production).
    run_ingest(IngestOptions(FLEET, broker.url, config.store, idle_exit_s=0.2))

    agents = []
    for i in range(2):
        (tmp_path / f"agent{i}").mkdir()
        agent = AgentProcess(tmp_path / f"agent{i}" / "data", broker.url, pub, sample_inputs=1.0)
        agent.env["EDGEFLEET_MQTT__DEVICE_ID"] = f"dev-{i}"
        agents.append(agent.start())
    try:
        for i, agent in enumerate(agents):
            send_field_traffic(agent, seed=10 + i)
        wait_until(lambda: all(a.telemetry()["outbox"]["last_seq"] >= 2 * PER_AGENT for a in agents), 60, "outboxes")

        # -- run 1: v2 -------------------------------------------------------------------------
        outcome = run_pipeline(Run(config, "2026-12-01"))
        assert outcome.gates_passed and outcome.release_id, outcome.summary()
        gate = read_marker(outcome.run_dir / "gate" / DONE)["data"]
        cand, prod = gate["candidate"], gate["production"]
        assert prod["version"] == "1"
        assert cand["scores"]["field"] >= prod["scores"]["field"] + 0.3  # v1 ranks the new type badly
        assert cand["ece"] <= 0.05
        assert Registry(config.registry).versions("maintenance") == ["1", "2"]
        cal = json.loads((outcome.run_dir / "calibrate" / "calibration.json").read_text())

        pushed = read_marker(outcome.run_dir / "release" / DONE)["data"]["feature_pushes"]
        assert [(p["set"], p["version"]) for p in pushed] == [("asset_features", "1")]  # pushed before the model
        wait_until(lambda: committed(cloud_link, "2", 2), 90, "both agents committed maintenance 2")
        wait_until(
            lambda: all(
                a.request("GET", "/agent/status")[1]["ota"].get("features", {}).get("asset_features") for a in agents
            ),
            60,
            "both agents hold asset_features",
        )
        assert ota_cli.main(["fleet", "status", "--fleet", FLEET, "--broker", broker.url, "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert {r["updates"]["maintenance"]["state"] for r in shown} == {"committed"}
        for agent in agents:
            status, meta = agent.request("GET", "/v2/models/maintenance")
            assert status == 200 and meta["parameters"]["version"] == "2"
            assert meta["parameters"]["calibration"]["temperature"] == pytest.approx(cal["temperature"])
            assert meta["parameters"]["calibration"]["ece"] == pytest.approx(cal["after"]["ece"])
        assert_report(Run(config, "2026-12-01"), outcome.release_id)
        assert cli.main(["pipeline", "status", "--config", str(config_path), "--model", "maintenance", "--json"]) == 0
        (status,) = json.loads(capsys.readouterr().out)
        assert status["release_id"] == outcome.release_id and status["registered"] == "2"

        # -- run 2: a bad config, killed after train, then resumed -------------------------------
        bad = write_config(
            work / "bad.toml",
            pipeline={"broker": broker.url},
            ingest={"idle_exit_s": 0.5},
            train={"epochs": 1, "batch_size": 4096},
            features=features,
        )
        cmd = [str(BIN / "cloud-batch"), "pipeline", "run", "--config", str(bad), "--as-of", "2026-12-02"]
        run_dir = config.run_dir("2026-12-02")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
        proc = subprocess.Popen([*cmd, "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not (run_dir / "train" / DONE).is_file():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "train never finished"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        before = {s: read_marker(run_dir / s / DONE) for s in ("ingest", "dataset", "features", "train")}
        assert read_marker(run_dir / "report" / DONE) is None  # killed mid-run
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)  # progress on
        assert again.returncode == 1, again.stderr[-3000:]
        for step, marker in before.items():
            assert read_marker(run_dir / step / DONE) == marker, f"{step} was redone"
        assert all(f"{s}: already done" in again.stderr for s in before), again.stderr[-3000:]  # the step lines
        assert "quantize: already done" not in again.stderr and "quantize ..." in again.stderr
        assert all(f"{s:<10} done" in again.stdout for s in before), again.stdout
        gate2 = read_marker(run_dir / "gate" / DONE)["data"]
        failed = [g["name"] for g in gate2["gates"] if not g["passed"]]
        assert not gate2["passed"] and "holdout_vs_production" in failed, gate2["gates"]
        # production is what the fleet was released (v2, run 1's release), named as such
        assert gate2["production"]["version"] == "2"
        assert gate2["production"]["origin"] == f"released to fleet {FLEET} ({outcome.release_id})"
        assert read_marker(run_dir / "release" / DONE)["skipped"].startswith("gate(s) failed")
        assert Registry(config.registry).versions("maintenance") == ["1", "2"]
        assert SignedLog(config.registry).latest(FLEET, "model", "maintenance")["version"] == "2"
        report2 = (run_dir / "report" / "report.html").read_text()
        assert all(f"Gate <b>{name}</b> failed" in report2 for name in failed) and "Nothing released" in report2
        assert committed(cloud_link, "2", 2)

        out = subprocess.run(
            [str(BIN / "edge-agent"), "status", "--data-dir", str(agents[0].data_dir)],
            env=agents[0].env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert f"T={cal['temperature']:.3f}" in out
    finally:
        for agent in agents:
            agent.stop()
