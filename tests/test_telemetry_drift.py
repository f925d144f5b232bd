"""Drift on the device: real maintenance model, real HTTP, PSI against a training reference in the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cloud_batch.train.maintenance.data import SENSORS
from edge_agent.http.app import create_app
from edge_agent.http.metrics import Metrics
from edge_agent.models.serving import ModelServer
from edge_agent.models.store import ModelStore
from edge_agent.telemetry import DriftMonitor, ModelPolicy, Telemetry
from edge_agent.wire.protocol import DeviceState
from tests.apiserver import ApiServer
from tests.support.env import MODELS
from tests.support.telemetry_drift import infer_body, readings, reference_version

WINDOW = 400


@pytest.fixture
def maintenance_with_reference(tmp_path: Path) -> ModelServer:
    store = ModelStore(tmp_path / "data")
    store.install_dir(MODELS / "maintenance" / "1")
    store.install_dir(reference_version(tmp_path))
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
    live = readings(1)[: 2 * WINDOW]
    try:
        with ApiServer(create_app(maintenance_with_reference, metrics=metrics, telemetry=tel)) as api:
            conn = api.connect()

            def send(rows: np.ndarray) -> None:
                for row in rows:
                    conn.request("POST", "/v2/models/maintenance/infer", json.dumps(infer_body(row)))
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
