"""The cloud side trusts nothing on the wire (#14): forged retained releases, ghost devices, hostile device states.

Every attack is published on a real mosquitto the way an attacker with broker access would:
retained documents written by hand, never through the cloud's own code. The commands run
through ``cloud-batch`` (``cloud_batch.cli.ota.main``) as an operator would run them, and each
test has a control showing the attack would have shown up had it worked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloud_batch.cli import ota as ota_cli
from cloud_batch.fleetops.broker import BrokerLink
from edge_agent.wire.protocol import DeviceState, Release, UpdateReport, encode
from edge_agent.wire.topics import device_state_topic, presence_topic, release_topic
from tests.broker import Broker, retained
from tests.support.releases import release_digits

FLEET = "plant-s"


def report(link: BrokerLink, device_id: str, rel: Release, result: str) -> None:
    """A device's retained state saying how ``rel`` went (as an attacker, or a real device, would publish it)."""
    state = DeviceState(
        device_id,
        FLEET,
        {"digits": rel.version if result == "success" else "0"},
        {"digits": UpdateReport(rel.release_id, "digits", rel.version, "committed", result, None)},
    )
    link.publish(device_state_topic(FLEET, device_id), encode(state.to_dict()), retain=True, wait_s=10)


def status(cli_args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    code = ota_cli.main(["rollout", "status", "digits", *cli_args, "--json"])
    return code, json.loads(capsys.readouterr().out)


@dataclass
class Rig:
    """The broker, a cloud link, the signing key and the registry the rollout commands read."""

    broker: Broker
    link: BrokerLink
    key: Path
    record: Path
    args: list[str]  # what every `rollout` command of these tests is given

    def release(self, max_failure_rate: float) -> Release:
        return release_digits(self.link, self.key, FLEET, record_dir=self.record, max_failure_rate=max_failure_rate)


@pytest.fixture
def rig(broker: Broker, cloud_link: BrokerLink, key_files: tuple[Path, Path], tmp_path: Path) -> Rig:
    record = tmp_path / "registry"
    args = ["--fleet", FLEET, "--broker", broker.url, "--registry", str(record), "--trust", str(key_files[1])]
    return Rig(broker, cloud_link, key_files[0], record, args)


def test_rollout_status_reports_the_authentic_release_under_a_forged_copy_and_publishes_nothing(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    broker, cloud_link, key, args = rig.broker, rig.link, rig.key, rig.args
    rel = rig.release(0.2)
    for i, result in enumerate(["failed", "failed", "success", "success"]):
        report(cloud_link, f"dev-{i}", rel, result)
    # Control: with the authentic release retained, 2/4 failed is over the 20 % threshold.
    code, before = status(args, capsys)
    assert (code, before["failure_rate"], before["max_failure_rate"], before["problems"]) == (1, 0.5, 0.2, [])

    # The attack: the same release_id, max_failure_rate 1.0, the old signature kept (not re-signed).
    topic = release_topic(FLEET, "digits")
    forged = json.loads(retained(broker.url)[topic])
    forged["policy"]["max_failure_rate"] = 1.0
    cloud_link.publish(topic, encode(forged), retain=True, wait_s=10)
    on_broker = retained(broker.url)

    code, after = status(args, capsys)
    assert code == 1, "the forged threshold must not hide the failures"
    assert (after["release_id"], after["max_failure_rate"], after["failure_rate"]) == (rel.release_id, 0.2, 0.5)
    assert after["counts"]["failed"] == 2 and after["status"] == "active"
    assert any("does not verify" in p for p in after["problems"]), after["problems"]
    assert retained(broker.url) == on_broker, "rollout status published something"  # read only: nothing changed

    # The table form says so too; `advance` (which writes) halts and puts the authentic release back.
    assert ota_cli.main(["rollout", "status", "digits", *args]) == 1
    assert "does not verify" in capsys.readouterr().out
    assert ota_cli.main(["rollout", "advance", "digits", *args, "--key", str(key)]) == 1
    assert "republished the authentic release" in capsys.readouterr().out
    repaired = json.loads(retained(broker.url)[topic])
    assert repaired["policy"]["max_failure_rate"] == 0.2 and repaired["signature"] == forged["signature"]


def test_ghost_devices_do_not_count_once_the_fleet_knows_its_devices(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    cloud_link, key, record, args = rig.link, rig.key, rig.record, rig.args
    rel = rig.release(0.3)
    report(cloud_link, "dev-a", rel, "success")
    report(cloud_link, "dev-b", rel, "success")
    ghosts = [f"ghost-{i}" for i in range(5)]
    for g in ghosts:
        report(cloud_link, g, rel, "failed")

    # Control: a fleet without a device list counts everyone who reports, so the ghosts cross the threshold.
    code, open_fleet = status(args, capsys)
    assert code == 1 and open_fleet["counts"]["failed"] == 5 and open_fleet["ignored"] == []

    assert ota_cli.main(["fleet", "add", "dev-a", "dev-b", "--fleet", FLEET, "--registry", str(record)]) == 0
    capsys.readouterr()
    code, known = status(args, capsys)
    assert code == 0, known
    assert known["ignored"] == ghosts and known["cohort"] == ["dev-a", "dev-b"]
    assert (known["failure_rate"], known["counts"]["failed"], known["counts"]["success"]) == (0.0, 0, 2)
    # Ghosts cannot halt the rollout either: advance completes it.
    assert ota_cli.main(["rollout", "advance", "digits", *args, "--key", str(key)]) == 0
    assert "ignored 5 device(s) the fleet does not know" in capsys.readouterr().out


HOSTILE: dict[str, bytes] = {
    "dev-num": encode({**DeviceState("dev-num", FLEET).to_dict(), "last_seen": "yesterday"}),
    "dev-list": encode({**DeviceState("dev-list", FLEET).to_dict(), "models": ["digits", "1"]}),
    "dev-junk": b"{not json",
    "dev-huge": encode({**DeviceState("dev-huge", FLEET).to_dict(), "models": {f"m{i}": "1" for i in range(300)}}),
}


def test_fleet_status_skips_malformed_states_and_shows_markup_as_plain_text(
    broker: Broker, cloud_link: BrokerLink, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # rich wraps to the terminal width; give the table room
    for device_id, payload in HOSTILE.items():
        cloud_link.publish(device_state_topic(FLEET, device_id), payload, retain=True, wait_s=10)
    cloud_link.publish(presence_topic(FLEET, "dev-junk"), b"online", retain=True, wait_s=10)
    markup = DeviceState(
        "dev-markup",
        FLEET,
        {"[/]": "[bold]1"},
        {"[/]": UpdateReport("rel-[/]", "[/]", "[/]", "committed", "failed", "[red]pwned[/red] [link=x]y[/link]")},
    )
    cloud_link.publish(device_state_topic(FLEET, "dev-markup"), encode(markup.to_dict()), retain=True, wait_s=10)
    fine = DeviceState("dev-ok", FLEET, {"digits": "1"})
    cloud_link.publish(device_state_topic(FLEET, "dev-ok"), encode(fine.to_dict()), retain=True, wait_s=10)

    base = ["fleet", "status", "--fleet", FLEET, "--broker", broker.url]
    assert ota_cli.main([*base, "--json"]) == 0
    out = capsys.readouterr()
    rows = {r["device_id"]: r for r in json.loads(out.out)}
    # Malformed states are skipped (a device with only a presence still shows, with nothing claimed) and counted.
    assert sorted(rows) == ["dev-junk", "dev-markup", "dev-ok"]
    assert rows["dev-junk"]["models"] == {} and rows["dev-junk"]["presence"] == "online"
    assert rows["dev-ok"]["models"] == {"digits": "1"}
    assert rows["dev-markup"]["last_update"]["reason"] == "[red]pwned[/red] [link=x]y[/link]"
    assert f"skipped {len(HOSTILE)} malformed device document(s)" in out.err
    assert all(f"devices/{d}/state" in out.err for d in HOSTILE)

    assert ota_cli.main(base) == 0
    out = capsys.readouterr()
    assert "[red]pwned[/red] [link=x]y[/link]" in out.out and "[/]=[bold]1" in out.out  # literally, not rendered
    assert "fleet plant-s: 1/3 online" in out.out and "Traceback" not in out.err


def test_fleet_add_and_list_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = ["--fleet", "plant-7", "--registry", str(tmp_path / "registry")]
    assert ota_cli.main(["fleet", "list", *reg]) == 0
    assert capsys.readouterr().out == ""  # no list yet
    assert ota_cli.main(["fleet", "add", "dev-2", "dev-1", *reg]) == 0
    assert capsys.readouterr().out.strip() == "fleet plant-7: added 2 device(s), 0 already known"
    assert ota_cli.main(["fleet", "add", "dev-2", "dev-3", "dev-3", *reg]) == 0  # idempotent, duplicates once
    assert capsys.readouterr().out.strip() == "fleet plant-7: added 1 device(s), 2 already known"
    assert ota_cli.main(["fleet", "list", *reg]) == 0
    assert capsys.readouterr().out.splitlines() == ["dev-1", "dev-2", "dev-3"]

    for bad in (["dev/4"], ["+"], ["ok-1", "#"]):
        assert ota_cli.main(["fleet", "add", *bad, *reg]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: invalid device id") and "Traceback" not in err
    assert ota_cli.main(["fleet", "add", "dev-9", "--fleet", "bad/fleet", "--registry", str(tmp_path)]) == 2
    assert "invalid fleet" in capsys.readouterr().err
    assert ota_cli.main(["fleet", "list", *reg]) == 0
    assert capsys.readouterr().out.splitlines() == ["dev-1", "dev-2", "dev-3"]  # a refused add changed nothing
