"""The update state machine: its table, its resume mapping, persistence before every action, the loop breaker.

These run the real ``UpdateMachine`` against a real ``ModelStore`` on disk, with the other I/O
seams faked (artifact fetcher, validator, model server, clocks), so every path takes
milliseconds. ``tests/test_ota.py`` proves the same paths with MQTT, the TFLite runtime and
the child-process validator.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import OtaConfig
from edge_agent.errors import FailedError, NotFoundError, RejectedError, ValidationError
from edge_agent.models.store import ModelStore
from edge_agent.update.machine import UpdateMachine
from edge_agent.update.seams import Control, Seams
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
from edge_agent.wire.manifest import MANIFEST_FILE
from edge_agent.wire.policy import Policy
from edge_agent.wire.protocol import Artifact, Release, pack_dir

S, E = State, Event


# -- fakes -----------------------------------------------------------------------------
def make_version(src: Path, out: Path, version: str) -> Path:
    """A copy of a version directory relabelled as ``version`` (same model file, so still valid)."""
    out.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copyfile(f, out / f.name)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["version"] = version
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    return out


class FakeModel:
    def __init__(self, version: str) -> None:
        self.version = version
        self.calls = 0
        self.failures = 0


class FakeServer:
    """Serves whatever the store's pointer says, as the real server's hot swap does after ``sync``."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.models: dict[str, FakeModel] = {}

    def sync(self) -> None:
        for name, version in self.store.active_map().items():
            if name not in self.models or self.models[name].version != version:
                self.models[name] = FakeModel(version)

    def get(self, name: str) -> FakeModel:
        if name not in self.models:
            raise NotFoundError(name)
        return self.models[name]

    def errors(self) -> dict[str, Any]:
        return {}


class FakeFetcher:
    """Writes the artifact's bytes where the downloader would; can fail or crash on demand."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.failures_left = 0
        self.calls = 0
        self.discarded: list[str] = []

    def fetch(self, artifact: Artifact, out_path: Path, stop: threading.Event) -> Path:
        self.calls += 1
        if self.failures_left:
            self.failures_left -= 1
            raise FailedError("broker unreachable")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_bytes(self.blobs[artifact.sha256])
        return out_path

    def discard(self, artifact: Artifact) -> None:
        self.discarded.append(artifact.sha256)


class FakeClock:
    """Wall and monotonic time that advance only when the machine waits; hooks run on every wait."""

    def __init__(self, wall: float) -> None:
        self.wall = wall
        self.mono = 1000.0
        self.hooks: list[Callable[[], None]] = []

    def now(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def wait(self, event: threading.Event, seconds: float) -> bool:
        self.wall += seconds
        self.mono += seconds
        for hook in list(self.hooks):
            hook()
        return event.is_set()


def local_time(hour: int, minute: int = 0) -> float:
    t = time.localtime()
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday, hour, minute, 0, 0, 0, -1))


class Rig:
    """A store with digits 1 active, a candidate digits 2 packed, and a machine wired to fakes."""

    def __init__(self, tmp_path: Path, digits_dir: Path, **policy: Any) -> None:
        self.data = tmp_path / "data"
        self.store = ModelStore(self.data)
        self.store.install_dir(digits_dir, verify=False)
        self.server = FakeServer(self.store)
        self.server.sync()
        self.blob = pack_dir(make_version(digits_dir, tmp_path / "v2", "2"))
        self.artifact = Artifact.from_blob(self.blob, 4096)
        self.fetcher = FakeFetcher({self.artifact.sha256: self.blob})
        self.clock = FakeClock(local_time(12))
        self.validated: list[Path] = []
        self.validate_error: Exception | None = None
        self.changes: list[tuple[str, str | None]] = []
        policy.setdefault("health_window_s", 5.0)
        self.release = Release(
            release_id="digits-2-r1",
            fleet="f",
            name="digits",
            version="2",
            artifact=self.artifact,
            policy=Policy(**policy),
        )
        self.machine = self.make_machine()

    def validate(self, path: Path, max_latency_ms: float | None, stop: threading.Event) -> dict[str, Any]:
        self.validated.append(path)
        if self.validate_error is not None:
            raise self.validate_error
        return {"ok": True, "p50_ms": 0.5}

    def make_machine(self, health: Any = None, **kwargs: Any) -> UpdateMachine:
        seams = Seams(
            store=self.store,
            server=self.server,
            fetcher=self.fetcher,
            validate=self.validate,
            now=self.clock.now,
            monotonic=self.clock.monotonic,
            wait=self.clock.wait,
            health=health,
        )
        kwargs.setdefault("poll_s", 1.0)
        kwargs.setdefault("retry_backoff_s", 0.1)
        config = OtaConfig(**kwargs)
        return UpdateMachine(self.data, seams, config, on_change=lambda r: self.changes.append((r.state, r.result)))

    def record(self) -> UpdateRecord:
        return self.machine.create(self.release, self.release.to_dict())

    def on_disk(self) -> UpdateRecord:
        record = self.machine.records.load("digits")
        assert record is not None
        return record

    def states(self) -> list[str]:
        return [s for s, _ in self.on_disk().history]


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


@pytest.mark.parametrize("state", [s for s in State if s not in FINAL])
def test_the_record_is_saved_before_each_action(tmp_path: Path, digits_dir: Path, state: State) -> None:
    """A crash inside any step leaves that step's state on disk; resuming from there finishes the update."""
    rig = Rig(tmp_path, digits_dir, window="02:00-03:00" if state is S.WAITING_WINDOW else None)
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
