"""Agent self-update on A/B slots (#11 part 4) with real frozen builds and a supervisor that restarts like the unit.

The second build is the session's build with another VERSION (hard-linked copies of the real
binary); "crashes at start" drops the HTTP parser's extension module from it (``run`` dies on
import, while ``__selftest__``, which serves no HTTP, passes); "never confirms" is a device whose broker is
unreachable, so the new agent is never healthy within its window.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.config import load_config
from edge_agent.errors import ValidationError
from edge_agent.models import sealed
from edge_agent.models.store import ModelStore
from edge_agent.update.agent.liveness import attach_self_update
from edge_agent.update.agent.slots import RESTART_EXIT, AgentSlots, device_slots
from edge_agent.update.agent.watch import open_slot_watch
from tests.support.env import PYTHON, REPO, free_port
from tests.support.frozen import agent_env, digits_body
from tests.support.slots import Supervisor, install_root, tar_of, variant


def http_parser(build: Path) -> str:
    """httptools' compiled parser in the build (``run`` imports it; ``__selftest__`` does not)."""
    return next((build / "_internal" / "httptools" / "parser").glob("parser.*.so")).relative_to(build).as_posix()


@pytest.fixture
def device(frozen_agent: Path, tmp_path: Path) -> Path:
    """An agent root as the .deb lays it out (slot a = the session's build)."""
    return install_root(frozen_agent, tmp_path / "agent")


@pytest.fixture
def supervise(device: Path, tmp_path: Path) -> Iterator[Any]:
    started: list[Supervisor] = []

    def start(**env: str) -> Supervisor:
        s = Supervisor(device, tmp_path / "data", free_port(), tmp_path / "agent.log", **env).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def agent_cli(device: Path, data: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(device / "current" / "edge-agent"), "agent", *args, "--data-dir", str(data)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=agent_env(**env))


def upd(st: dict[str, Any]) -> dict[str, Any]:
    return dict(st["agent_update"])


def test_a_good_update_commits(device: Path, frozen_agent: Path, tmp_path: Path, supervise: Any) -> None:
    old = (frozen_agent / "VERSION").read_text().strip()
    sup = supervise()
    sup.wait("first start", lambda st: upd(st)["slot"] == "a")
    new = tar_of(variant(frozen_agent, tmp_path / "v2", "9.0.0"), tmp_path / "edge-agent-9.0.0.tar")
    done = agent_cli(device, tmp_path / "data", "install", str(new), "--version", "9.0.0")
    assert done.returncode == 0, done.stderr
    # `committed` is saved before the `good` link moves (boot() repairs it from the state): wait for both
    st = sup.wait(
        "new agent confirmed",
        lambda st: (upd(st)["last"] or {}).get("result") == "committed" and os.readlink(device / "good") == "slots/b",
    )
    assert upd(st)["slot"] == "b" and upd(st)["agent_version"] == "9.0.0" and upd(st)["pending"] is None
    assert os.readlink(device / "good") == "slots/b" and sup.exits == [RESTART_EXIT]
    assert (device / "slots" / "a" / "VERSION").read_text().strip() == old  # the previous slot stays for a rollback
    assert supervise_infer(sup) == 200
    # anti-rollback: the old build is refused unless the update is an explicit rollback
    back = tar_of(variant(frozen_agent, tmp_path / "v1", old), tmp_path / "old.tar")
    refused = agent_cli(device, tmp_path / "data", "install", str(back), "--version", old)
    assert refused.returncode == 1 and "anti-rollback" in refused.stderr, refused.stderr
    assert os.readlink(device / "current") == "slots/b"


def test_a_build_that_crashes_at_start_is_reverted(
    device: Path, frozen_agent: Path, tmp_path: Path, supervise: Any
) -> None:
    sup = supervise(EDGEFLEET_AGENT_UPDATE__MAX_STARTS="2")
    sup.wait("first start", lambda st: upd(st)["slot"] == "a")
    broken = variant(frozen_agent, tmp_path / "v2", "9.0.0", drop=(http_parser(frozen_agent),))
    done = agent_cli(device, tmp_path / "data", "install", str(broken), "--version", "9.0.0")
    assert done.returncode == 0, done.stderr  # the self-test passes: only `run` serves HTTP
    st = sup.wait("rolled back", lambda st: (upd(st)["last"] or {}).get("result") == "rolled-back")
    assert upd(st)["slot"] == "a" and upd(st)["pending"] is None
    assert "not confirmed in 2 starts" in upd(st)["last"]["reason"]
    assert sup.exits[0] == RESTART_EXIT and sup.exits[1:] == [1, 1]  # two crashed starts of the new slot
    assert os.readlink(device / "current") == os.readlink(device / "good") == "slots/a"


def test_a_build_that_never_confirms_is_reverted(
    device: Path, frozen_agent: Path, tmp_path: Path, supervise: Any
) -> None:
    pub = tmp_path / "signing.pub"
    pub.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    sup = supervise(EDGEFLEET_MQTT__BROKER=f"mqtt://127.0.0.1:{free_port()}", EDGEFLEET_MQTT__TRUST=str(pub),
                    EDGEFLEET_MQTT__DEVICE_ID="d1", EDGEFLEET_AGENT_UPDATE__HEALTH_WINDOW_S="3")  # fmt: skip
    sup.wait("first start", lambda st: upd(st)["slot"] == "a")
    new = variant(frozen_agent, tmp_path / "v2", "9.0.0")
    assert agent_cli(device, tmp_path / "data", "install", str(new), "--version", "9.0.0").returncode == 0
    st = sup.wait("rolled back, old agent serving", lambda st: (upd(st)["last"] or {}).get("result") == "rolled-back"
                  and st["ota"]["agent_slot"] == "a" and len(sup.exits) == 2)  # fmt: skip
    assert "not healthy within the 3 s health window" in upd(st)["last"]["reason"]
    assert upd(st)["slot"] == "a" and sup.exits == [RESTART_EXIT, RESTART_EXIT]


# The installer, killed right after ``pending`` is persisted and before ``current`` moves: the same steps as
# `agent install` (AgentSlots.stage, then switch), with the switch's first link write replaced by a kill -9.
KILL_AT_SWITCH = """
import os, signal, sys
from pathlib import Path
from edge_agent.update.agent.slots import AgentSlots
slots = AgentSlots(Path(sys.argv[1]), Path(sys.argv[2]))
slot = slots.stage(Path(sys.argv[3]), sys.argv[4])
AgentSlots._point = lambda *_: os.kill(os.getpid(), signal.SIGKILL)
slots.switch(slot, sys.argv[4])
"""


def kill_while_unpacking(device: Path, data: Path, new: Path) -> None:
    """The frozen `agent install`, kill -9 once its ``slots/.tmp-b`` appears (unpacking 220 MB takes seconds)."""
    cmd = [str(device / "current" / "edge-agent"), "agent", "install", str(new), "--version", "9.0.0",
           "--data-dir", str(data)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=agent_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not (device / "slots" / ".tmp-b").exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the installer ended before the kill"
    # what it interrupted: a half-unpacked slot, `current` untouched, nothing pending
    assert (device / "slots" / ".tmp-b").is_dir() and not (device / "slots" / "b").exists()
    assert not (data / "agent-update.json").exists()


def kill_when_pending_saved(device: Path, data: Path, new: Path) -> None:
    done = subprocess.run([PYTHON, "-c", KILL_AT_SWITCH, str(device), str(data), str(new), "9.0.0"], cwd=REPO,
                          env=agent_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    # what it interrupted: slot b staged and self-tested, `pending` saved, `current` not yet switched
    pending = json.loads((data / "agent-update.json").read_text())["pending"]
    assert (pending["version"], pending["slot"], pending["attempts"]) == ("9.0.0", "b", 0)
    assert (device / "slots" / "b" / "VERSION").read_text().strip() == "9.0.0"


@pytest.mark.parametrize(
    ("kill", "last"),
    [(kill_while_unpacking, None), (kill_when_pending_saved, ("failed", "interrupted before the switch"))],
    ids=["unpacking", "pending saved"],
)
def test_kill_9_during_the_switch_recovers(
    device: Path, frozen_agent: Path, tmp_path: Path, supervise: Any, kill: Any, last: tuple[str, str] | None
) -> None:
    """kill -9 of the installer while it unpacks, and right after ``pending`` is persisted (before the switch)."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    kill(device, data, variant(frozen_agent, tmp_path / "v2", "9.0.0"))
    assert os.readlink(device / "current") == os.readlink(device / "good") == "slots/a"
    sup = supervise()
    slots = AgentSlots(device, data)
    # confirm() persists the state, then moves `good` (boot() repairs a kill between): wait for both
    st = sup.wait("serving after the kill", lambda st: upd(st)["pending"] is None and st["models"]
                  and slots.link("good") == upd(st)["slot"])  # fmt: skip
    assert slots.link("current") == slots.link("good") == slots.state()["good"]["slot"] == upd(st)["slot"] == "a"
    assert (None if upd(st)["last"] is None else (upd(st)["last"]["result"], upd(st)["last"]["reason"])) == last
    assert sup.exits == [] and supervise_infer(sup) == 200


def test_the_selftest_opens_a_sealed_model_with_the_devices_key(device: Path, tmp_path: Path, digits_dir: Path) -> None:
    """A device serving an encrypted model (#14) self-tests a new build with its fleet key and runtime options."""
    key, pub = sealed.generate_fleet_key(tmp_path / "keys")
    sealed.seal_version_dir(digits_dir, tmp_path / "sealed", sealed.load_fleet_pub(pub))
    data = tmp_path / "data"
    ModelStore(data, fleet_key=key).install_dir(tmp_path / "sealed")
    with pytest.raises(ValidationError, match="no fleet key"):  # without the device's settings: every update refused
        AgentSlots(device, data).selftest("a", 120)
    cfg = load_config(env={}, overrides={"data_dir": str(data), "agent_update": {"root": str(device)},
                                         "ota": {"fleet_key": str(key)}, "runtime": {"num_threads": 1}})  # fmt: skip
    slots = device_slots(cfg)
    assert (slots.fleet_key, slots.runtime) == (key, cfg.runtime.options())
    slots.selftest("a", 120)  # the frozen build's __selftest__ opens and golden-checks the sealed model


def test_ota_self_updates_self_test_with_the_devices_key_and_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The OTA path: the running agent's slot watch (``open_slot_watch``), whose slots ``attach_self_update``
    gives the agent installer, self-tests with the device's fleet key and runtime options."""
    root = tmp_path / "agent"
    (root / "slots" / "a").mkdir(parents=True)
    (root / "slots" / "a" / "VERSION").write_text("0.1.0\n")
    os.symlink("slots/a", root / "current")
    monkeypatch.setattr(sys, "frozen", True, raising=False)  # a frozen agent running from slot a
    monkeypatch.setattr(sys, "executable", str(root / "slots" / "a" / "edge-agent"))
    key, _ = sealed.generate_fleet_key(tmp_path / "keys")
    cfg = load_config(env={}, overrides={"data_dir": str(tmp_path / "data"), "agent_update": {"root": str(root)},
                                         "ota": {"fleet_key": str(key)},
                                         "runtime": {"num_threads": 1}})  # fmt: skip
    watch = open_slot_watch(cfg, lambda: True, print)
    assert watch is not None
    slots = watch.slots
    assert (slots.fleet_key, slots.runtime) == (key, cfg.runtime.options())
    attached: list[tuple[Any, str, str]] = []  # what OtaAgent.attach_agent was given
    attach_self_update(
        SimpleNamespace(attach_agent=lambda *args: attached.append(args)), watch, print, cfg.agent_update
    )
    [(installer, version, slot)] = attached
    assert installer.slots is slots and (version, slot) == ("0.1.0", "a")


def supervise_infer(sup: Supervisor) -> int:
    import http.client

    from tests.support.telemetry import call

    conn = http.client.HTTPConnection("127.0.0.1", sup.port, timeout=10)
    try:
        return call(conn, "POST", "/v2/models/digits/infer", digits_body())[0]
    finally:
        conn.close()
