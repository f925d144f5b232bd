"""Upgrading with the package after a self-update (#11): the package's build becomes the good agent.

Installing the package is an explicit operator action, as in RAUC and Mender: postinst makes slot a
(the package's build) good in the slot state, drops slot b and any pending update, and removes
files a self-update left in slot a. Without it, the next start (``__boot__``) switches back to the
slot the state still calls good, and the new package never runs.

The payloads are stand-ins (a script and a library with a manifest): what is under test is the
package's maintainer scripts and the slot rules the agent runs at every start (``AgentSlots.boot``,
what ``__boot__`` runs); tests/test_deb.py installs and runs the real frozen build.
"""

from __future__ import annotations

import pwd
import shutil
import stat
from pathlib import Path

from edge_agent.update.agent.slots import AgentSlots, verify_manifest, write_manifest
from tests.support.deb import AGENT, PKG, STATE, build_deb, dpkg, package_machine, stand_in


def install(deb: Path) -> None:
    done = dpkg("-i", str(deb))
    assert done.returncode == 0, done.stderr + done.stdout


def self_update(slots: AgentSlots, build: Path, *, confirm: bool) -> str:
    """What the agent's own update writes: the build into the inactive slot, ``pending``, the switch, the confirm."""
    version = (build / "VERSION").read_text().strip()
    target = "b" if slots.link("current") == "a" else "a"
    shutil.rmtree(slots.slot_dir(target), ignore_errors=True)
    shutil.copytree(build, slots.slot_dir(target), symlinks=True)
    slots.switch(target, version)
    if confirm:
        assert slots.confirm()
    return target


def test_a_package_installed_after_self_updates_is_what_starts(tmp_path: Path) -> None:
    v1 = build_deb(stand_in(tmp_path / "v1", "0.0.1"), tmp_path / "deb1")
    v2 = build_deb(stand_in(tmp_path / "v2", "0.1.0"), tmp_path / "deb2")
    with package_machine():
        install(v1)
        slots = AgentSlots(AGENT, STATE)
        assert slots.boot() == "agent 0.0.1 in slot a"

        # a committed self-update to slot b, then the package 0.1.0: it runs, not b
        assert self_update(slots, stand_in(tmp_path / "s1", "0.0.2"), confirm=True) == "b"
        assert slots.boot() == "agent 0.0.2 in slot b"
        install(v2)
        assert slots.state() == {
            "good": {"slot": "a", "version": "0.1.0"},
            "pending": None,
            "last": slots.state()["last"],
        }
        assert slots.state()["last"]["result"] == "committed"  # the history is kept
        assert slots.boot() == "agent 0.1.0 in slot a"
        assert slots.link("current") == slots.link("good") == "a" and not slots.slot_dir("b").exists()
        st = (STATE / "agent-update.json").stat()
        assert (pwd.getpwuid(st.st_uid).pw_name, stat.S_IMODE(st.st_mode)) == ("edgefleet", 0o600)

        # self-updates to b (committed), then to a (pending, one start): its build replaced slot a
        # with a file the package does not ship. The package again: its exact build, nothing pending
        self_update(slots, stand_in(tmp_path / "s2", "0.2.0"), confirm=True)
        s3 = stand_in(tmp_path / "s3", "0.3.0")
        (s3 / "_internal" / "only-in-0.3.0.so").write_bytes(b"a library the package does not ship")
        write_manifest(s3, "0.3.0")
        assert self_update(slots, s3, confirm=False) == "a"
        assert slots.boot() == "start 1 of 3 of agent 0.3.0"
        install(v2)  # a reinstall: the operator's choice again
        assert verify_manifest(AGENT / "slots" / "a") == [] and (AGENT / "slots/a/VERSION").read_text() == "0.1.0\n"
        st2 = slots.state()
        assert st2["good"] == {"slot": "a", "version": "0.1.0"} and st2["pending"] is None
        last = st2["last"]
        assert (last["result"], last["version"]) == ("failed", "0.3.0")  # what an update waiting for its confirm reads
        assert last["reason"] == "superseded by package edgefleet-agent 0.1.0"
        assert slots.boot() == "agent 0.1.0 in slot a"

        done = dpkg("--purge", PKG)
        assert done.returncode == 0, done.stderr
        assert not STATE.exists() and not AGENT.exists()
