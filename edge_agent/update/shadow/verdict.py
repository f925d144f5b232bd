"""The ``shadowing`` step of a shadow release: the candidate is compared on live traffic, then promoted or rejected.

The candidate is installed into the store beside the active version (the active pointer does
not move, so it never answers a client, not even after a crash: the store's pointer is what
serves) and loaded, with a private copy of the active version, in the shadow's own process
(one interpreter, one thread each). A ``models.shadow.ShadowRunner`` is attached to the
request path (``models.taps``) and gets a sampled copy (``policy.shadow_rate``) of every
request the active version answers. When ``shadow_min_samples`` requests were compared or
``shadow_window_s`` has passed, the figures decide (``wire.shadow.verdict``): promote (the
machine goes on to activation and the normal health window) or reject with the figures as the
reason. A shadow process that dies (or cannot load the versions) rejects at once with the
reason (``shadow process died (SIGSEGV)``). The figures are reported live in the record's
``details["shadow"]`` (``updates.{name}.shadow`` in the device state).

The figures survive a restart: every ``REPORT_EVERY_S`` the shadow process's counts (and its
most recent latency pairs) and the window's elapsed time are saved with the update record
(``details["shadow_state"]``), and the resumed step goes on from them, with what is left of
the window (copies dropped before the restart are not carried over).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from edge_agent.config import OtaConfig
from edge_agent.errors import FailedError, Interrupted, RejectedError
from edge_agent.inference.runtime import RuntimeOptions
from edge_agent.models.shadow import LOAD_TIMEOUT_S, ShadowModel, ShadowRunner
from edge_agent.models.store import ModelStore
from edge_agent.models.taps import ModelTaps
from edge_agent.update.seams import Control, HealthSource, ModelServing, Seams, Wait, event_wait, server_health
from edge_agent.update.states import Event, UpdateRecord, log_update
from edge_agent.wire.policy import Policy
from edge_agent.wire.protocol import Release
from edge_agent.wire.shadow import ShadowFigures, describe, verdict

E = Event
REPORT_EVERY_S = 1.0  # live figures go to the device state at most this often


@dataclass
class ShadowHost:
    """What running a candidate in shadow needs from the agent: the request taps and where versions are."""

    taps: ModelTaps | None
    load: Callable[[str, str], ShadowModel] | None
    monotonic: Callable[[], float] = time.monotonic
    wait: Wait = event_wait
    health: HealthSource | None = None  # the served model's call counters (a local promotion's health window)

    @classmethod
    def of(cls, store: object, server: object) -> ShadowHost:
        """From a real ``ModelStore`` and ``ModelServer`` (no taps or loader for anything else)."""
        taps = getattr(server, "taps", None)
        if not isinstance(taps, ModelTaps) or not isinstance(store, ModelStore):
            return cls(None, None)
        base = getattr(server, "options", None)
        options = replace(base if isinstance(base, RuntimeOptions) else RuntimeOptions(), pool_size=1, num_threads=1)

        def load(name: str, version: str) -> ShadowModel:
            store.manifest(name, version)  # NotFoundError now, not in the shadow process
            return ShadowModel(name, version, store.version_dir(name, version), store.fleet_key, options)

        return cls(taps, load, health=server_health(cast(ModelServing, server)))  # a ModelServer: it has the taps


def shadow_seams(store: object, server: object) -> dict[str, Any]:
    """The ``Seams`` fields a real store and server give shadowing: ``taps`` and a private ``load``."""
    host = ShadowHost.of(store, server)
    return {"taps": host.taps, "load": host.load} if host.taps is not None else {}


class ShadowStep:
    """The machine's ``shadowing`` step: ``in_window``/``out_of_window`` when promoted, ``rejected`` if not."""

    def __init__(
        self,
        seams: Seams,
        config: OtaConfig,
        staging: Callable[[UpdateRecord], Path],
        notify: Callable[[UpdateRecord], None],
        may_activate: Callable[[Release], bool],
        save: Callable[[UpdateRecord], None] = lambda record: None,
    ) -> None:
        """``save`` persists the record (the machine's record store): the figures survive a restart."""
        self.seams, self.config, self.staging, self.notify, self.may_activate = (
            seams,
            config,
            staging,
            notify,
            may_activate,
        )
        self.save = save

    def __call__(self, record: UpdateRecord, release: Release, control: Control) -> tuple[Event, str | None]:
        staging = self.staging(record)
        event, reason = run_shadow(record, release, control, self.seams, self.config, staging, self.notify, self.save)
        if event is E.OK:
            return (E.IN_WINDOW if self.may_activate(release) else E.OUT_OF_WINDOW), reason
        return event, reason


def run_shadow(
    record: UpdateRecord,
    release: Release,
    control: Control,
    seams: Seams,
    config: OtaConfig,
    staging: Path,
    notify: Callable[[UpdateRecord], None],
    save: Callable[[UpdateRecord], None] = lambda record: None,
) -> tuple[Event, str | None]:
    """Shadow the candidate: OK with the passing figures, or REJECTED with the failing ones.

    Resumes from ``record.details["shadow_state"]`` (saved with ``save`` as the figures change).
    """
    store, name = seams.store, record.name
    primary = store.active(name)
    if primary is None or primary == record.version:
        raise RejectedError(f"a shadow release needs another active version of {name} to compare with")
    if staging.is_dir():
        store.install_dir(staging, verify=False)  # validated already; installed beside the active version
    elif record.version not in store.versions(name):
        raise FailedError(f"staged candidate {staging} is gone and {name} {record.version} is not installed")
    policy = release.policy
    log_update(
        record,
        logging.INFO,
        "shadowing %s: %.0f%% of live requests, until %d samples or %.0fs",
        primary,
        policy.shadow_rate * 100,
        policy.shadow_min_samples,
        policy.shadow_window_s,
    )

    def report(figures: ShadowFigures) -> None:
        record.details["shadow"] = figures.to_dict()
        notify(record)

    def keep(state: dict[str, Any]) -> None:
        record.details["shadow_state"] = state
        save(record)

    resume = record.details.get("shadow_state")
    host = ShadowHost(seams.taps, seams.load, seams.monotonic, seams.wait)
    ok, reason = compare_live(
        host, name, primary, record.version, policy, control.interrupt, config.poll_s, report, resume, keep
    )
    record.details.pop("shadow_state", None)  # decided: the machine's next save drops it
    log_update(record, logging.INFO if ok else logging.WARNING, "%s", reason)
    return (E.OK, reason) if ok else (E.REJECTED, reason)


def compare_live(
    host: ShadowHost,
    name: str,
    primary: str,
    version: str,
    policy: Policy,
    interrupt: threading.Event,
    poll_s: float,
    report: Callable[[ShadowFigures], None],
    resume: Any = None,
    keep: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[bool, str]:
    """Run ``version`` in shadow of ``primary`` until the policy's sample count or window; the verdict.

    ``report`` gets the figures as they change (at most every ``REPORT_EVERY_S``) and the
    final ones, verdict included. Shared by the update machine and ``local_shadow``. ``keep``
    gets, as they change, ``{"figures": state, "elapsed_s": window spent}`` to be saved; a
    restarted agent passes the last one back as ``resume``.
    """
    if host.taps is None or host.load is None:
        raise FailedError("this agent cannot run shadow releases (no request taps)")
    prior = resume if isinstance(resume, dict) and isinstance(resume.get("figures"), dict) else {}
    candidate, reference = host.load(name, version), host.load(name, primary)  # loaded in the shadow process
    runner = ShadowRunner(candidate, primary, policy.shadow_rate, reference=reference, resume=prior.get("figures"))
    host.taps.start_shadow(name, runner)
    try:
        spent = float(prior.get("elapsed_s") or 0.0)
        figures = _watch(runner, policy, interrupt, host, poll_s, report, spent, keep or (lambda state: None))
    finally:
        host.taps.stop_shadow(name, runner)
    ok, reason = verdict(figures, policy)
    if runner.failure is not None:
        ok, reason = False, f"shadow rejected: {runner.failure} ({describe(figures.to_dict())})"
    figures.verdict = "promote" if ok else "reject"
    report(figures)
    return ok, reason


def _watch(
    runner: ShadowRunner,
    policy: Policy,
    interrupt: threading.Event,
    host: ShadowHost,
    poll_s: float,
    report: Callable[[ShadowFigures], None],
    spent: float,
    keep: Callable[[dict[str, Any]], None],
) -> ShadowFigures:
    """Poll the runner until the sample count, the window (``spent`` of it used before a restart) or its
    failure; report the figures as they change, and ``keep`` what a restart resumes from. The window
    opens once the shadow process has loaded both versions (a loaded machine must not spend it starting)."""
    clock = host.monotonic
    load_deadline = clock() + LOAD_TIMEOUT_S
    while not runner.ready.is_set() and runner.failure is None:
        if clock() >= load_deadline:
            runner.fail(f"shadow process had not loaded the versions after {LOAD_TIMEOUT_S:g} s")
            break
        if host.wait(interrupt, min(poll_s, max(0.0, load_deadline - clock()))):
            raise Interrupted()
    start = clock()
    deadline = start + policy.shadow_window_s - spent
    reported: ShadowFigures | None = None
    next_report = clock()
    while True:
        figures = runner.figures()
        if figures.samples >= policy.shadow_min_samples or clock() >= deadline or runner.failure is not None:
            return figures
        if figures != reported and clock() >= next_report:
            report(figures)
            state = runner.state()
            if state is not None:
                keep({"figures": state, "elapsed_s": spent + clock() - start})
            reported, next_report = figures, clock() + REPORT_EVERY_S
        if host.wait(interrupt, min(poll_s, max(0.0, deadline - clock()))):
            raise Interrupted()
