"""The update lifecycle of one artifact on one device, as a persisted state machine (Mender's daemon, RAUC's slots).

The states, the transitions table and the resume map are in ``states``; ``UpdateMachine._enter``
is the one place a state is entered, and it saves the record (temp file, fsync, ``os.replace``,
fsync dir) *before* the state's action runs, so a ``kill -9`` at any instant leaves a record
naming the step to redo. Final states' entry actions (mark good, clean up) are idempotent and
re-run on resume. Before ``activating`` the previous version keeps serving untouched, so a
failure there only discards the candidate. A loop breaker counts saves and loads; past
``max_loops`` the update ends as ``failed`` (rolled back first if the candidate is active).

A rollout abort after ``committed`` starts a new rollback transaction for the same update
id (``UpdateMachine.rollback_committed``): it enters ``rolling_back`` directly.

One machine, one table, several artifact kinds: what a step does to the artifact is the job of
the kind's ``Installer`` (``installers``). A feature delta computed against another version than
the cache holds takes the ``fallback`` event: the machine downloads and applies the release's
``fallback`` artifact (the full snapshot of the same version) instead.

Admission: the coordinator admits a release (``admission``) before it hands it over; the
``idle`` step re-checks it through ``Seams.admit``, a plain callable, because the device may
have changed while the release waited in its lane (another version committed). The machine
knows nothing of the coordinator. All I/O is injected through ``Seams``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edge_agent.config import OtaConfig
from edge_agent.errors import EdgeError, FailedError, Interrupted, RejectedError
from edge_agent.fsutil import fsync_dir, fsync_tree
from edge_agent.inference.modelpack import sha256_file
from edge_agent.update.installers import FeatureInstaller, Installer, ModelInstaller
from edge_agent.update.seams import Control, Seams
from edge_agent.update.shadow.verdict import ShadowStep
from edge_agent.update.states import (
    FINAL,
    TRANSITIONS,
    Event,
    RecordStore,
    State,
    UpdateRecord,
    log,
    log_update,
    resume_state,
)
from edge_agent.wire.policy import in_window
from edge_agent.wire.protocol import Artifact, Release, unpack_to

S, E = State, Event
Step = Callable[[UpdateRecord, Release, Control], "tuple[Event, str | None]"]


# -- the machine -------------------------------------------------------------------------------
class UpdateMachine:
    """Runs update records through their states; one record per artifact, one run per artifact at a time."""

    def __init__(
        self,
        data_dir: str | Path,
        seams: Seams,
        config: OtaConfig | None = None,
        *,
        on_change: Callable[[UpdateRecord], None] | None = None,
    ) -> None:
        """``config``: the ``[ota]`` settings (loop breaker, polling, retries); default: ``OtaConfig()``."""
        self.data_dir = Path(data_dir)
        self.records = RecordStore(data_dir)
        self.downloads = self.data_dir / "downloads"
        self.staging = self.data_dir / "staging"
        self.seams = seams
        self.config = config = config or OtaConfig()
        self.max_loops = config.max_loops
        self.download_attempts = max(1, config.download_attempts)
        self.on_change = on_change
        self.installers: dict[str, Installer] = {"model": ModelInstaller(seams, config)}
        if seams.features is not None:
            self.installers["features"] = FeatureInstaller(seams.features)
        self._steps: dict[State, Step] = {
            S.IDLE: self._admit,
            S.DOWNLOADING: self._download,
            S.VERIFYING: self._verify,
            S.VALIDATING: self._validate,
            S.WAITING_WINDOW: self._wait_window,
            S.SHADOWING: ShadowStep(
                seams, config, self.staging_dir, self._notify, self._may_activate, self.records.save
            ),
            S.ACTIVATING: self._activate,
            S.HEALTH_CHECK: self._health_check,
            S.ROLLING_BACK: self._roll_back,
        }
        self._finals: dict[State, Callable[[UpdateRecord, Control], None]] = {
            S.COMMITTED: self._commit,
            S.ROLLED_BACK: self._clean_up,
            S.FAILED: self._clean_up,
            S.REJECTED: self._clean_up,
        }

    # -- paths -------------------------------------------------------------------------------
    def artifact_path(self, artifact: Artifact) -> Path:
        return self.downloads / f"{artifact.sha256}.{artifact.format}"

    def staging_dir(self, record: UpdateRecord) -> Path:
        tag = hashlib.sha256(record.release_id.encode()).hexdigest()[:12]
        return self.staging / f"{record.name}-{record.version}-{tag}"

    def installer(self, kind: str) -> Installer:
        try:
            return self.installers[kind]
        except KeyError:
            raise RejectedError(f"this device does not install artifacts of kind {kind!r}") from None

    @staticmethod
    def artifact_of(record: UpdateRecord, release: Release) -> Artifact:
        """The artifact this update downloads: the release's, or its fallback once validation asked for it."""
        if record.details.get("artifact") == "fallback" and release.fallback is not None:
            return release.fallback
        return release.artifact

    # -- entry points ----------------------------------------------------------------------
    def create(self, release: Release, doc: Mapping[str, Any]) -> UpdateRecord:
        """A new record in ``idle`` for ``release`` (not saved yet: ``run`` saves it first thing)."""
        return UpdateRecord(
            release_id=release.release_id,
            name=release.name,
            version=release.version,
            release=dict(doc),
            previous_version=self.installer(release.kind).current(release.name),
            started_at=self.seams.now(),
            kind=release.kind,
        )

    def run(self, record: UpdateRecord, control: Control | None = None, *, start: State | None = None) -> UpdateRecord:
        """Run ``record`` from ``start`` (default: its own state) until a final state or a shutdown."""
        control = control or Control()
        state = start or resume_state(record.state)
        while True:
            state = self._enter(record, state, control)
            if state in FINAL:
                self._finals[state](record, control)
                self._notify(record)  # a final state is reported once its clean-up is done
                if self.seams.cool is not None and record.kind == "model":
                    self.seams.cool()
                return record
            step = self._act(record, state, control)
            if step is None:
                log_update(record, logging.INFO, "stopped in %s; resumes there on the next start", state.value)
                return record
            state, reason = step
            if reason is not None:
                record.reason = reason

    def resume(self, name: str, control: Control | None = None, *, count_load: bool = True) -> UpdateRecord | None:
        """Continue the saved update of ``name`` (a record key) after a restart (kill -9 included); None if none.

        ``count_load=False`` when ``recover_before_serving`` has already counted this start.
        """
        record = self.records.load(name)
        if record is None:
            return None
        if record.final:  # re-run the idempotent final action (e.g. mark good) without a new save
            self._finals[State(record.state)](record, control or Control())
            self._notify(record)
            return record
        if count_load:
            record.loops += 1  # every load counts, saved at once: a crash loop trips the breaker
            self.records.save(record)
        nxt = resume_state(record.state)
        log_update(
            record,
            logging.INFO,
            "resuming: saved state %s, next step %s (loop %d/%d)",
            record.state,
            nxt.value,
            record.loops,
            self.max_loops,
        )
        return self.run(record, control, start=nxt)

    def rollback_committed(self, record: UpdateRecord, reason: str, control: Control | None = None) -> UpdateRecord:
        """Undo a committed update (rollout aborted): a new rollback transaction entering ``rolling_back``."""
        record.reason = reason
        record.loops = 0
        return self.run(record, control, start=S.ROLLING_BACK)

    # -- the one place a state is entered --------------------------------------------------
    def _enter(self, record: UpdateRecord, state: State, control: Control) -> State:
        record.loops += 1
        if record.loops > self.max_loops and state not in FINAL:
            reason = f"loop breaker: {record.loops - 1} state saves/loads without finishing (max {self.max_loops})"
            try:
                restored = self.installer(record.kind).restore(record, control, False)
            except Exception as exc:  # still end the update: a failed rollback is part of the report
                reason += f"; rollback failed: {exc}"
            else:
                if restored is not None and restored != record.version:
                    reason += f"; {record.name} {restored} serves again"
            log_update(record, logging.ERROR, "%s", reason)
            record.reason, state = reason, S.FAILED
        now = self.seams.now()
        record.state = state.value
        record.updated_at = now
        record.history.append((state.value, now))
        self.records.save(record)  # persisted before the state's action runs
        with control.lock:
            control.state = state
        log_update(
            record,
            logging.INFO,
            "state %s%s",
            state.value,
            f" ({record.reason})" if state in FINAL and record.reason else "",
        )
        if state not in FINAL:
            self._notify(record)
        return state

    def _notify(self, record: UpdateRecord) -> None:
        if self.on_change is not None:
            try:
                self.on_change(record)
            except Exception:
                log.exception("update %s: state listener failed", record.release_id)

    def _act(self, record: UpdateRecord, state: State, control: Control) -> tuple[State, str | None] | None:
        try:
            release = record.release_obj
            event, reason = self._steps[state](record, release, control)
        except Interrupted:
            event, reason = E.ERROR, "interrupted"
        except RejectedError as exc:
            event, reason = E.REJECTED, str(exc)
        except Exception as exc:  # Failed… errors and anything unexpected: the table decides
            if not isinstance(exc, EdgeError):
                log_update(record, logging.ERROR, "step %s raised unexpectedly", state.value, exc_info=True)
            event, reason = E.ERROR, f"{exc}" if isinstance(exc, EdgeError) else f"{type(exc).__name__}: {exc}"
        with control.lock:
            if control.shutting_down:
                return None
            if control.abort_reason is not None and (state, E.ABORT) in TRANSITIONS:
                event, reason = E.ABORT, control.abort_reason
            if (state, event) not in TRANSITIONS:  # e.g. 'rejected' where the table has no such exit
                event = E.ERROR
            nxt = TRANSITIONS[(state, event)]
            control.state = nxt  # decided under the lock: an abort now sees where the update is going
        if event in (E.ERROR, E.REJECTED, E.HEALTH_BREACH, E.ABORT):
            log_update(record, logging.WARNING, "%s: %s → %s: %s", state.value, event.value, nxt.value, reason)
        return nxt, reason

    # -- steps ------------------------------------------------------------------------------
    def _admit(self, record: UpdateRecord, release: Release, control: Control) -> tuple[Event, str | None]:
        if self.seams.admit is not None:
            self.seams.admit(release, record.release)
        return E.OK, None

    def _download(self, record: UpdateRecord, release: Release, control: Control) -> tuple[Event, str | None]:
        self.installer(record.kind)  # a kind this device cannot install fails before any download
        artifact = self.artifact_of(record, release)
        out = self.artifact_path(artifact)
        if self.seams.warm is not None and record.kind == "model":
            self.seams.warm()
        for attempt in range(1, self.download_attempts + 1):
            try:
                self.seams.fetcher.fetch(artifact, out, control.interrupt)
                break
            except FailedError as exc:
                if control.interrupt.is_set():
                    raise Interrupted() from exc
                if attempt == self.download_attempts:
                    raise
                delay = self.config.retry_backoff_s * 2 ** (attempt - 1)
                log_update(
                    record, logging.WARNING, "download attempt %d failed (%s); retrying in %.1fs", attempt, exc, delay
                )
                if self.seams.wait(control.interrupt, delay):
                    raise Interrupted() from exc
        log_update(record, logging.INFO, "downloaded %d bytes", artifact.size)
        return E.OK, None

    def _verify(self, record: UpdateRecord, release: Release, control: Control) -> tuple[Event, str | None]:
        installer = self.installer(record.kind)
        artifact = self.artifact_of(record, release)
        blob = self.artifact_path(artifact)
        if not blob.is_file():
            raise FailedError(f"downloaded artifact {blob} is missing")
        size = blob.stat().st_size
        digest = sha256_file(blob)
        if size != artifact.size or digest != artifact.sha256:
            raise RejectedError(
                f"artifact sha256 mismatch: got {size} bytes {digest[:12]}…, the release says "
                f"{artifact.size} bytes {artifact.sha256[:12]}…"
            )
        staging = self.staging_dir(record)
        installer.forget(staging)
        self.staging.mkdir(parents=True, exist_ok=True)
        tmp = staging.with_name(f".tmp-{staging.name}")
        for stale in (tmp, staging):
            shutil.rmtree(stale, ignore_errors=True)
        unpack_to(blob, tmp)
        fsync_tree(tmp)
        os.replace(tmp, staging)
        fsync_dir(self.staging)
        installer.check(record, release, staging)
        return E.OK, None

    def _validate(self, record: UpdateRecord, release: Release, control: Control) -> tuple[Event, str | None]:
        event = self.installer(record.kind).validate(record, release, self.staging_dir(record), control)
        if event is E.FALLBACK:
            log_update(
                record, logging.WARNING, "%s; fetching the release's fallback snapshot", record.details.get("fallback")
            )
            return E.FALLBACK, None
        if release.policy.mode == "shadow" and record.kind == "model":
            return E.SHADOW, None
        return (E.IN_WINDOW, None) if self._may_activate(release) else (E.OUT_OF_WINDOW, None)

    def _may_activate(self, release: Release) -> bool:
        return release.policy.urgent or in_window(release.policy.window, time.localtime(self.seams.now()))

    def _wait_window(self, record: UpdateRecord, release: Release, control: Control) -> tuple[Event, str | None]:
        log_update(record, logging.INFO, "waiting for the maintenance window %s", release.policy.window)
        while not self._may_activate(release):
            if self.seams.wait(control.interrupt, self.config.poll_s):
                raise Interrupted()
        return E.IN_WINDOW, None

    def _activate(self, record: UpdateRecord, release: Release, control: Control) -> tuple[Event, str | None]:
        self.installer(record.kind).activate(record, release, self.staging_dir(record), control)
        return E.OK, None

    def _health_check(self, record: UpdateRecord, release: Release, control: Control) -> tuple[Event, str | None]:
        return self.installer(record.kind).watch(record, release, control)

    def _roll_back(self, record: UpdateRecord, release: Release, control: Control) -> tuple[Event, str | None]:
        restored = self.installer(record.kind).restore(record, control, False)
        log_update(record, logging.INFO, "rolled back: %s %s serves", record.name, restored)
        return E.OK, None

    # -- finals (idempotent) -------------------------------------------------------------
    def _commit(self, record: UpdateRecord, control: Control) -> None:
        installer = self.installers.get(record.kind)
        if installer is not None:  # a record of a kind this agent no longer installs: just clean up
            installer.commit(record)
        self._clean_up(record, control)

    def _clean_up(self, record: UpdateRecord, control: Control) -> None:
        staging = self.staging_dir(record)
        installer = self.installers.get(record.kind)
        if installer is not None:
            installer.forget(staging)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(staging.with_name(f".tmp-{staging.name}"), ignore_errors=True)
        if control.keep_download:
            return
        try:
            artifacts = _artifacts(record.release_obj)
        except EdgeError:
            return
        for artifact in artifacts:
            try:
                self.seams.fetcher.discard(artifact)
                self.artifact_path(artifact).unlink(missing_ok=True)
            except (OSError, EdgeError) as exc:
                log_update(record, logging.WARNING, "could not clean up the download: %s", exc)

    def sweep(self, keep: list[UpdateRecord]) -> None:
        """Remove staging dirs, chunks and assembled downloads no unfinished record refers to (after a restart)."""
        keep_staging = {self.staging_dir(r).name for r in keep}
        keep_downloads: set[str] = set()
        for r in keep:
            try:
                artifacts = _artifacts(r.release_obj)
            except EdgeError:
                continue
            for artifact in artifacts:
                keep_downloads |= {artifact.sha256, self.artifact_path(artifact).name}
        for root, wanted in ((self.staging, keep_staging), (self.downloads, keep_downloads)):
            if not root.is_dir():
                continue
            for p in root.iterdir():
                if p.name in wanted:
                    continue
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def _artifacts(release: Release) -> list[Artifact]:
    """Every artifact an update of ``release`` may download: the release's and its fallback."""
    return [release.artifact] + ([release.fallback] if release.fallback is not None else [])
