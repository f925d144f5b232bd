"""The update state machine under its release policy: health window, maintenance window, urgency, aborts, rollback.

Also shutdown mid-update and the on-disk record's schema. Like ``tests/test_update.py``, these run the
real ``UpdateMachine`` on a real ``ModelStore`` with the other seams faked (``tests.support.update``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.update.seams import Control
from edge_agent.update.states import Event, State, UpdateRecord
from tests.support.update import Rig, local_time

S, E = State, Event


@pytest.fixture
def rig(tmp_path: Path, digits_dir: Path) -> Rig:
    return Rig(tmp_path, digits_dir)


def test_health_breach_rolls_back(rig: Rig) -> None:
    """Failures are driven through the health source seam (a real failing model is in test_ota)."""
    traffic = {"calls": 0, "failures": 0}

    def health(name: str) -> tuple[str | None, int, int]:
        return rig.server.get(name).version, traffic["calls"], traffic["failures"]

    def requests() -> None:
        traffic["calls"] += 4
        traffic["failures"] += 1  # 25% errors, the policy allows 5%

    rig.machine = rig.make_machine(health=health)
    rig.clock.hooks.append(requests)
    record = rig.machine.run(rig.record())
    assert record.state == "rolled_back" and record.result == "rolled-back"
    assert "above the release's maximum error rate" in (record.reason or "")
    assert rig.states()[-3:] == ["health_check", "rolling_back", "rolled_back"]
    assert rig.store.active("digits") == "1" and rig.server.get("digits").version == "1"
    assert "2" not in rig.store.state("digits").good


def test_a_quiet_health_window_passes(rig: Rig) -> None:
    assert rig.machine.run(rig.record()).state == "committed"  # no traffic: nothing to hold against it


def test_outside_the_window_it_waits_validated_then_activates_in_the_window(tmp_path: Path, digits_dir: Path) -> None:
    rig = Rig(tmp_path, digits_dir, window="02:00-03:00")
    polls = []

    def clock_moves() -> None:
        if rig.on_disk().state != "waiting_window":
            return
        polls.append(rig.clock.wall)
        assert rig.store.active("digits") == "1"  # never before the window
        if len(polls) == 3:
            rig.clock.wall = local_time(2, 15)

    rig.clock.hooks.append(clock_moves)
    record = rig.machine.run(rig.record())
    assert record.state == "committed"
    assert rig.states()[3:6] == ["validating", "waiting_window", "activating"]
    assert len(polls) >= 3


def test_urgent_ignores_the_window(tmp_path: Path, digits_dir: Path) -> None:
    rig = Rig(tmp_path, digits_dir, window="02:00-03:00", urgent=True)
    assert rig.machine.run(rig.record()).state == "committed"
    assert "waiting_window" not in rig.states()


def test_abort_before_activation_fails_and_after_activation_rolls_back(rig: Rig) -> None:
    # Superseded while waiting for the window: the candidate is dropped, 1 keeps serving.
    rig.release.policy.window = "02:00-03:00"
    control = Control()
    rig.clock.hooks.append(lambda: control.abort("superseded by release r9", before_activation_only=True))
    record = rig.machine.run(rig.record(), control)
    assert record.state == "failed" and record.reason == "superseded by release r9"
    assert rig.store.active("digits") == "1"

    # In the health window a supersede is refused, a rollout abort is not.
    rig.release.policy.window = None
    rig.release.release_id = "digits-2-r2"
    rig.clock.hooks.clear()
    control = Control()
    answers: list[bool] = []

    def during_health() -> None:
        if rig.on_disk().state == "health_check" and not answers:
            answers.append(control.abort("superseded", before_activation_only=True))
            answers.append(control.abort("rollout r2 aborted"))

    rig.clock.hooks.append(during_health)
    record = rig.machine.run(rig.record(), control)
    assert answers == [False, True]
    assert record.state == "rolled_back" and record.reason == "rollout r2 aborted"
    assert rig.store.active("digits") == "1"


def test_shutdown_keeps_the_state_for_the_next_start(tmp_path: Path, digits_dir: Path) -> None:
    rig = Rig(tmp_path, digits_dir, window="02:00-03:00")
    control = Control()
    rig.clock.hooks.append(control.shutdown)
    record = rig.machine.run(rig.record(), control)
    assert record.state == "waiting_window" and rig.on_disk().state == "waiting_window"
    rig.clock.hooks.clear()
    rig.clock.wall = local_time(2, 30)
    assert rig.make_machine().resume("digits").state == "committed"  # type: ignore[union-attr]
    assert len(rig.validated) == 1  # validated once: the resume did not redo it


def test_a_committed_update_can_be_rolled_back_by_a_rollout_abort(rig: Rig) -> None:
    record = rig.machine.run(rig.record())
    assert record.state == "committed"
    record = rig.machine.rollback_committed(record, "rollout digits-2-r1 aborted")
    assert record.state == "rolled_back" and rig.store.active("digits") == "1"
    assert rig.states()[-3:] == ["committed", "rolling_back", "rolled_back"]


def test_the_first_version_cannot_be_rolled_back(tmp_path: Path, digits_dir: Path) -> None:
    rig = Rig(tmp_path, digits_dir)
    record = rig.record()
    record.previous_version = None
    rig.machine._steps[S.HEALTH_CHECK] = lambda *a: (E.HEALTH_BREACH, "errors")
    record = rig.machine.run(record)
    assert record.state == "failed" and "nothing to roll back to" in (record.reason or "")


def test_records_round_trip_and_refuse_unknown_schemas(rig: Rig) -> None:
    rig.machine.run(rig.record())
    raw = json.loads(rig.machine.records.path("digits").read_text())
    assert raw["schema_version"] == 1 and raw["release_id"] == "digits-2-r1" and raw["state"] == "committed"
    assert UpdateRecord.from_dict(raw).to_dict() == raw
    raw["schema_version"] = 99
    with pytest.raises(Exception, match="schema_version"):
        UpdateRecord.from_dict(raw)
