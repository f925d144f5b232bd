"""Phased rollouts across 50 simulated devices on a real mosquitto (stages 10, 50, 100).

The devices (``cloud_batch.sim``) verify the signed release, apply the rollout gate and
download the artifact with the real transfer code; the cloud side only reads the broker.
Waiting is done with ``rollout.watch`` (it re-evaluates on every device state change) and a
generous deadline; nothing asserts how long anything took.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cloud_batch.cli import ota as ota_cli
from cloud_batch.fleetops.broker import BrokerLink
from cloud_batch.fleetops.fleet import fleet_status
from cloud_batch.fleetops.rollout import RolloutError, RolloutStatus, abort, advance, evaluate, rollout_status, watch
from cloud_batch.fleetops.signer import Trust
from cloud_batch.sim.fleet import SimFleet
from edge_agent.wire.policy import in_cohort
from edge_agent.wire.protocol import DeviceState, Release, Rollout, UpdateReport
from tests.broker import Broker
from tests.support.releases import release_digits

FLEET = "plant-r"
N = 50
STAGES = [10, 50, 100]
WAIT_S = 60.0
SETTLE_S = 0.2  # the agent waits 1 s for a release's rollout; the rollout is always published first here


def start_fleet(url: str, pub: Path, tmp_path: Path, **kwargs: object) -> SimFleet:
    return SimFleet(
        url,
        FLEET,
        kwargs.pop("n", N),
        trusted_keys=[pub],
        workdir=tmp_path / "sim",  # type: ignore[arg-type]
        settle_s=SETTLE_S,
        **kwargs,
    ).start()  # type: ignore[arg-type]


@dataclass
class Rig:
    """The test's broker and cloud link, its signing key files, and the simulated fleets it started."""

    url: str
    link: BrokerLink
    key_files: tuple[Path, Path]
    workdir: Path
    fleets: list[SimFleet] = field(default_factory=list)

    def start(self, **kwargs: object) -> SimFleet:
        """A simulated fleet trusting the signing key (stopped after the test)."""
        self.fleets.append(start_fleet(self.url, self.key_files[1], self.workdir, **kwargs))
        return self.fleets[-1]

    @property
    def record(self) -> Path:
        """The cloud's record of what it signed (the registry's ``.signed``; MODELS stays read-only)."""
        return self.workdir / "record"

    @property
    def trust(self) -> Trust:
        """What the rollout commands trust and sign with: the fleet's key, the record."""
        return Trust.load(self.record, key=self.key_files[0])

    def cli(self, *args: str) -> list[str]:
        return [*args, "--registry", str(self.record), "--key", str(self.key_files[0])]

    def publish(self, **kwargs: object) -> Release:
        """Release digits 1, signed with the key the fleet trusts."""
        return release_digits(
            self.link, self.key_files[0], FLEET, record_dir=self.record, **{"stages": STAGES, **kwargs}
        )


@pytest.fixture
def rig(broker: Broker, cloud_link: BrokerLink, key_files: tuple[Path, Path], tmp_path: Path) -> Iterator[Rig]:
    r = Rig(broker.url, cloud_link, key_files, tmp_path)
    yield r
    for f in r.fleets:
        f.stop()


def stage_done(s: RolloutStatus) -> bool:
    """Every device of the current cohort finished the release (any result)."""
    return s.counts["cohort"] > 0 and s.tried == s.counts["cohort"] and s.counts["in_progress"] == 0


def cohort(ids: list[str], percent: int) -> set[str]:
    return {d for d in ids if in_cohort(d, "digits", percent)}


# -- advancing -----------------------------------------------------------------------------
def test_advance_moves_through_every_stage_while_failures_stay_under_the_threshold(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = rig.start()
    rel = rig.publish()
    seen_cohorts: list[set[str]] = []
    for stage, percent in enumerate(STAGES):
        status = watch(rig.link, "digits", FLEET, stage_done, rig.trust, timeout_s=WAIT_S)
        assert (status.rollout.stage, status.rollout.percent, status.rollout.status) == (stage, percent, "active")
        assert set(status.cohort) == cohort(sim.device_ids, percent)
        assert status.counts["success"] == len(status.cohort) and status.failure_rate == 0.0
        seen_cohorts.append(set(status.cohort))
        # Devices outside the cohort have not applied it: they hold the release until a later stage.
        rows = {r.device_id: r for r in fleet_status(rig.link, FLEET)}
        for device_id, row in rows.items():
            applied = row.models.get("digits") == "1"
            assert applied == (device_id in status.cohort), device_id
        step = advance(rig.link, "digits", FLEET, rig.trust)
        if stage + 1 < len(STAGES):
            assert step.action == "advanced" and step.rollout.stage == stage + 1
            assert step.rollout.percent == STAGES[stage + 1]
        else:
            assert step.action == "completed" and step.rollout.status == "complete"
    # Each stage only added devices; the last one is the whole fleet.
    assert seen_cohorts[0] < seen_cohorts[1] < seen_cohorts[2] == set(sim.device_ids)

    # Complete is final for advance (a no-op), and the CLI shows the same status as JSON.
    assert advance(rig.link, "digits", FLEET, rig.trust).action is None
    assert ota_cli.main(rig.cli("rollout", "status", "digits", "--fleet", FLEET, "--broker", rig.url, "--json")) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["release_id"] == rel.release_id and shown["status"] == "complete"
    assert shown["counts"]["success"] == N and shown["failure_rate"] == 0.0 and len(shown["devices"]) == N


def test_rollout_halts_on_its_own_when_the_failure_threshold_is_crossed(rig: Rig) -> None:
    # ~30% of the devices fail validation; with seed 4 none of them is in the 10% cohort, 9 of 29 are in the 50% one.
    sim = rig.start(fail_rate=0.3, seed=4)
    assert len(sim.fail_ids) == 15
    assert not sim.fail_ids & cohort(sim.device_ids, 10) and sim.fail_ids & cohort(sim.device_ids, 50)
    rig.publish(max_failure_rate=0.1)

    first = watch(rig.link, "digits", FLEET, stage_done, rig.trust, timeout_s=WAIT_S)
    assert first.failure_rate == 0.0 and first.action is None
    assert advance(rig.link, "digits", FLEET, rig.trust).action == "advanced"

    # The watcher halts the rollout as soon as a failure report pushes the rate over 10%.
    halted = watch(rig.link, "digits", FLEET, lambda s: s.action == "halted", rig.trust, timeout_s=WAIT_S)
    assert halted.rollout.status == "halted" and halted.rollout.percent == 50
    assert halted.failure_rate > 0.1 and "above the release's threshold 10.0%" in halted.message
    failed = [d for d in halted.devices if d.result == "failed"]
    assert failed and all(d.device_id in sim.fail_ids for d in failed)
    assert all("simulated failure" in (d.reason or "") for d in failed)

    # The halt is on the broker (retained), devices outside the cohort never start, and it cannot advance.
    after = rollout_status(rig.link, "digits", FLEET, rig.trust)
    assert after.rollout.status == "halted" and after.action is None
    outside = set(sim.device_ids) - cohort(sim.device_ids, 50)
    for row in fleet_status(rig.link, FLEET):
        if row.device_id in outside:
            assert "digits" not in row.models and "digits" not in row.updates, row
    with pytest.raises(RolloutError, match="is halted; it cannot advance"):
        advance(rig.link, "digits", FLEET, rig.trust)


def test_cli_status_only_reads_advance_halts_then_advance_is_refused(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.start(n=10, fail_rate=0.5, seed=1)
    rig.publish(stages=[100], max_failure_rate=0.2)
    watch(rig.link, "digits", FLEET, stage_done, rig.trust, timeout_s=WAIT_S, auto_halt=False)  # observe only

    args = ["--fleet", FLEET, "--broker", rig.url]
    # status reads only (#14): exit 1 says "over the threshold", and the rollout stays active.
    assert ota_cli.main(rig.cli("rollout", "status", "digits", *args)) == 1
    out = capsys.readouterr().out
    assert "failure rate 50.0% (threshold 20.0%)" in out and "`rollout advance` halts it" in out
    assert rollout_status(rig.link, "digits", FLEET, rig.trust).rollout.status == "active"
    assert ota_cli.main(rig.cli("rollout", "advance", "digits", *args)) == 1
    out = capsys.readouterr().out
    assert "halted: failure rate 50.0% (5/10) is above the release's threshold 20.0%" in out
    assert ota_cli.main(rig.cli("rollout", "status", "digits", *args)) == 0  # halted already: nothing new to do
    assert ota_cli.main(rig.cli("rollout", "advance", "digits", *args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the rollout of digits 1") and "is halted" in err


# -- aborting ------------------------------------------------------------------------------
def test_abort_makes_the_cohort_roll_back(rig: Rig) -> None:
    sim = rig.start(initial_models={"digits": "0"})
    rel = rig.publish(stages=[50, 100])
    done = watch(rig.link, "digits", FLEET, stage_done, rig.trust, timeout_s=WAIT_S)
    assert done.counts["success"] == len(done.cohort) == len(cohort(sim.device_ids, 50))

    aborted = abort(rig.link, "digits", FLEET, rig.trust)
    assert aborted.action == "aborted" and aborted.rollout.status == "aborted"
    rolled = watch(
        rig.link, "digits", FLEET, lambda s: s.counts["rolled-back"] == len(s.cohort), rig.trust, timeout_s=WAIT_S
    )
    assert all(
        d.result == "rolled-back" and f"rollout {rel.release_id} aborted" in (d.reason or "") for d in rolled.devices
    )
    # Everyone serves the previous version again; devices outside the cohort never changed.
    assert {row.models.get("digits") for row in fleet_status(rig.link, FLEET)} == {"0"}
    assert abort(rig.link, "digits", FLEET, rig.trust).action is None  # idempotent
    with pytest.raises(RolloutError, match="is aborted"):
        advance(rig.link, "digits", FLEET, rig.trust)


def test_no_release_is_a_clear_error(cloud_link: BrokerLink, key_files: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(RolloutError, match="no release of 'digits' in fleet 'plant-r'"):
        rollout_status(cloud_link, "digits", FLEET, Trust.load(tmp_path / "record", key=key_files[0]))


# -- cohorts -------------------------------------------------------------------------------
def test_cohorts_are_deterministic_and_only_grow() -> None:
    ids = [f"dev-{i:05d}" for i in range(5000)]
    previous: set[str] = set()
    for percent in range(0, 101):
        members = cohort(ids, percent)
        assert members == cohort(ids, percent)  # deterministic
        assert previous <= members  # monotonic: nobody leaves as the percentage grows
        assert abs(len(members) - len(ids) * percent / 100) < len(ids) * 0.03  # roughly the asked share
        previous = members
    assert previous == set(ids)
    # Another model name draws another cohort (a device is not always first in line).
    assert {d for d in ids if in_cohort(d, "other", 10)} != cohort(ids, 10)


def test_failure_rate_counts_failed_and_rolled_back_among_devices_that_tried() -> None:
    from edge_agent.wire.protocol import Artifact

    rel = Release("r1", FLEET, "digits", "2", Artifact.from_blob(b"x"))
    rel.policy.stages, rel.policy.max_failure_rate = [100], 0.25
    results = {"a": "success", "b": "failed", "c": "rolled-back", "d": "rejected", "e": None}
    states = {
        d: DeviceState(d, FLEET, updates={"digits": UpdateReport("r1", "digits", "2", "x", r)})
        for d, r in results.items()
    }
    states["f"] = DeviceState("f", FLEET, updates={"digits": UpdateReport("r0", "digits", "1", "committed", "success")})
    states["g"] = DeviceState("g", FLEET)
    s = evaluate("digits", FLEET, rel, Rollout("r1", 100), states)
    assert s.counts["cohort"] == 7 and s.tried == 5  # f tried another release, g nothing
    assert s.counts["in_progress"] == 1 and s.counts["rejected"] == 1
    assert s.failure_rate == pytest.approx(2 / 5) and s.over_threshold
