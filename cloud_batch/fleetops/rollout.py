"""Phased rollouts: watch a release spread through its cohorts, advance it, halt it, abort it.

The release carries its stages (``policy.stages``, e.g. [5, 25, 100]) and its failure
threshold (``policy.max_failure_rate``); the retained Rollout document, signed and numbered
like a release (``signer.sign_rollout``), says which stage is live. Cohorts are deterministic (``protocol.in_cohort``): a device in the 5 % cohort
is also in the 25 % one, so each stage only adds devices.

Outcomes come from the devices' retained DeviceState: a device *tried* the release when its
``updates[name].release_id`` is the release's id; its ``result`` is ``success``, ``failed``,
``rejected``, ``rolled-back`` or None (in progress). The failure rate is
``(failed + rolled-back) / tried``; in-progress devices count as tried, so the rate is the
share of the cohort's attempts known to have gone wrong. A rejected release (bad signature,
anti-rollback) is reported apart and is not an install failure.

Trust: the release and rollout this module believes are the newest ones that verify against
``Trust.keys``, taken from the registry's record of what the cloud signed (``SignedLog``) or,
if newer and authentic, from the broker; a retained copy that does not verify is reported
(``problems``) and never read. Only devices of the fleet's device list (``DeviceRegistry``)
count toward the failure rate when the fleet has one; others are counted apart as ``ignored``.

Reading never publishes (``rollout_status``). Halting is automatic in the commands that write
(``advance``, ``watch`` with a key): when the rate is above the threshold while the rollout is
active, the rollout is published as ``halted``: devices that have not started keep the old
version. ``abort`` publishes ``aborted``: devices that applied the release roll back on their
own. Both republish the authentic release when the retained one is forged or missing.

Every operation takes an open ``broker.BrokerLink``; errors (``RolloutError``, ``WatchTimeout``,
``BrokerError``) are in ``cloud_batch.errors``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cloud_batch.errors import RolloutError, WatchTimeout, input_errors
from cloud_batch.fleetops.broker import BrokerLink, publish_doc
from cloud_batch.fleetops.fleet import FleetView, Snapshot
from cloud_batch.fleetops.outcomes import RolloutStatus, evaluate
from cloud_batch.fleetops.signer import Trust, sign_rollout
from cloud_batch.registry.devices import DeviceRegistry
from edge_agent.wire.names import check_segment
from edge_agent.wire.protocol import Release, Rollout
from edge_agent.wire.topics import release_topic, rollout_topic


def _newest_authentic(trust: Trust, docs: list[tuple[str, dict[str, Any] | None]], problems: list[str]) -> Any:
    """The verified document with the highest ``seq`` among ``(where, doc)``; forged ones go to ``problems``."""
    best: dict[str, Any] | None = None
    for where, doc in docs:
        if doc is None:
            continue
        why = trust.authentic(doc)
        if why is not None:
            problems.append(f"the {where} {doc.get('type', 'document')} does not verify ({why}); ignored")
        elif best is None or int(doc.get("seq") or 0) > int(best.get("seq") or 0):
            best = doc
    return best


def current(snap: Snapshot, name: str, fleet: str, trust: Trust) -> RolloutStatus:
    """The rollout of ``name`` from authentic documents only; RolloutError if there is none."""
    problems = list(snap.problems)
    retained_rel = snap.releases.get(name)
    rel_doc = _newest_authentic(
        trust,
        [
            ("registry's", trust.log.latest(fleet, "model", name)),
            ("retained", retained_rel[1] if retained_rel else None),
        ],
        problems,
    )
    if rel_doc is None:
        raise RolloutError(f"no release of {name!r} in fleet {fleet!r} (release one with `cloud-batch release`)")
    rel = Release.from_dict(rel_doc)
    retained_ro = snap.rollout_docs.get(name)
    ro_doc = _newest_authentic(
        trust,
        [
            ("registry's", trust.log.latest(fleet, "rollout", name, lambda d: d.get("release_id") == rel.release_id)),
            ("retained", retained_ro if retained_ro and retained_ro.get("release_id") == rel.release_id else None),
        ],
        problems,
    )
    if ro_doc is None:
        raise RolloutError(f"release {rel.release_id} of {name!r} in fleet {fleet!r} has no signed rollout document")
    status = evaluate(
        name, fleet, rel, Rollout.from_dict(ro_doc), snap.states, DeviceRegistry(trust.log.root.parent).known(fleet)
    )
    status.release_doc = rel_doc
    if retained_rel is None or retained_rel[1] != rel_doc:
        problems.append(f"the retained release of {name} is not the authentic {rel.release_id}")
    if retained_ro != ro_doc:
        problems.append(f"the retained rollout of {name} is not the authentic seq {ro_doc.get('seq')}")
    status.problems = problems
    return status


def _publish(
    link: BrokerLink,
    st: RolloutStatus,
    trust: Trust,
    *,
    stage: int | None = None,
    percent: int | None = None,
    status: str | None = None,
) -> Rollout:
    """Sign (next seq) and publish a changed Rollout (retained, acknowledged); repair a forged retained release."""
    key = trust.key(f"changing the rollout of {st.name}")
    ro = st.rollout
    new = Rollout(
        release_id=ro.release_id,
        percent=ro.percent if percent is None else percent,
        stage=ro.stage if stage is None else stage,
        status=status or ro.status,
        updated_at=time.time(),
        fleet=st.fleet,
        name=st.name,
    )
    sign_rollout(new, key, trust.log)
    if any(p.startswith(f"the retained release of {st.name}") for p in st.problems):
        publish_doc(link, release_topic(st.fleet, st.name), st.release_doc)  # republish the authentic one
        st.message = (st.message + "\n" if st.message else "") + "republished the authentic release"
    publish_doc(link, rollout_topic(st.fleet, st.name), new.to_dict())
    st.rollout = new
    return new


def _auto_halt(link: BrokerLink, status: RolloutStatus, trust: Trust) -> RolloutStatus:
    """Halt an active rollout whose failure rate crossed the threshold (publishes ``halted``)."""
    if status.rollout.status == "active" and status.over_threshold:
        _publish(link, status, trust, status="halted")
        status.action = "halted"
        halted = (
            f"halted: failure rate {status.failure_rate:.1%} ({status.failures}/{status.tried}) is above "
            f"the release's threshold {status.max_failure_rate:.1%}"
        )
        status.message = f"{status.message}\n{halted}" if status.message else halted  # keep "republished ..."
    return status


def check_target(name: str, fleet: str) -> None:
    """InputError unless ``name`` and ``fleet`` are valid topic segments (checked before any I/O)."""
    with input_errors():
        check_segment(name, "name")
        check_segment(fleet, "fleet")


@contextmanager
def _loaded(
    link: BrokerLink, name: str, fleet: str, trust: Trust, timeout_s: float
) -> Iterator[tuple[FleetView, RolloutStatus]]:
    """The rollout's current status from a synced view, closed (unsubscribed) afterwards: the link may be shared."""
    check_target(name, fleet)
    view = FleetView(link, fleet, models=[name]).sync(timeout_s)
    try:
        yield view, current(view.snapshot(), name, fleet, trust)
    finally:
        view.close()


# -- operations ---------------------------------------------------------------------------
def rollout_status(link: BrokerLink, name: str, fleet: str, trust: Trust, *, timeout_s: float = 2.0) -> RolloutStatus:
    """The current rollout of ``name``, read only: it never publishes (``advance`` halts a failing one)."""
    with _loaded(link, name, fleet, trust, timeout_s) as (_, status):
        return status


def advance(link: BrokerLink, name: str, fleet: str, trust: Trust, *, timeout_s: float = 2.0) -> RolloutStatus:
    """Move to the next stage (or mark the last one complete) while the failure rate is within the threshold.

    Returns the status with ``action`` ``advanced``, ``completed`` or ``halted`` (the rate was
    too high: the rollout is now halted). An already complete rollout is a no-op (``action``
    None); a halted or aborted one is a RolloutError: release again to retry.
    """
    with _loaded(link, name, fleet, trust, timeout_s) as (view, status):
        ro = status.rollout
        if ro.status == "complete":
            status.message = "already complete: every device of the fleet may apply the release"
            return status
        if ro.status in ("halted", "aborted"):
            raise RolloutError(
                f"the rollout of {name} {status.release.version} ({ro.release_id}) is {ro.status}; "
                "it cannot advance (publish a new release to try again)"
            )
        _auto_halt(link, status, trust)
        if status.action == "halted":
            return status
        if ro.stage + 1 < len(status.stages):
            nxt = ro.stage + 1
            new = _publish(link, status, trust, stage=nxt, percent=status.stages[nxt])
            # Report the new, larger cohort (its new devices have not tried the release yet).
            known = DeviceRegistry(trust.log.root.parent).known(fleet)
            status = evaluate(name, fleet, status.release, new, view.snapshot().states, known)
            status.action = "advanced"
            status.message = f"advanced to {status.stage_label}"
        else:
            _publish(link, status, trust, status="complete")
            status.action = "completed"
            status.message = "complete: the last stage (100%) is done"
        return status


def abort(link: BrokerLink, name: str, fleet: str, trust: Trust, *, timeout_s: float = 2.0) -> RolloutStatus:
    """Publish status ``aborted``: devices stop the release and roll back if they applied it. Idempotent."""
    with _loaded(link, name, fleet, trust, timeout_s) as (_, status):
        if status.rollout.status == "aborted":
            status.message = "already aborted"
            return status
        _publish(link, status, trust, status="aborted")
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
    trust: Trust,
    *,
    timeout_s: float = 60.0,
    auto_halt: bool = True,
    on_status: Callable[[RolloutStatus], None] | None = None,
    min_interval_s: float = 0.05,
) -> RolloutStatus:
    """Follow the rollout live until ``until(status)`` holds; halt it automatically on the way.

    Re-evaluates on every device state change (at most every ``min_interval_s``). Returns the
    status that satisfied ``until``; WatchTimeout after ``timeout_s``. A rollout this call
    halted has ``action == "halted"`` in every later status. Halting needs ``trust.signing``;
    without it the watch only reads.
    """
    auto_halt = auto_halt and trust.signing is not None
    check_target(name, fleet)
    deadline = time.monotonic() + timeout_s
    view = FleetView(link, fleet, models=[name]).sync(min(timeout_s, 5.0))
    last: RolloutStatus | None = None
    halted_here: RolloutStatus | None = None
    try:
        while True:
            seen = view.version
            try:
                status: RolloutStatus | None = current(view.snapshot(), name, fleet, trust)
            except RolloutError:
                status = None  # e.g. the rollout document has not arrived yet
            if status is not None:
                if auto_halt:
                    _auto_halt(link, status, trust)
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
