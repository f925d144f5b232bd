"""Agent self-update through the signed release flow (#11 part 4): register, release over a real broker, commit.

The cloud registers a real frozen build (a hard-linked copy of the session's build with another
VERSION), releases it as kind ``agent``, signed and chunked; the device is the session's build in
slot a under the test's supervisor (tests/support/slots.py), connected to a real mosquitto.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cloud_batch.errors import InputError, RegistryError
from cloud_batch.fleetops.release import plan_release, release
from cloud_batch.registry.agents import register_agent
from tests.broker import Broker
from tests.support.env import free_port
from tests.support.slots import Supervisor, install_root, variant


def test_register_refuses_a_build_that_is_not_what_it_says(frozen_agent: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="VERSION says"):
        register_agent(tmp_path / "reg", frozen_agent, "9.9.9")
    bad = variant(frozen_agent, tmp_path / "bad", "9.9.9")
    tampered = bad / "_internal" / "base_library.zip"
    tampered.unlink()  # a hard link to the session's build: replaced, not written through
    tampered.write_bytes(b"changed after the manifest")
    with pytest.raises(InputError, match="SHA256SUMS"):
        register_agent(tmp_path / "reg", bad, "9.9.9")
    with pytest.raises(RegistryError, match="not registered"):
        plan_release(tmp_path / "reg", "edge-agent", "9.9.9", "f1", tmp_path / "none.key", kind="agent")


def test_a_released_agent_is_installed_switched_and_committed(
    frozen_agent: Path, tmp_path: Path, broker: Broker, key_files: tuple[Path, Path], cloud_link: Any
) -> None:
    key, pub = key_files
    device = install_root(frozen_agent, tmp_path / "agent")
    sup = Supervisor(device, tmp_path / "data", free_port(), tmp_path / "agent.log", EDGEFLEET_MQTT__BROKER=broker.url,
                     EDGEFLEET_MQTT__TRUST=str(pub), EDGEFLEET_MQTT__DEVICE_ID="d1",
                     EDGEFLEET_MQTT__FLEET="f1").start()  # fmt: skip
    try:
        sup.wait("connected", lambda st: st["broker"]["connected"] and st["ota"]["agent_slot"] == "a")
        registered = register_agent(tmp_path / "reg", variant(frozen_agent, tmp_path / "v2", "9.0.0"), "9.0.0")
        assert sorted(p.name for p in registered.iterdir()) == ["VERSION", "edge-agent.tar.gz"]
        with pytest.raises(InputError, match="named 'edge-agent'"):
            plan_release(tmp_path / "reg", "digits", "9.0.0", "f1", key, kind="agent")
        rel = release(tmp_path / "reg", "edge-agent", "9.0.0", "f1", key, cloud_link, kind="agent", progress=False)
        assert rel.kind == "agent" and len(rel.artifact.chunks) > 1  # signed and chunked like a model
        st = sup.wait("committed", lambda st: (st["ota"]["updates"].get("edge-agent") or {}).get("result")
                      == "success", timeout=300)  # fmt: skip
        assert st["ota"]["agent_version"] == "9.0.0" and st["ota"]["agent_slot"] == "b"
        assert st["agent_update"]["last"]["result"] == "committed" and sup.exits == [75]
    finally:
        sup.stop()
