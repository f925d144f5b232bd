"""AgentSlots' start-up rules on small slot folders (no binary runs): every state a kill -9 can leave is repaired.

The real frozen builds run in test_agent_update.py; here each interrupted state is laid out exactly
and ``boot`` must restore the invariant "without a pending update, ``current`` is ``good``".
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from edge_agent.errors import RejectedError
from edge_agent.update.agent.slots import AgentSlots, verify_manifest, write_manifest


@pytest.fixture
def slots(tmp_path: Path) -> AgentSlots:
    root = tmp_path / "agent"
    for slot, version in (("a", "1.0.0"), ("b", "2.0.0")):
        (root / "slots" / slot).mkdir(parents=True)
        binary = root / "slots" / slot / "edge-agent"
        binary.write_text("#!/bin/sh\nexit 0\n")  # its __selftest__ passes
        binary.chmod(0o755)
        write_manifest(root / "slots" / slot, version)
    os.symlink("slots/a", root / "current")
    os.symlink("slots/a", root / "good")
    return AgentSlots(root, tmp_path / "data", max_starts=2, now=lambda: 1000.0)


def pending(slots: AgentSlots) -> None:
    """The state ``switch`` persists before it moves ``current``."""
    slots.data_dir.mkdir(exist_ok=True)
    st = slots.state()
    st["pending"] = {"version": "2.0.0", "slot": "b", "previous": "a", "attempts": 0, "since": 1.0}
    slots._save(st)


def test_killed_between_pending_and_switch(slots: AgentSlots) -> None:
    pending(slots)
    assert "agent 1.0.0 in slot a" in slots.boot()
    st = slots.state()
    assert st["pending"] is None and st["last"]["result"] == "failed"
    assert st["last"]["reason"] == "interrupted before the switch" and slots.link("current") == "a"


def test_unconfirmed_starts_then_revert(slots: AgentSlots) -> None:
    pending(slots)
    slots._point("current", "b")
    assert slots.boot().startswith("start 1 of 2") and slots.boot().startswith("start 2 of 2")
    assert "rolled back agent 2.0.0" in slots.boot()
    st = slots.state()
    assert st["last"]["result"] == "rolled-back" and "not confirmed in 2 starts" in st["last"]["reason"]
    assert slots.link("current") == slots.link("good") == "a"


def test_killed_during_a_revert_or_a_confirm(slots: AgentSlots) -> None:
    slots.data_dir.mkdir()
    slots._save(slots.state())
    slots._point("current", "b")  # a revert saved its result but did not switch back: no pending, current != good
    slots.boot()
    assert slots.link("current") == "a"
    st = slots.state()
    st["good"] = {"slot": "b", "version": "2.0.0"}  # a confirm saved the state but did not move `good`
    slots._save(st)
    slots._point("current", "b")
    slots.boot()
    assert slots.link("good") == slots.link("current") == "b"


def test_confirm_and_the_rules_of_install(slots: AgentSlots, tmp_path: Path) -> None:
    pending(slots)
    assert not slots.confirm()  # not switched: nothing to confirm
    slots._point("current", "b")
    assert slots.confirm() and slots.link("good") == "b" and slots.state()["last"]["result"] == "committed"
    with pytest.raises(RejectedError, match="anti-rollback"):
        slots.stage(slots.slot_dir("a"), "1.0.0")
    (tmp_path / "bad.tar").write_bytes(b"not a tar")
    with pytest.raises(RejectedError, match="not a readable tar"):
        slots.stage(tmp_path / "bad.tar", "3.0.0")
    assert not (slots.root / "slots" / ".tmp-a").exists() and verify_manifest(slots.slot_dir("a")) == []


def test_stage_runs_the_new_builds_selftest_and_a_signed_rollback_may_go_back(
    slots: AgentSlots, tmp_path: Path
) -> None:
    from edge_agent.errors import ValidationError

    two, failing = tmp_path / "two", tmp_path / "failing"
    shutil.copytree(slots.slot_dir("b"), two)
    shutil.copytree(slots.slot_dir("b"), failing)
    (failing / "edge-agent").write_text("#!/bin/sh\necho golden mismatch >&2\nexit 1\n")
    write_manifest(failing, "3.0.0")
    with pytest.raises(ValidationError, match=r"self-test of slot b failed \(exit 1\): golden mismatch"):
        slots.stage(failing, "3.0.0")
    assert slots.link("current") == "a" and slots.state()["pending"] is None
    assert verify_manifest(slots.slot_dir("b")) == []  # the failed build sits in the inactive slot, unused
    slots.switch(slots.stage(two, "2.0.0"), "2.0.0")
    assert slots.link("current") == "b" and slots.confirm()
    old = tmp_path / "old"
    shutil.copytree(slots.slot_dir("a"), old)
    assert slots.stage(old, "1.0.0", rollback=True) == "a"  # an explicit rollback release
