"""``cloud-batch fleet status`` from the broker's retained device state and presence (real mosquitto).

Five simulated devices take a release (one fails validation); one then loses its connection
without a DISCONNECT, so the broker publishes its last will and the fleet shows it offline
while still listing what it ran. A clean stop of the simulator leaves every device offline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cloud_batch.cli import ota as ota_cli
from cloud_batch.fleetops.broker import BrokerLink
from cloud_batch.fleetops.fleet import DeviceRow, fleet_status
from cloud_batch.fleetops.keys import generate_keys
from cloud_batch.fleetops.release import release
from cloud_batch.fleetops.rollout import watch
from cloud_batch.fleetops.signer import Trust
from cloud_batch.sim.fleet import SimFleet
from tests.broker import Broker
from tests.support.env import MODELS, free_port

FLEET = "plant-f"
WAIT_S = 60.0


def wait_rows(link: BrokerLink, pred, what: str) -> dict[str, DeviceRow]:
    """Poll fleet status until ``pred(rows)`` holds (the deadline is a safety net, not an assertion on speed)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        rows = {r.device_id: r for r in fleet_status(link, FLEET)}
        if pred(rows):
            return rows
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {rows}"
        time.sleep(0.2)


def test_fleet_status_shows_presence_versions_and_last_results(
    broker: Broker, cloud_link: BrokerLink, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, pub = generate_keys(tmp_path / "keys")
    sim = SimFleet(
        broker.url,
        FLEET,
        5,
        trusted_keys=[pub],
        fail_ids={"sim-0001"},
        workdir=tmp_path / "sim",
        settle_s=0.2,
        initial_models={"digits": "0"},
    ).start()
    try:
        rows = {r.device_id: r for r in fleet_status(cloud_link, FLEET)}
        assert sorted(rows) == sim.device_ids
        assert all(
            r.presence == "online" and r.models == {"digits": "0"} and r.last_update is None for r in rows.values()
        )

        record = tmp_path / "record"
        rel = release(
            MODELS, "digits", "1", FLEET, key, cloud_link, health_window_s=0, progress=False, record_dir=record
        )
        watch(
            cloud_link,
            "digits",
            FLEET,
            lambda s: s.tried == 5 and s.counts["in_progress"] == 0,
            Trust.load(record, key=key),
            timeout_s=WAIT_S,
            auto_halt=False,
        )

        sim.kill("sim-0002")  # the TCP connection drops without DISCONNECT: the broker sends the last will
        rows = wait_rows(cloud_link, lambda r: r["sim-0002"].presence == "offline", "sim-0002's last will")

        ok, failed, dead = rows["sim-0000"], rows["sim-0001"], rows["sim-0002"]
        assert ok.presence == "online" and ok.models == {"digits": "1"}
        assert ok.last_update is not None and ok.last_update.release_id == rel.release_id
        assert (ok.last_update.state, ok.last_update.result, ok.last_update.reason) == ("committed", "success", None)
        assert failed.presence == "online" and failed.models == {"digits": "0"}  # the old version keeps serving
        assert failed.last_update is not None and failed.last_update.result == "failed"
        assert "simulated failure" in (failed.last_update.reason or "")
        assert dead.models == {"digits": "1"} and dead.last_update is not None  # its last retained state stays
        assert dead.last_seen is not None and dead.last_seen <= time.time()
        assert [r.presence for r in rows.values()].count("online") == 4

        # --json: the same rows, machine-readable.
        assert ota_cli.main(["fleet", "status", "--fleet", FLEET, "--broker", broker.url, "--json"]) == 0
        shown = {r["device_id"]: r for r in json.loads(capsys.readouterr().out)}
        assert sorted(shown) == sim.device_ids
        assert shown["sim-0002"]["presence"] == "offline"
        assert shown["sim-0001"]["last_update"]["result"] == "failed"
        assert shown["sim-0000"]["models"] == {"digits": "1"}
        assert shown["sim-0000"]["updates"]["digits"]["release_id"] == rel.release_id

        # The table: a title with the online count, one row per device.
        assert ota_cli.main(["fleet", "status", "--fleet", FLEET, "--broker", broker.url]) == 0
        table = capsys.readouterr().out
        assert "fleet plant-f: 4/5 online" in table and "offline" in table
    finally:
        sim.stop()

    # A clean stop publishes "offline" before disconnecting.
    rows = wait_rows(cloud_link, lambda r: all(x.presence == "offline" for x in r.values()), "every device offline")
    assert len(rows) == 5


def test_fleet_status_of_an_empty_fleet_and_an_unreachable_broker(
    broker: Broker, cloud_link: BrokerLink, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fleet_status(cloud_link, FLEET) == []
    assert ota_cli.main(["fleet", "status", "--fleet", FLEET, "--broker", broker.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    url = f"mqtt://127.0.0.1:{free_port()}"
    assert ota_cli.main(["fleet", "status", "--fleet", FLEET, "--broker", url]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot reach the MQTT broker at {url}")
    assert ota_cli.main(["fleet", "status", "--fleet", "bad/fleet", "--broker", broker.url]) == 2
    assert "invalid fleet" in capsys.readouterr().err
