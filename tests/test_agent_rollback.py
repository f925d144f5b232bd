"""Anti-rollback and signed rollback for releases of the agent itself (kind ``agent``, #11).

The cloud registers and signs agent releases (``register_agent``, ``plan_release(kind="agent")``);
the device authenticates and admits each document with the version its slots run
(``AgentInstaller.current``), as the update coordinator does, and stages the admitted one into its
inactive slot. The builds are stand-ins (a script whose self-test passes, with a manifest): what is
under test is the version rule. One test runs it end to end: the real frozen agent, a real broker,
and the rejection in the device's report (the artifact is never fetched, so it may be a stand-in);
tests/test_agent_ota.py releases and installs a real frozen build.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from cloud_batch.fleetops.release import plan_release, release
from cloud_batch.registry.agents import register_agent
from edge_agent.errors import RejectedError
from edge_agent.update.admission import AGENT_RELEASE_NAME, Admission, authenticate_release
from edge_agent.update.agent.installer import ARCHIVE, AgentInstaller
from edge_agent.update.agent.slots import AgentSlots
from edge_agent.update.seams import Control
from edge_agent.update.states import Event, UpdateRecord
from edge_agent.wire.protocol import Release
from edge_agent.wire.signing import load_public_key
from tests.broker import Broker
from tests.support.deb import stand_in
from tests.support.env import free_port
from tests.support.slots import Supervisor, install_root

RUNNING, OLDER, NEWER = "0.2.0", "0.1.0", "0.3.0"


def signed(reg: Path, key: Path, version: str, records: Path, *, rollback: bool = False) -> bytes:
    """The signed release document of agent ``version``, as the cloud publishes it."""
    plan = plan_release(reg, AGENT_RELEASE_NAME, version, "f1", key, kind="agent", rollback=rollback,
                        record_dir=records)  # fmt: skip
    return json.dumps(plan.signed).encode()


def test_an_older_agent_release_is_refused_unless_it_is_a_signed_rollback(
    tmp_path: Path, key_files: tuple[Path, Path]
) -> None:
    key, pub = key_files
    reg = tmp_path / "reg"
    for version in (OLDER, NEWER):
        register_agent(reg, stand_in(tmp_path / "builds" / version, version), version)
    slots = AgentSlots(install_root(stand_in(tmp_path / "running", RUNNING), tmp_path / "agent"), tmp_path / "data")
    device = AgentInstaller(slots, lambda why: None, selftest_timeout_s=30)
    admission = Admission("f1", "d1", (load_public_key(pub),), 1 << 30)

    def admit(payload: bytes) -> Release:
        release, doc = authenticate_release(payload, admission.trusted)
        admission.admit(release, doc, device.current(release.name), lambda key: None, time.time())
        return release

    records = tmp_path / "records"
    with pytest.raises(RejectedError) as refused:
        admit(signed(reg, key, OLDER, records))
    assert str(refused.value) == (  # the reason the device reports with result "rejected"
        f"anti-rollback: agent version {OLDER} is not newer than the running version {RUNNING} "
        "and the release is not a signed rollback"
    )
    assert slots.link("current") == "a" and not slots.slot_dir("b").exists()  # nothing downloaded or staged
    assert admit(signed(reg, key, NEWER, records)).version == NEWER

    rollback = admit(signed(reg, key, OLDER, records, rollback=True))
    assert (rollback.version, rollback.rollback) == (OLDER, True)
    artifact = reg / AGENT_RELEASE_NAME / OLDER / ARCHIVE
    with pytest.raises(RejectedError, match="anti-rollback"):  # the slots hold the same rule without the flag
        slots.stage(artifact, OLDER)
    slot = slots.install(artifact, OLDER, rollback=rollback.rollback)
    assert slots.boot() == f"start 1 of 3 of agent {OLDER}" and slots.confirm()
    status: dict[str, Any] = slots.status()
    assert (status["agent_version"], status["slot"], status["last"]["result"]) == (OLDER, slot, "committed")


def test_a_rollback_must_be_signed_as_one(tmp_path: Path, key_files: tuple[Path, Path]) -> None:
    """The ``rollback`` flag is inside the signed document: setting it on an older release breaks the signature."""
    key, pub = key_files
    reg = tmp_path / "reg"
    register_agent(reg, stand_in(tmp_path / OLDER, OLDER), OLDER)
    doc = json.loads(signed(reg, key, OLDER, tmp_path / "records"))
    doc.update(rollback=True, expires_at=round(time.time()) + 3600)  # a rollback must also expire
    with pytest.raises(RejectedError, match="signature"):
        authenticate_release(json.dumps(doc).encode(), (load_public_key(pub),))


def test_an_agent_release_that_never_confirms_ends_with_the_slots_reason(
    tmp_path: Path, key_files: tuple[Path, Path]
) -> None:
    """The machine's steps for kind agent on a build that crashes at every start: the update's reason."""
    key, pub = key_files
    reg = tmp_path / "reg"
    registered = register_agent(reg, stand_in(tmp_path / NEWER, NEWER), NEWER)
    slots = AgentSlots(install_root(stand_in(tmp_path / "running", RUNNING), tmp_path / "agent"), tmp_path / "data")
    restarts: list[str] = []
    device = AgentInstaller(slots, restarts.append, selftest_timeout_s=30, poll_s=0.01)
    rel, doc = authenticate_release(signed(reg, key, NEWER, tmp_path / "records"), (load_public_key(pub),))
    record = UpdateRecord(rel.release_id, rel.name, rel.version, doc, kind="agent")
    control = Control()
    device.check(record, rel, registered)  # the unpacked artifact: the registry's folder
    device.validate(record, rel, registered, control)
    device.activate(record, rel, registered, control)
    assert restarts and slots.link("current") == record.details["slot"] == "b"
    boots = [slots.boot() for _ in range(4)]  # the unit's ExecStartPre; the new build dies after each
    assert boots[-1] == f"rolled back agent {NEWER}: not confirmed in 3 starts (crashed or unhealthy)"
    assert device.watch(record, rel, control) == (
        Event.HEALTH_BREACH,
        f"agent {NEWER} rolled-back: not confirmed in 3 starts (crashed or unhealthy)",
    )
    assert device.restore(record, control, False) == RUNNING and slots.link("current") == "a"


def test_the_running_agent_reports_an_older_release_as_rejected(
    frozen_agent: Path, tmp_path: Path, broker: Broker, key_files: tuple[Path, Path], cloud_link: Any
) -> None:
    key, pub = key_files
    running = (frozen_agent / "VERSION").read_text().strip()
    older = "0.0.1"
    assert running != older
    reg = tmp_path / "reg"
    register_agent(reg, stand_in(tmp_path / older, older), older)
    device = install_root(frozen_agent, tmp_path / "agent")
    sup = Supervisor(device, tmp_path / "data", free_port(), tmp_path / "agent.log", EDGEFLEET_MQTT__BROKER=broker.url,
                     EDGEFLEET_MQTT__TRUST=str(pub), EDGEFLEET_MQTT__DEVICE_ID="d1",
                     EDGEFLEET_MQTT__FLEET="f1").start()  # fmt: skip
    try:
        sup.wait("connected", lambda st: st["broker"]["connected"] and st["ota"]["agent_version"] == running)
        rel = release(reg, AGENT_RELEASE_NAME, older, "f1", key, cloud_link, kind="agent", progress=False)
        st: Any = sup.wait("a result", lambda st: (st["ota"]["updates"].get(AGENT_RELEASE_NAME) or {}).get("result"))
        report = st["ota"]["updates"][AGENT_RELEASE_NAME]
        assert (report["release_id"], report["version"], report["result"]) == (rel.release_id, older, "rejected")
        assert report["reason"].startswith(f"anti-rollback: agent version {older} is not newer than the running")
        assert st["ota"]["agent_slot"] == "a" and sup.exits == []  # still serving, nothing switched
    finally:
        sup.stop()
