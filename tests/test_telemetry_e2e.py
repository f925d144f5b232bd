"""Drift, update results and load errors end to end: a real agent, real mosquitto, a real OTA, the real ingest.

The agent serves maintenance 2 with a training reference (activated from the shell, as an operator
would) and digits 1. In-distribution traffic closes a calm drift window, hot traffic (temperature
+15 °C) an alerting one: the cloud sees the alert in the device's retained DeviceState over MQTT,
and the drift records reach the Parquet store and ``data summary``. A signed OTA release of digits 2
is applied and its result arrives as an ``update`` event; a digits 3 whose model file is broken on
disk fails to load and arrives as a ``load_error`` event, while digits 2 keeps serving.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cloud_batch.fleetops.keys import load_signing_key
from cloud_batch.ingest.summary import summarize
from edge_agent.models.store import ModelStore
from tests.broker import Broker
from tests.support.env import MODELS
from tests.support.ota import FLEET, Cloud, relabel
from tests.support.telemetry import AgentProcess, Ingest, call, stored, wait_until
from tests.support.telemetry_drift import infer_body, readings, reference_version

WINDOW = 400  # the unit test shows in-distribution PSI stays < 0.1 at this size


def _send(agent: AgentProcess, rows: np.ndarray) -> None:
    conn = agent.connect()
    for row in rows:
        status, out = call(conn, "POST", "/v2/models/maintenance/infer", infer_body(row))
        assert status == 200, out
    conn.close()


def _serving(agent: AgentProcess, model: str) -> str | None:
    status, meta = agent.request("GET", f"/v2/models/{model}")
    return str(meta["parameters"]["version"]) if status == 200 else None


def _event(store: Path, type_: str, **fields: Any) -> bool:
    return any(e.get("type") == type_ and all(e.get(k) == v for k, v in fields.items()) for e in stored(store, "event"))


def test_drift_update_results_and_load_errors_reach_the_cloud(
    tmp_path: Path, broker: Broker, key_files: tuple[Path, Path]
) -> None:
    key, pub = key_files
    data = tmp_path / "data"
    data.mkdir()
    agent = AgentProcess(data, broker.url, pub)
    agent.env.update(EDGEFLEET_MQTT__FLEET=FLEET, EDGEFLEET_DRIFT__WINDOW=str(WINDOW))
    cloud = Cloud(broker.url, load_signing_key(key))
    with Ingest(broker, tmp_path / "store", fleet=FLEET) as ingest:
        agent.start()
        try:
            store = ModelStore(data)  # the operator's `edge-agent models install/activate`, beside the agent
            store.install_dir(reference_version(tmp_path))
            store.activate("maintenance", "2")
            wait_until(lambda: _serving(agent, "maintenance") == "2", 30, "maintenance 2 served")

            live = readings(1)
            _send(agent, live[:WINDOW])
            hot = live[WINDOW : 2 * WINDOW].copy()
            hot[:, 0] += 15.0  # temperature +15 °C
            _send(agent, hot)
            state = cloud.wait(
                lambda: (
                    (s := cloud.states.get("dev-1")) and s.drift.get("maintenance", {}).get("level") == "alert" and s
                ),
                "the alert in the retained DeviceState",
            )
            worst = state.drift["maintenance"]
            psi = worst["psi"]
            assert worst["version"] == "2" and max(psi, key=psi.get) == "temperature" and psi["temperature"] > 0.25

            cloud.release(relabel(MODELS / "digits" / "1", tmp_path / "digits-2", "2"), health_window_s=0)
            wait_until(lambda: _event(ingest.store, "update", model="digits", version="2"), 90, "the update event")

            broken = store.install_dir(relabel(MODELS / "digits" / "1", tmp_path / "digits-3", "3"))
            model_file = data / "models" / "digits" / "versions" / "3" / broken.file
            model_file.chmod(0o600)
            model_file.write_bytes(b"not a flatbuffer" * 64)
            store.activate("digits", "3")
            wait_until(lambda: _event(ingest.store, "load_error", model="digits", version="3"), 60, "the load error")
            assert _serving(agent, "digits") == "2", "the previous version keeps serving"
            wait_until(lambda: len(stored(ingest.store, "drift")) >= 2, 30, "both drift windows stored")
        finally:
            agent.stop()
            cloud.close()

    update = next(e for e in stored(ingest.store, "event") if e.get("type") == "update")
    assert update["result"] == "success" and update["state"] == "committed", update
    levels = {(d["version"], d["level"]) for d in stored(ingest.store, "drift") if d["model"] == "maintenance"}
    assert {("2", "ok"), ("2", "alert")} <= levels
    summary = summarize(ingest.store)
    newest = summary["devices"]["dev-1"]["drift"]["maintenance"]
    assert newest["version"] == "2" and newest["psi"]["temperature"] > 0.25
    assert json.dumps(summary)  # what `data summary --json` prints
