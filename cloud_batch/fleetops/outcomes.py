"""A rollout's outcome among its cohort, computed from the devices' retained states (pure, no I/O).

A device *tried* the release when its ``updates[name].release_id`` is the release's id; its
``result`` is ``success``, ``failed``, ``rejected``, ``rolled-back`` or None (in progress). The
failure rate is ``(failed + rolled-back) / tried``. Only devices of the fleet's device list
count when it has one (``known``); the others are listed as ``ignored``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
from edge_agent.wire.shadow import shadow_lines


@dataclass
class DeviceOutcome:
    """One device of the cohort that tried the release."""

    device_id: str
    state: str  # the update.State value it reported last
    result: str | None  # None while in progress
    reason: str | None
    at: float
    shadow: dict[str, Any] | None = None  # a shadow release: the device's figures (wire.shadow.ShadowFigures)


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
    ignored: list[str] = field(default_factory=list)  # reporting devices the fleet does not know
    problems: list[str] = field(default_factory=list)  # forged or malformed retained documents seen
    release_doc: dict[str, Any] = field(default_factory=dict)  # the authentic signed release

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
        if self.ignored:
            lines.append(f"  ignored {len(self.ignored)} device(s) the fleet does not know (cloud-batch fleet add)")
        lines += [f"  warning: {p}" for p in self.problems[:10]]
        if self.action is None and self.rollout.status == "active" and self.over_threshold:
            lines.append("over the threshold: `rollout advance` halts it (status only reads)")
        lines += shadow_lines([(d.device_id, d.state, d.shadow) for d in self.devices])
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
            "ignored": self.ignored,
            "problems": self.problems,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# -- pure evaluation ----------------------------------------------------------------------
def evaluate(
    name: str,
    fleet: str,
    release: Release,
    rollout: Rollout,
    states: Mapping[str, DeviceState],
    known: frozenset[str] | None = None,
) -> RolloutStatus:
    """The status of ``rollout`` from the devices' states (no I/O); ``known``: the fleet's device list, if any."""
    ignored = sorted(d for d in states if known is not None and d not in known)
    cohort = sorted(d for d in states if in_cohort(d, name, rollout.percent) and (known is None or d in known))
    devices = []
    for device_id in cohort:
        report = states[device_id].updates.get(name)
        if report is not None and report.release_id == release.release_id:
            devices.append(
                DeviceOutcome(device_id, report.state, report.result, report.reason, report.at, report.shadow)
            )
    return RolloutStatus(
        name,
        fleet,
        release,
        rollout,
        list(release.policy.stages),
        float(release.policy.max_failure_rate),
        cohort,
        devices,
        ignored=ignored,
    )
