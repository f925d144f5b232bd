"""Phased rollouts: watch a release spread through its cohorts, advance it, halt it, abort it.

The release carries its stages (``policy.stages``, e.g. [5, 25, 100]) and its failure
threshold (``policy.max_failure_rate``); the retained, unsigned Rollout document says which
stage is live. Cohorts are deterministic (``protocol.in_cohort``): a device in the 5 % cohort
is also in the 25 % one, so each stage only adds devices.

Outcomes come from the devices' retained DeviceState: a device *tried* the release when its
``updates[name].release_id`` is the release's id; its ``result`` is ``success``, ``failed``,
``rejected``, ``rolled-back`` or None (in progress). The failure rate is
``(failed + rolled-back) / tried``; in-progress devices count as tried, so the rate is the
share of the cohort's attempts known to have gone wrong. A rejected release (bad signature,
anti-rollback) is reported apart and is not an install failure.

Halting is automatic: whenever a status is computed (``rollout_status``, ``advance``,
``watch``) and the rate is above the threshold while the rollout is active, the rollout is
published as ``halted``: devices that have not started keep the old version. ``abort``
publishes ``aborted``: devices that applied the release roll back on their own.

Every operation takes an open ``broker.BrokerLink``; errors (``RolloutError``, ``WatchTimeout``,
``BrokerError``) are in ``cloud_batch.errors``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from cloud_batch.errors import InputError, RolloutError, WatchTimeout
from cloud_batch.fleetops.broker import BrokerLink, publish_doc
from cloud_batch.fleetops.fleet import FleetView, Snapshot
from edge_agent.errors import EdgeError
from edge_agent.wire.names import check_segment
from edge_agent.wire.policy import in_cohort
from edge_agent.wire.protocol import (
    RESULT_FAILED,
    RESULT_REJECTED,
    RESULT_ROLLED_BACK,
    RESULT_SUCCESS,
    DeviceState,
    Release,
    Rollout,
)
from edge_agent.wire.topics import rollout_topic


@dataclass
class DeviceOutcome:
    """One device of the cohort that tried the release."""

    device_id: str
    state: str  # the update.State value it reported last
    result: str | None  # None while in progress
    reason: str | None
    at: float


@dataclass
class RolloutStatus:
    """A rollout as the broker shows it, with the outcome among the devices that tried the release."""

    name: str
    fleet: str
    release: Release
    rollout: Rollout
    stages: list[int]
    max_failure_rate: float
    cohort: list[str]  # known devices (retained state) in the current cohort
    devices: list[DeviceOutcome]  # those of the cohort that tried this release
    action: str | None = None  # what this call did: halted | advanced | completed | aborted | None
    message: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = {
            "cohort": len(self.cohort),
            "tried": len(self.devices),
            RESULT_SUCCESS: 0,
            RESULT_FAILED: 0,
            RESULT_ROLLED_BACK: 0,
            RESULT_REJECTED: 0,
            "in_progress": 0,
        }
        for d in self.devices:
            key = "in_progress" if d.result is None else d.result
            c[key] = c.get(key, 0) + 1
        self.counts = c

    @property
    def tried(self) -> int:
        return self.counts["tried"]

    @property
    def failures(self) -> int:
        return self.counts.get(RESULT_FAILED, 0) + self.counts.get(RESULT_ROLLED_BACK, 0)

    @property
    def failure_rate(self) -> float:
        return self.failures / self.tried if self.tried else 0.0

    @property
    def over_threshold(self) -> bool:
        return self.failure_rate > self.max_failure_rate

    @property
    def stage_label(self) -> str:
        return f"stage {self.rollout.stage + 1}/{len(self.stages)} ({self.rollout.percent}%)"

    def summary(self) -> str:
        c = self.counts
        lines = [
            f"rollout of {self.name} {self.release.version} in fleet {self.fleet}: {self.rollout.status}, {self.stage_label}",
            f"  release {self.release.release_id}, stages {','.join(map(str, self.stages))}",
            (
                f"  cohort {c['cohort']} device(s); tried {c['tried']}: {c['success']} success, {c['failed']} failed, "
                f"{c['rolled-back']} rolled back, {c['rejected']} rejected, {c['in_progress']} in progress"
            ),
            f"  failure rate {self.failure_rate:.1%} (threshold {self.max_failure_rate:.1%})",
        ]
        bad = [d for d in self.devices if d.result in (RESULT_FAILED, RESULT_ROLLED_BACK, RESULT_REJECTED)]
        for d in bad[:10]:
            lines.append(f"    {d.device_id}: {d.result}: {d.reason or '-'}")
        if len(bad) > 10:
            lines.append(f"    ... and {len(bad) - 10} more (--json lists all)")
        if self.message:
            lines.append(self.message)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fleet": self.fleet,
            "release_id": self.release.release_id,
            "version": self.release.version,
            "status": self.rollout.status,
            "stage": self.rollout.stage,
            "percent": self.rollout.percent,
            "stages": self.stages,
            "max_failure_rate": self.max_failure_rate,
            "failure_rate": self.failure_rate,
            "counts": self.counts,
            "action": self.action,
            "message": self.message,
            "cohort": self.cohort,
            "devices": [vars(d) for d in self.devices],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# -- pure evaluation ----------------------------------------------------------------------
def evaluate(
    name: str, fleet: str, release: Release, rollout: Rollout, states: Mapping[str, DeviceState]
) -> RolloutStatus:
    """The status of ``rollout`` from the devices' states (no I/O)."""
    cohort = sorted(d for d in states if in_cohort(d, name, rollout.percent))
    devices = []
    for device_id in cohort:
        report = states[device_id].updates.get(name)
        if report is not None and report.release_id == release.release_id:
            devices.append(DeviceOutcome(device_id, report.state, report.result, report.reason, report.at))
    return RolloutStatus(
        name,
        fleet,
        release,
        rollout,
        list(release.policy.stages),
        float(release.policy.max_failure_rate),
        cohort,
        devices,
    )


def current(snap: Snapshot, name: str, fleet: str) -> RolloutStatus:
    """Evaluate the rollout of ``name`` in a snapshot; RolloutError if there is none or it is inconsistent."""
    rel = snap.releases.get(name)
    ro = snap.rollouts.get(name)
    if rel is None:
        raise RolloutError(f"no release of {name!r} in fleet {fleet!r} (release one with `cloud-batch release`)")
    if ro is None:
        raise RolloutError(f"release {rel[0].release_id} of {name!r} in fleet {fleet!r} has no rollout document")
    if ro.release_id != rel[0].release_id:
        raise RolloutError(
            f"the rollout of {name!r} in fleet {fleet!r} is for release {ro.release_id}, but the "
            f"current release is {rel[0].release_id}"
        )
    return evaluate(name, fleet, rel[0], ro, snap.states)


def _publish(
    link: BrokerLink,
    st: RolloutStatus,
    *,
    stage: int | None = None,
    percent: int | None = None,
    status: str | None = None,
) -> Rollout:
    """Publish a changed Rollout (retained, acknowledged) and put it into ``st``."""
    ro = st.rollout
    new = Rollout(
        release_id=ro.release_id,
        percent=ro.percent if percent is None else percent,
        stage=ro.stage if stage is None else stage,
        status=status or ro.status,
        updated_at=time.time(),
    )
    publish_doc(link, rollout_topic(st.fleet, st.name), new.to_dict())
    st.rollout = new
    return new


def _auto_halt(link: BrokerLink, status: RolloutStatus) -> RolloutStatus:
    """Halt an active rollout whose failure rate crossed the threshold (publishes ``halted``)."""
    if status.rollout.status == "active" and status.over_threshold:
        _publish(link, status, status="halted")
        status.action = "halted"
        status.message = (
            f"halted: failure rate {status.failure_rate:.1%} ({status.failures}/{status.tried}) is above "
            f"the release's threshold {status.max_failure_rate:.1%}"
        )
    return status


def check_target(name: str, fleet: str) -> None:
    """InputError unless ``name`` and ``fleet`` are valid topic segments (checked before any I/O)."""
    try:
        check_segment(name, "name")
        check_segment(fleet, "fleet")
    except EdgeError as exc:
        raise InputError(str(exc)) from exc


@contextmanager
def _loaded(link: BrokerLink, name: str, fleet: str, timeout_s: float) -> Iterator[tuple[FleetView, RolloutStatus]]:
    """The rollout's current status from a synced view, closed (unsubscribed) afterwards: the link may be shared."""
    check_target(name, fleet)
    view = FleetView(link, fleet, models=[name]).sync(timeout_s)
    try:
        yield view, current(view.snapshot(), name, fleet)
    finally:
        view.close()


# -- operations ---------------------------------------------------------------------------
def rollout_status(
    link: BrokerLink, name: str, fleet: str, *, auto_halt: bool = True, timeout_s: float = 2.0
) -> RolloutStatus:
    """The current rollout of ``name``; halts it (and says so in ``action``) if the threshold is crossed."""
    with _loaded(link, name, fleet, timeout_s) as (_, status):
        return _auto_halt(link, status) if auto_halt else status


def advance(link: BrokerLink, name: str, fleet: str, *, timeout_s: float = 2.0) -> RolloutStatus:
    """Move to the next stage (or mark the last one complete) while the failure rate is within the threshold.

    Returns the status with ``action`` ``advanced``, ``completed`` or ``halted`` (the rate was
    too high: the rollout is now halted). An already complete rollout is a no-op (``action``
    None); a halted or aborted one is a RolloutError: release again to retry.
    """
    with _loaded(link, name, fleet, timeout_s) as (view, status):
        ro = status.rollout
        if ro.status == "complete":
            status.message = "already complete: every device of the fleet may apply the release"
            return status
        if ro.status in ("halted", "aborted"):
            raise RolloutError(
                f"the rollout of {name} {status.release.version} ({ro.release_id}) is {ro.status}; "
                "it cannot advance (publish a new release to try again)"
            )
        _auto_halt(link, status)
        if status.action == "halted":
            return status
        if ro.stage + 1 < len(status.stages):
            nxt = ro.stage + 1
            new = _publish(link, status, stage=nxt, percent=status.stages[nxt])
            # Report the new, larger cohort (its new devices have not tried the release yet).
            status = evaluate(name, fleet, status.release, new, view.snapshot().states)
            status.action = "advanced"
            status.message = f"advanced to {status.stage_label}"
        else:
            _publish(link, status, status="complete")
            status.action = "completed"
            status.message = "complete: the last stage (100%) is done"
        return status


def abort(link: BrokerLink, name: str, fleet: str, *, timeout_s: float = 2.0) -> RolloutStatus:
    """Publish status ``aborted``: devices stop the release and roll back if they applied it. Idempotent."""
    with _loaded(link, name, fleet, timeout_s) as (_, status):
        if status.rollout.status == "aborted":
            status.message = "already aborted"
            return status
        _publish(link, status, status="aborted")
        status.action = "aborted"
        status.message = (
            f"aborted: {status.counts['success']} device(s) that applied {status.release.version} will roll back"
        )
        return status


def watch(
    link: BrokerLink,
    name: str,
    fleet: str,
    until: Callable[[RolloutStatus], bool],
    *,
    timeout_s: float = 60.0,
    auto_halt: bool = True,
    on_status: Callable[[RolloutStatus], None] | None = None,
    min_interval_s: float = 0.05,
) -> RolloutStatus:
    """Follow the rollout live until ``until(status)`` holds; halt it automatically on the way.

    Re-evaluates on every device state change (at most every ``min_interval_s``). Returns the
    status that satisfied ``until``; WatchTimeout after ``timeout_s``. A rollout this call
    halted has ``action == "halted"`` in every later status.
    """
    check_target(name, fleet)
    deadline = time.monotonic() + timeout_s
    view = FleetView(link, fleet, models=[name]).sync(min(timeout_s, 5.0))
    last: RolloutStatus | None = None
    halted_here: RolloutStatus | None = None
    try:
        while True:
            seen = view.version
            try:
                status: RolloutStatus | None = current(view.snapshot(), name, fleet)
            except RolloutError:
                status = None  # e.g. the rollout document has not arrived yet
            if status is not None:
                if auto_halt:
                    _auto_halt(link, status)
                    if status.action == "halted":
                        halted_here = status
                    elif halted_here is not None and status.rollout.release_id == halted_here.rollout.release_id:
                        status.action, status.message = halted_here.action, halted_here.message
                last = status
                if on_status is not None:
                    on_status(status)
                if until(status):
                    return status
            left = deadline - time.monotonic()
            if left <= 0:
                raise WatchTimeout(
                    f"rollout of {name} in fleet {fleet}: condition not met within {timeout_s:g}s"
                    + (f"; last: {last.summary()}" if last else ""),
                    last,
                )
            view.wait_change(seen, min(left, 1.0))
            time.sleep(min_interval_s)
    finally:
        view.close()
