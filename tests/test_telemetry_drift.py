"""Drift on the device: real maintenance model, real HTTP, PSI against a training reference in the manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cloud_batch.train.maintenance.data import SENSORS, generate
from cloud_batch.train.reference import build_reference
from edge_agent.http.app import create_app
from edge_agent.http.metrics import Metrics
from edge_agent.models.serving import ModelServer
from edge_agent.models.store import ModelStore
from edge_agent.telemetry import DriftMonitor, ModelPolicy, Telemetry
from edge_agent.wire.protocol import DeviceState
from tests.apiserver import ApiServer
from tests.support.env import MODELS

WINDOW = 400


def _readings(part: int) -> np.ndarray:
    """Sensor readings of one fleet: part 0 trains the reference, part 1 is later traffic of the same assets."""
    rows = generate(n_assets=40, days=5, seed=0)[list(SENSORS)].to_numpy(np.float32)
    rows = rows[np.random.default_rng(1).permutation(len(rows))]
    return rows[:3000] if part == 0 else rows[3000:]


def _body(live: np.ndarray) -> dict:
    return {
        "inputs": [
            {"name": "live", "shape": [1, 4], "datatype": "FP32", "data": live.tolist()},
            {"name": "asset_features", "shape": [1, 18], "datatype": "FP32", "data": [0.0] * 18},
        ]
    }


@pytest.fixture
def maintenance_with_reference(tmp_path: Path) -> ModelServer:
    src = tmp_path / "maintenance"
    shutil.copytree(MODELS / "maintenance" / "1", src)
    manifest = json.loads((src / "manifest.json").read_text())
    store = ModelStore(tmp_path / "data")
    store.install_dir(MODELS / "maintenance" / "1")
    probe = ModelServer(store)
    probe.sync()
    train = _readings(0)
    model = probe.get("maintenance")
    parts = [
        model.predict({"live": train[i : i + 64], "asset_features": np.zeros((len(train[i : i + 64]), 18), np.float32)})
        for i in range(0, len(train), 64)
    ]
    outputs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    probe.stop()
    manifest["version"] = "2"
    manifest["reference"] = build_reference({"live": train}, outputs, {"live": list(SENSORS)})
    (src / "manifest.json").write_text(json.dumps(manifest))
    store.install_dir(src)
    store.activate("maintenance", "2")
    server = ModelServer(store)
    server.sync()
    return server


def test_in_distribution_is_stable_and_a_hot_sensor_alerts_within_one_window(
    tmp_path: Path, maintenance_with_reference: ModelServer
) -> None:
    metrics = Metrics()
    tel = Telemetry(
        tmp_path / "tel", registry=metrics.registry, policy=lambda m: ModelPolicy(), flush_interval_s=0.05,
        max_rows=None, max_bytes=None, drift=DriftMonitor(window=WINDOW),
    )  # fmt: skip
    tel.start()
    live = _readings(1)[: 2 * WINDOW]
    try:
        with ApiServer(create_app(maintenance_with_reference, metrics=metrics, telemetry=tel)) as api:
            conn = api.connect()

            def send(rows: np.ndarray) -> None:
                for row in rows:
                    conn.request("POST", "/v2/models/maintenance/infer", json.dumps(_body(row)))
                    resp = conn.getresponse()
                    assert resp.status == 200, resp.read()
                    resp.read()
                tel.flush()

            send(live[:WINDOW])
            calm = tel.drift.latest()["maintenance"] if tel.drift else None
            assert calm is not None and calm.window == WINDOW
            assert max(calm.psi.values()) < 0.1 and calm.output_psi is not None and calm.output_psi < 0.1, calm
            hot = live[WINDOW:].copy()
            hot[:, 0] += 15.0  # temperature +15 °C
            send(hot)
            status, _, text = api.request("GET", "/metrics")
    finally:
        tel.stop()
        maintenance_with_reference.stop()
    result = tel.drift.latest()["maintenance"] if tel.drift else None
    assert result is not None and result.psi["temperature"] > 0.25 and result.level == "alert"
    assert all(result.psi[f] < 0.1 for f in SENSORS[1:]), result.psi
    line = f'edgefleet_drift_psi{{feature="temperature",model="maintenance",version="2"}} {result.psi["temperature"]}'
    assert status == 200 and line in text.decode()
    summary = tel.drift_summary()
    state = DeviceState.from_dict(DeviceState("dev-1", "f", drift=summary).to_dict())
    assert next(iter(state.drift["maintenance"]["psi"])) == "temperature"
    reopened = Telemetry(tmp_path / "tel", registry=Metrics().registry, policy=lambda m: ModelPolicy(),
                         flush_interval_s=1, max_rows=None, max_bytes=None)  # fmt: skip
    records = [json.loads(r[3]) for r in reopened.outbox.read_after(0, 10**9) if r[1] == "drift"]
    reopened.stop()
    assert [r["level"] for r in records] == ["ok", "alert"] and records[1]["psi"]["temperature"] > 0.25
