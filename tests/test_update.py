"""The update state machine: its table, its resume mapping, persistence before every action, the loop breaker.

These run the real ``UpdateMachine`` against a real ``ModelStore`` on disk, with the other I/O
seams faked (artifact fetcher, validator, model server, clocks), so every path takes
milliseconds. ``tests/test_ota.py`` proves the same paths with MQTT, the TFLite runtime and
the child-process validator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import RejectedError, ValidationError
from edge_agent.update.seams import Control
from edge_agent.update.states import (
    FINAL,
    PRE_ACTIVATION,
    RESUME,
    TRANSITIONS,
    Event,
    State,
    UpdateRecord,
    recover_before_serving,
    resume_state,
)
from edge_agent.wire.protocol import Release
from tests.support.update import Rig, local_time

S, E = State, Event


@pytest.fixture
def rig(tmp_path: Path, digits_dir: Path) -> Rig:
    return Rig(tmp_path, digits_dir)


# -- the table ----------------------------------------------------------------------------
def test_every_state_is_either_final_or_has_an_error_exit() -> None:
    for state in State:
        exits = {event for (s, event) in TRANSITIONS if s is state}
        if state in FINAL:
            assert not exits, f"final state {state.value} has transitions {exits}"
        else:
            assert E.ERROR in exits, f"{state.value} has no error path"


def test_every_state_is_reachable_and_every_path_ends_final() -> None:
    reached, frontier = {S.IDLE}, [S.IDLE]
    while frontier:
        s = frontier.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src is s and dst not in reached:
                reached.add(dst)
                frontier.append(dst)
    assert reached == set(State)
    # Before activation every failure leaves the candidate unused; after it, failures roll back.
    for s in PRE_ACTIVATION:
        assert TRANSITIONS[(s, E.ERROR)] is S.FAILED
        assert TRANSITIONS[(s, E.ABORT)] is S.FAILED
    for s in (S.ACTIVATING, S.HEALTH_CHECK):
        assert TRANSITIONS[(s, E.ERROR)] is S.ROLLING_BACK
        assert TRANSITIONS[(s, E.ABORT)] is S.ROLLING_BACK
    assert TRANSITIONS[(S.HEALTH_CHECK, E.HEALTH_BREACH)] is S.ROLLING_BACK
    assert TRANSITIONS[(S.IDLE, E.REJECTED)] is S.REJECTED


def test_on_disk_names_are_frozen() -> None:
    assert [s.value for s in State] == [
        "idle",
        "downloading",
        "verifying",
        "validating",
        "waiting_window",
        "activating",
        "health_check",
        "committed",
        "rolling_back",
        "rolled_back",
        "failed",
        "rejected",
        "shadowing",
    ]


def test_resume_mapping_covers_every_state_and_unknown_means_rollback() -> None:
    assert set(RESUME) == set(State)
    for state in State:
        assert resume_state(state.value) is RESUME[state]
    assert resume_state(S.HEALTH_CHECK.value) is S.HEALTH_CHECK  # the window restarts
    for state in FINAL:
        assert resume_state(state.value) is state  # only the idempotent final action re-runs
    for unknown in ("flashing", "", "ArtifactCommit", "HEALTH_CHECK"):
        assert resume_state(unknown) is S.ROLLING_BACK


# -- running ----------------------------------------------------------------------------
def test_a_good_update_commits_and_cleans_up(rig: Rig) -> None:
    record = rig.machine.run(rig.record())
    assert record.state == "committed" and record.result == "success"
    assert rig.states() == ["idle", "downloading", "verifying", "validating", "activating", "health_check", "committed"]
    assert rig.store.active("digits") == "2"
    assert "2" in rig.store.state("digits").good
    assert rig.on_disk().previous_version == "1"
    assert not any(rig.machine.staging.iterdir()) and not any(rig.machine.downloads.iterdir())
    assert rig.changes[-1] == ("committed", "success")


def test_the_validator_is_warmed_as_a_model_download_starts_and_cooled_when_the_update_ends(rig: Rig) -> None:
    calls: list[tuple[str, list[str]]] = []  # each hook, with what had happened when it was called
    rig.machine.seams.warm = lambda: calls.append(("warm", rig.states()))
    rig.machine.seams.cool = lambda: calls.append(("cool", rig.states()))
    assert rig.machine.run(rig.record()).state == "committed"
    done = ["idle", "downloading", "verifying", "validating", "activating", "health_check", "committed"]
    assert calls == [("warm", ["idle", "downloading"]), ("cool", done)]  # warm long before validating


@pytest.mark.parametrize("state", [s for s in State if s not in FINAL])
def test_the_record_is_saved_before_each_action(tmp_path: Path, digits_dir: Path, state: State) -> None:
    """A crash inside any step leaves that step's state on disk; resuming from there finishes the update."""
    mode = "shadow" if state is S.SHADOWING else "direct"
    rig = Rig(tmp_path, digits_dir, window="02:00-03:00" if state is S.WAITING_WINDOW else None, mode=mode)
    if state is S.ROLLING_BACK:
        rig.machine._steps[S.HEALTH_CHECK] = lambda *a: (E.HEALTH_BREACH, "too many errors")
    seen: list[str] = []
    real = rig.machine._steps[state]

    def crash(record: UpdateRecord, release: Release, control: Control) -> Any:
        seen.append(rig.on_disk().state)  # what a restart would find
        raise SystemExit("kill -9")

    rig.machine._steps[state] = crash
    with pytest.raises(SystemExit):
        rig.machine.run(rig.record())
    assert seen == [state.value]
    assert rig.on_disk().state == state.value
    rig.machine._steps[state] = real
    if state is S.SHADOWING:  # promotes (the step itself, with live traffic and kill -9: test_shadow_kill9.py)
        rig.machine._steps[state] = lambda *a: (E.IN_WINDOW, "shadow passed")
    if state is S.WAITING_WINDOW:
        rig.clock.wall = local_time(2, 30)
    record = rig.machine.resume("digits")
    assert record is not None
    assert record.state == ("rolled_back" if state is S.ROLLING_BACK else "committed")
    assert rig.store.active("digits") == ("1" if state is S.ROLLING_BACK else "2")
    assert rig.states().count(state.value) == 2  # saved again when the step was redone


def test_a_crash_in_a_final_action_is_finished_on_resume(rig: Rig) -> None:
    rig.machine._finals[S.COMMITTED] = lambda record, control: (_ for _ in ()).throw(SystemExit("kill -9"))
    with pytest.raises(SystemExit):
        rig.machine.run(rig.record())
    assert rig.on_disk().state == "committed" and "2" not in rig.store.state("digits").good
    rig.machine = rig.make_machine()
    rig.machine.resume("digits")
    assert "2" in rig.store.state("digits").good


def test_a_commit_killed_before_mark_good_is_finished_before_serving(rig: Rig) -> None:
    """The next start marks the version good before anything serves, not some time after (the resume)."""
    rig.machine._finals[S.COMMITTED] = lambda record, control: (_ for _ in ()).throw(SystemExit("kill -9"))
    with pytest.raises(SystemExit):
        rig.machine.run(rig.record())
    assert rig.on_disk().state == "committed" and "2" not in rig.store.state("digits").good
    recover_before_serving(rig.data, rig.store)
    assert "2" in rig.store.state("digits").good and rig.on_disk().state == "committed"


def test_the_loop_breaker_fails_the_update_rolls_back_and_reports(rig: Rig) -> None:
    """A step that crashes the agent every time (here: the health check) cannot loop forever."""
    machine = rig.make_machine(max_loops=12)

    def crash(record: UpdateRecord, release: Release, control: Control) -> Any:
        raise SystemExit("crash during the health window")

    machine._steps[S.HEALTH_CHECK] = crash
    with pytest.raises(SystemExit):
        machine.run(rig.record())
    assert rig.store.active("digits") == "2"  # activated, then crashed
    restarts = 0
    while True:
        restarts += 1
        assert restarts < 20, "the loop breaker never tripped"
        try:
            record = machine.resume("digits")
            break
        except SystemExit:
            assert rig.on_disk().state == "health_check"
    assert record is not None
    assert record.state == "failed" and record.result == "failed"
    assert "loop breaker" in (record.reason or "")
    assert rig.store.active("digits") == "1"  # rolled back before giving up
    assert rig.changes[-1] == ("failed", "failed")  # reported
    assert rig.on_disk().loops > 12


def test_a_candidate_that_crashes_every_start_is_rolled_back_before_it_is_served(rig: Rig) -> None:
    """The agent dies while loading the candidate, before the update can resume: each start still counts."""
    machine = rig.make_machine(max_loops=10)
    machine._steps[S.HEALTH_CHECK] = lambda *a: (_ for _ in ()).throw(SystemExit("crash in service"))
    with pytest.raises(SystemExit):
        machine.run(rig.record())
    assert rig.store.active("digits") == "2"
    for starts in range(1, 20):  # noqa: B007 (read after the loop)
        recover_before_serving(rig.data, rig.store, max_loops=10)  # then the server loads 2 and crashes
        if rig.store.active("digits") == "1":
            break
    assert starts < 10
    record = rig.on_disk()
    assert record.state == "failed" and "restored before serving" in (record.reason or "")
    rig.machine.resume("digits", count_load=False)  # the next start reports it
    assert rig.changes[-1] == ("failed", "failed")


def test_an_unknown_state_on_disk_rolls_back(rig: Rig) -> None:
    record = rig.record()
    with pytest.raises(SystemExit):
        rig.machine._steps[S.HEALTH_CHECK] = lambda *a: (_ for _ in ()).throw(SystemExit())
        rig.machine.run(record)
    raw = json.loads(rig.machine.records.path("digits").read_text())
    raw["state"] = "flashing_bootloader"  # written by some future agent
    rig.machine.records.path("digits").write_text(json.dumps(raw))
    rig.machine = rig.make_machine()
    record = rig.machine.resume("digits")
    assert record is not None and record.state == "rolled_back" and record.result == "rolled-back"
    assert rig.store.active("digits") == "1"


def test_validation_failure_never_activates_and_keeps_the_previous_version(rig: Rig) -> None:
    rig.validate_error = ValidationError("golden output 'probs' differs: max abs error 0.5")
    record = rig.machine.run(rig.record())
    assert record.state == "failed" and "golden output 'probs' differs" in (record.reason or "")
    assert rig.states()[-2:] == ["validating", "failed"]
    assert rig.store.versions("digits") == ["1"] and rig.store.active("digits") == "1"
    assert not any(rig.machine.staging.iterdir())
    assert rig.fetcher.discarded == [rig.artifact.sha256]


def test_a_corrupt_artifact_fails_in_verifying(rig: Rig) -> None:
    rig.fetcher.blobs[rig.artifact.sha256] = rig.blob[:-10] + b"x" * 10
    record = rig.machine.run(rig.record())
    assert record.state == "failed" and "sha256 mismatch" in (record.reason or "")
    assert rig.states()[-2:] == ["verifying", "failed"] and rig.validated == []
    assert rig.store.versions("digits") == ["1"]


def test_transient_download_failures_are_retried_then_fail(rig: Rig, digits_dir: Path) -> None:
    rig.fetcher.failures_left = 2
    assert rig.machine.run(rig.record()).state == "committed"
    assert rig.fetcher.calls == 3

    rig2 = Rig(rig.data.parent / "again", digits_dir)
    rig2.fetcher.failures_left = 99
    record = rig2.make_machine(download_attempts=3).run(rig2.record())
    assert record.state == "failed" and "broker unreachable" in (record.reason or "")
    assert rig2.fetcher.calls == 3


def test_admission_rejection_in_idle_is_final(rig: Rig) -> None:
    def admit(release: Release, doc: Any) -> None:
        raise RejectedError("anti-rollback: version 2 is not newer than the active version 3")

    rig.machine.seams.admit = admit
    record = rig.machine.run(rig.record())
    assert record.state == "rejected" and record.result == "rejected"
    assert rig.fetcher.calls == 0 and rig.states() == ["idle", "rejected"]
