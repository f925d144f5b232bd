"""The update lifecycle of one artifact on one device, as a persisted state machine (Mender's daemon, RAUC's slots).

States are a ``str`` Enum whose values are the on-disk format (frozen: never rename a value).
Every transition is in ``TRANSITIONS``; ``UpdateMachine._enter`` is the one place a state is
entered, and it saves the record (temp file, fsync, ``os.replace``, fsync dir) *before* the
state's action runs, so a ``kill -9`` at any instant leaves a record naming the step to redo::

    idle ─ok▶ downloading ─ok▶ verifying ─ok▶ validating ─in_window▶ activating ─ok▶ health_check ─ok▶ committed
                                                  │                        ▲
                                                  └─out_of_window▶ waiting_window ─in_window┘
    activating   ─error/rejected/abort▶ rolling_back ─ok▶ rolled_back
    health_check ─health_breach/error/abort▶ rolling_back ─error▶ failed
    idle ─rejected▶ rejected
    idle, downloading, verifying, validating, waiting_window ─error/rejected/abort▶ failed
    validating ─fallback▶ downloading   (a feature delta whose base is not the cached version: fetch the snapshot)

Finals (``committed``, ``rolled_back``, ``failed``, ``rejected``) have no transitions; their
entry actions (mark good, clean up) are idempotent and are re-run on resume. Before
``activating`` the previous version keeps serving untouched, so a failure there only
discards the candidate. ``RESUME`` maps each saved state to the step to run after a restart;
an unknown state means ``rolling_back``. A loop breaker counts saves and loads; past
``max_loops`` the update ends as ``failed`` (rolled back first if the candidate is active).

A rollout abort after ``committed`` starts a new rollback transaction for the same update
id (``UpdateMachine.rollback_committed``): it enters ``rolling_back`` directly.

One machine, one table, several artifact kinds: what a step does to the artifact is the job of
the kind's ``Installer`` (RAUC's slot handlers). ``ModelInstaller`` (``kind = "model"``) installs
into the ``ModelStore``, validates in a child process, activates by the store's pointer and
watches the health window. ``FeatureInstaller`` (``kind = "features"``) reads the feature bundle
(``bundle.read_bundle``) while verifying, dry-checks it against the cache while validating
(version newer, delta base, size bound), and activates with ``FeatureCache.apply``: one SQLite
transaction, so the swap is atomic and a kill -9 leaves the old or the new version; its health
check takes no time and rolling back has nothing to undo. A delta computed against another
version than the cache holds takes the ``fallback`` event: the machine downloads and applies
the release's ``fallback`` artifact (the full snapshot of the same version) instead.

All I/O is injected through ``Seams`` (store, server, artifact fetcher, validator, health
source, clocks), so the logic is tested fast with fakes and proven with the real parts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from edge_agent.errors import (
    EdgeError,
    FailedError,
    IncompatibleModelError,
    ManifestError,
    NotFoundError,
    RejectedError,
)
from edge_agent.features.cache import CacheFull, DeltaBaseMismatch, FeatureCache, VersionNotNewer
from edge_agent.fsutil import atomic_write_json, fsync_dir, fsync_tree
from edge_agent.inference.modelpack import sha256_file, verify_version_dir
from edge_agent.wire.bundle import Bundle, BundleSchemaError, read_bundle
from edge_agent.wire.manifest import check_name, parse_version
from edge_agent.wire.protocol import (
    RESULT_FAILED,
    RESULT_REJECTED,
    RESULT_ROLLED_BACK,
    RESULT_SUCCESS,
    Artifact,
    Release,
    UpdateReport,
    in_window,
    unpack_to,
)

log = logging.getLogger(__name__)

RECORD_SCHEMA = 1
DEFAULT_MAX_LOOPS = 30


class State(str, Enum):
    """Update states; the values are written to disk and reported to the cloud (frozen)."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    VALIDATING = "validating"
    WAITING_WINDOW = "waiting_window"  # downloaded and validated, waiting for the maintenance window
    ACTIVATING = "activating"
    HEALTH_CHECK = "health_check"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    REJECTED = "rejected"


class Event(str, Enum):
    """What a state's action reports; together with the state it picks the next state."""

    OK = "ok"
    ERROR = "error"  # the action failed (Failed… or unexpected errors)
    REJECTED = "rejected"  # the action found the input wrong (Rejected… errors)
    OUT_OF_WINDOW = "out_of_window"
    IN_WINDOW = "in_window"
    HEALTH_BREACH = "health_breach"
    ABORT = "abort"  # superseded by a newer release, or the rollout was aborted
    FALLBACK = "fallback"  # a feature delta does not fit the cached version: fetch the release's snapshot


S, E = State, Event
FINAL: frozenset[State] = frozenset({S.COMMITTED, S.ROLLED_BACK, S.FAILED, S.REJECTED})
# States in which the candidate has not been activated: a newer release may supersede them.
PRE_ACTIVATION: frozenset[State] = frozenset({S.IDLE, S.DOWNLOADING, S.VERIFYING, S.VALIDATING, S.WAITING_WINDOW})

TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.IDLE, E.OK): S.DOWNLOADING,
    (S.IDLE, E.REJECTED): S.REJECTED,
    (S.IDLE, E.ERROR): S.FAILED,
    (S.IDLE, E.ABORT): S.FAILED,
    (S.DOWNLOADING, E.OK): S.VERIFYING,
    (S.DOWNLOADING, E.REJECTED): S.FAILED,
    (S.DOWNLOADING, E.ERROR): S.FAILED,
    (S.DOWNLOADING, E.ABORT): S.FAILED,
    (S.VERIFYING, E.OK): S.VALIDATING,
    (S.VERIFYING, E.REJECTED): S.FAILED,
    (S.VERIFYING, E.ERROR): S.FAILED,
    (S.VERIFYING, E.ABORT): S.FAILED,
    (S.VALIDATING, E.IN_WINDOW): S.ACTIVATING,
    (S.VALIDATING, E.OUT_OF_WINDOW): S.WAITING_WINDOW,
    (S.VALIDATING, E.REJECTED): S.FAILED,
    (S.VALIDATING, E.ERROR): S.FAILED,
    (S.VALIDATING, E.ABORT): S.FAILED,
    (S.VALIDATING, E.FALLBACK): S.DOWNLOADING,
    (S.WAITING_WINDOW, E.IN_WINDOW): S.ACTIVATING,
    (S.WAITING_WINDOW, E.ERROR): S.FAILED,
    (S.WAITING_WINDOW, E.ABORT): S.FAILED,
    (S.ACTIVATING, E.OK): S.HEALTH_CHECK,
    (S.ACTIVATING, E.REJECTED): S.ROLLING_BACK,
    (S.ACTIVATING, E.ERROR): S.ROLLING_BACK,
    (S.ACTIVATING, E.ABORT): S.ROLLING_BACK,
    (S.HEALTH_CHECK, E.OK): S.COMMITTED,
    (S.HEALTH_CHECK, E.HEALTH_BREACH): S.ROLLING_BACK,
    (S.HEALTH_CHECK, E.ERROR): S.ROLLING_BACK,
    (S.HEALTH_CHECK, E.ABORT): S.ROLLING_BACK,
    (S.ROLLING_BACK, E.OK): S.ROLLED_BACK,
    (S.ROLLING_BACK, E.ERROR): S.FAILED,
}

# After a restart: saved state -> the step to run next. Every step is idempotent, so each
# state re-runs itself (health_check restarts its window; finals re-run their clean-up).
RESUME: dict[State, State] = {
    S.IDLE: S.IDLE,
    S.DOWNLOADING: S.DOWNLOADING,  # verified chunks on disk are kept: only the rest is fetched
    S.VERIFYING: S.VERIFYING,  # unpack again into a fresh staging dir
    S.VALIDATING: S.VALIDATING,
    S.WAITING_WINDOW: S.WAITING_WINDOW,
    S.ACTIVATING: S.ACTIVATING,  # install and activate are idempotent
    S.HEALTH_CHECK: S.HEALTH_CHECK,  # a new, full window
    S.ROLLING_BACK: S.ROLLING_BACK,
    S.COMMITTED: S.COMMITTED,
    S.ROLLED_BACK: S.ROLLED_BACK,
    S.FAILED: S.FAILED,
    S.REJECTED: S.REJECTED,
}

RESULTS: dict[State, str] = {
    S.COMMITTED: RESULT_SUCCESS,
    S.ROLLED_BACK: RESULT_ROLLED_BACK,
    S.FAILED: RESULT_FAILED,
    S.REJECTED: RESULT_REJECTED,
}


def resume_state(saved: str) -> State:
    """The step to run after a restart for a saved state name; unknown names mean rolling back."""
    try:
        return RESUME[State(saved)]
    except ValueError:
        return S.ROLLING_BACK


# -- the persisted record -------------------------------------------------------------------
FEATURES_PREFIX = "features:"  # record keys of feature sets: "features:<set>" (model keys are plain names)


def record_key(kind: str, name: str) -> str:
    """The key of an artifact's update record and lane: the model name, or ``features:<set>``."""
    return name if kind == "model" else f"{kind}:{name}"


@dataclass
class UpdateRecord:
    """One update transaction of one artifact, saved to ``<data-dir>/updates/`` before every step."""

    release_id: str  # the update id: it appears in every log line and report
    name: str
    version: str
    release: dict[str, Any]  # the signed release document as received
    state: str = S.IDLE.value  # a State value (kept as a string: a newer agent may have written another)
    previous_version: str | None = None  # what served when the update started: the rollback target
    reason: str | None = None
    loops: int = 0  # loop breaker: +1 on every save and every load
    history: list[tuple[str, float]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # e.g. the validation report
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    schema_version: int = RECORD_SCHEMA
    kind: str = "model"  # the release's kind: which Installer runs the steps

    @property
    def key(self) -> str:
        return record_key(self.kind, self.name)

    @property
    def result(self) -> str | None:
        try:
            return RESULTS.get(State(self.state))
        except ValueError:
            return None

    @property
    def final(self) -> bool:
        return self.state in {s.value for s in FINAL}

    @property
    def release_obj(self) -> Release:
        return Release.from_dict(self.release)

    def report(self) -> UpdateReport:
        return UpdateReport(
            self.release_id, self.name, self.version, self.state, self.result, self.reason, self.updated_at
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "type": "update",
            "release_id": self.release_id,
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "release": self.release,
            "state": self.state,
            "previous_version": self.previous_version,
            "reason": self.reason,
            "loops": self.loops,
            "history": [list(h) for h in self.history],
            "details": self.details,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> UpdateRecord:
        if not isinstance(raw, Mapping) or raw.get("type") != "update":
            raise ManifestError("update record: not an update document")
        if raw.get("schema_version") != RECORD_SCHEMA:
            raise ManifestError(f"update record: unsupported schema_version {raw.get('schema_version')!r}")
        try:
            return cls(
                release_id=str(raw["release_id"]),
                name=check_name(raw["name"]),
                version=str(raw["version"]),
                release=dict(raw["release"]),
                state=str(raw["state"]),
                previous_version=raw.get("previous_version"),
                reason=raw.get("reason"),
                loops=int(raw.get("loops", 0)),
                history=[(str(s), float(t)) for s, t in raw.get("history") or []],
                details=dict(raw.get("details") or {}),
                started_at=float(raw.get("started_at", 0)),
                updated_at=float(raw.get("updated_at", 0)),
                kind=str(raw.get("kind", "model")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"update record: malformed: {exc}") from exc


class RecordStore:
    """The last update record of each artifact: ``<data-dir>/updates/<model>.json``, ``updates/features/<set>.json``."""

    def __init__(self, data_dir: str | Path) -> None:
        self.dir = Path(data_dir) / "updates"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The record file of a key (``record_key``): a model name or ``features:<set>``."""
        if key.startswith(FEATURES_PREFIX):
            return self.dir / "features" / f"{check_name(key[len(FEATURES_PREFIX) :])}.json"
        return self.dir / f"{check_name(key)}.json"

    def save(self, record: UpdateRecord) -> None:
        path = self.path(record.key)
        path.parent.mkdir(exist_ok=True)
        atomic_write_json(path, record.to_dict())

    def load(self, key: str) -> UpdateRecord | None:
        import json

        path = self.path(key)
        try:
            return UpdateRecord.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ManifestError(f"update record {path} unreadable: {exc}") from exc

    def names(self) -> list[str]:
        """Every record's key: model names, then ``features:<set>``."""
        models = sorted(p.stem for p in self.dir.glob("*.json") if not p.name.startswith("."))
        sets = sorted(
            FEATURES_PREFIX + p.stem for p in (self.dir / "features").glob("*.json") if not p.name.startswith(".")
        )
        return models + sets


def recover_before_serving(
    data_dir: str | Path, store: Any, *, max_loops: int = DEFAULT_MAX_LOOPS, now: Callable[[], float] = time.time
) -> list[UpdateRecord]:
    """Count this start against every unfinished update; past the loop breaker, put the previous version back.

    Call it on start *before* the model server loads anything. A candidate that crashes the
    agent only in service (after validation) would otherwise be loaded, and crash the agent,
    on every restart before the update could resume: here each start is a saved load, and
    once an update has used up ``max_loops`` the store's pointer goes back to the previous
    version and the update is saved as ``failed`` (the machine reports it when it resumes).
    """
    records = RecordStore(data_dir)
    out = []
    for name in records.names():
        try:
            record = records.load(name)
        except EdgeError as exc:
            log.error("update record of %s unreadable: %s", name, exc)
            continue
        if record is None or record.final or record.kind != "model":
            continue  # feature sets are not loaded at start: their updates count their loads when they resume
        record.loops += 1
        if record.loops > max_loops:
            reason = f"loop breaker: {record.loops - 1} state saves/loads without finishing (max {max_loops})"
            try:
                if store.active(name) == record.version and record.previous_version not in (None, record.version):
                    store.activate(name, record.previous_version)
                    reason += f"; {name} {record.previous_version} restored before serving"
            except EdgeError as exc:
                reason += f"; rollback failed: {exc}"
            log.error("update %s (%s %s): %s", record.release_id, name, record.version, reason)
            record.state, record.reason = S.FAILED.value, reason
            record.updated_at = now()
            record.history.append((S.FAILED.value, record.updated_at))
        records.save(record)
        out.append(record)
    return out


# -- seams ---------------------------------------------------------------------------------
class ArtifactFetcher(Protocol):
    """Gets an artifact's bytes onto disk (``ota.MqttFetcher`` over MQTT; a fake in unit tests)."""

    def fetch(self, artifact: Artifact, out_path: Path, stop: threading.Event) -> Path:
        """Download (resuming) and assemble ``artifact`` at ``out_path``, sha256-checked; FailedError to retry."""

    def discard(self, artifact: Artifact) -> None:
        """Forget partial downloads of ``artifact``."""


# (version dir, max p50 ms, stop) -> report; raises Rejected… (bad model) or Failed… (e.g. stopped)
Validator = Callable[[Path, "float | None", threading.Event], Mapping[str, Any]]
HealthSource = Callable[[str], "tuple[str | None, int, int]"]  # name -> (serving version, calls, failures)
Admit = Callable[[Release, Mapping[str, Any]], None]  # raises RejectedError when the release may not apply
Wait = Callable[[threading.Event, float], bool]  # sleep up to s seconds; True if the event got set


def event_wait(event: threading.Event, seconds: float) -> bool:
    """The default ``Wait``: sleep on the event, so a shutdown or abort ends the sleep at once."""
    return event.wait(seconds)


def server_health(server: Any) -> HealthSource:
    """Health from a ModelServer: the serving LoadedModel's ``calls``/``failures`` counters."""

    def read(name: str) -> tuple[str | None, int, int]:
        try:
            model = server.get(name)
        except EdgeError:
            return None, 0, 0
        return model.version, model.calls, model.failures

    return read


@dataclass
class Seams:
    """Everything the machine touches outside itself."""

    store: Any  # ModelStore: versions, active, install_dir, activate, rollback, mark_good
    server: Any  # ModelServer: get, sync, errors
    fetcher: ArtifactFetcher
    validate: Validator
    admit: Admit | None = None
    health: HealthSource | None = None  # default: server_health(server)
    now: Callable[[], float] = time.time  # wall clock: the maintenance window, timestamps
    monotonic: Callable[[], float] = time.monotonic  # the health window, timeouts
    wait: Wait = event_wait
    features: FeatureCache | None = None  # set: releases of kind "features" are applied to this cache


class Control:
    """How other threads steer a running update: shut down (resume later) or abort (a transition)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.interrupt = threading.Event()  # set by both; steps stop waiting when it is set
        self.shutting_down = False
        self.abort_reason: str | None = None
        self.keep_download = False
        self.state: State | None = None

    def shutdown(self) -> None:
        with self.lock:
            self.shutting_down = True
            self.interrupt.set()

    def abort(self, reason: str, *, before_activation_only: bool = False, keep_download: bool = False) -> bool:
        """Ask the update to leave by the ``abort`` event; False when it is past the point this allows."""
        with self.lock:
            if self.state in FINAL or (before_activation_only and self.state not in PRE_ACTIVATION):
                return False
            if (self.state, E.ABORT) not in TRANSITIONS and self.state is not None:
                return False  # e.g. already rolling back
            self.abort_reason = reason
            self.keep_download = keep_download
            self.interrupt.set()
            return True


class _Interrupted(Exception):
    """A step noticed ``Control.interrupt``."""


# -- installers: what each step does for one kind of artifact ------------------------------------
class Installer(Protocol):
    """The kind-specific part of each step; the machine does the rest (states, saving, downloads, clean-up)."""

    kind: str

    def current(self, name: str) -> str | None:
        """The version in use now: the update's rollback target."""

    def check(self, record: UpdateRecord, release: Release, staging: Path) -> None:
        """verifying: the unpacked artifact is what the release says; RejectedError if not."""

    def validate(self, record: UpdateRecord, release: Release, staging: Path, control: Control) -> Event | None:
        """validating: prove the candidate fits this device; ``Event.FALLBACK`` to fetch the release's fallback."""

    def activate(self, record: UpdateRecord, release: Release, staging: Path, control: Control) -> None:
        """activating: make the candidate the one in use (idempotent: re-run after a restart)."""

    def watch(self, record: UpdateRecord, release: Release, control: Control) -> tuple[Event, str | None]:
        """health_check: OK, or HEALTH_BREACH with the reason."""

    def restore(self, record: UpdateRecord, control: Control, interruptible: bool) -> str | None:
        """rolling_back and the loop breaker: put the previous version back; return the version in use."""

    def commit(self, record: UpdateRecord) -> None:
        """committed (idempotent): mark the version good."""

    def forget(self, staging: Path) -> None:
        """clean-up: drop anything held in memory for this staging directory."""


class ModelInstaller:
    """Models: the ModelStore's slots, the child-process validator, hot swap and the health window."""

    kind = "model"

    def __init__(self, machine: UpdateMachine) -> None:
        self.m = machine

    def current(self, name: str) -> str | None:
        return self.m.seams.store.active(name)

    def check(self, record: UpdateRecord, release: Release, staging: Path) -> None:
        manifest = verify_version_dir(staging, run_golden=False)  # manifest, size and sha256; no interpreter
        if manifest.name != record.name or manifest.version != record.version:
            raise ManifestError(
                f"the artifact holds {manifest.name} {manifest.version}, "
                f"the release says {record.name} {record.version}"
            )

    def validate(self, record: UpdateRecord, release: Release, staging: Path, control: Control) -> Event | None:
        report = self.m.seams.validate(staging, release.policy.max_latency_ms, control.interrupt)
        record.details["validation"] = {k: report[k] for k in ("p50_ms", "delegate") if k in report}
        self.m._log(record, logging.INFO, "validated: %s", record.details["validation"])
        return None

    def activate(self, record: UpdateRecord, release: Release, staging: Path, control: Control) -> None:
        store, name = self.m.seams.store, record.name
        if staging.is_dir():
            store.install_dir(staging, verify=False)  # validated in the child process already
        elif record.version not in store.versions(name):
            raise FailedError(f"staged candidate {staging} is gone and {name} {record.version} is not installed")
        store.activate(name, record.version)
        self.m._log(
            record, logging.INFO, "activated %s %s (previous %s)", name, record.version, record.previous_version
        )
        self.m._wait_served(record, record.version, control)

    def watch(self, record: UpdateRecord, release: Release, control: Control) -> tuple[Event, str | None]:
        m, policy = self.m, release.policy
        clock = m.seams.monotonic
        deadline = clock() + policy.health_window_s
        version, calls0, fails0 = m.health(record.name)
        while True:
            version, calls, fails = m.health(record.name)
            if version != record.version:
                raise FailedError(
                    f"{record.name} {record.version} stopped serving during the health window (serving: {version})"
                )
            if calls < calls0:  # the model was reloaded: its counters restarted
                calls0, fails0 = 0, 0
            dc, df = calls - calls0, fails - fails0
            if dc >= m.health_min_calls and df / dc > policy.max_error_rate:
                return E.HEALTH_BREACH, (
                    f"health window: {df} of {dc} calls failed ({df / dc:.0%}), above the "
                    f"release's maximum error rate {policy.max_error_rate:.0%}"
                )
            if clock() >= deadline:
                m._log(record, logging.INFO, "health window passed: %d calls, %d failures", dc, df)
                return E.OK, None
            if m.seams.wait(control.interrupt, min(m.poll_s, max(0.0, deadline - clock()))):
                raise _Interrupted()

    def restore(self, record: UpdateRecord, control: Control, interruptible: bool) -> str | None:
        """Make the version that served before the candidate active again (no-op if the candidate is not active)."""
        store, name = self.m.seams.store, record.name
        active = store.active(name)
        if active == record.version and record.previous_version not in (None, record.version):
            if record.previous_version in store.versions(name):
                store.activate(name, record.previous_version)
                target: str | None = record.previous_version
            else:
                target = store.rollback(name)
        elif active == record.version and record.previous_version is None:
            raise NotFoundError(f"{name} {record.version} was the first version: there is nothing to roll back to")
        else:
            target = active
        if target is not None:
            self.m._wait_served(record, target, control if interruptible else Control())
        return target

    def commit(self, record: UpdateRecord) -> None:
        self.m.seams.store.mark_good(record.name, record.version)

    def forget(self, staging: Path) -> None:
        return None


class FeatureInstaller:
    """Feature bundles into the FeatureCache: ``apply`` is one SQLite transaction, i.e. the atomic swap.

    verifying reads and fully validates the bundle (``read_bundle``: hashes, NaN, duplicate keys,
    the device's row bound) and checks it is the release's set and version; validating dry-runs
    the checks ``apply`` makes against the cache (version newer, delta base, row bound), so a
    bundle that cannot apply fails before activation, and a delta whose base is not the cached
    version asks for the release's fallback snapshot; activating applies; there is nothing to
    watch (a value is served from the next read) and nothing to undo (a failed apply rolled back).
    """

    kind = "features"

    def __init__(self, cache: FeatureCache) -> None:
        self.cache = cache
        self._lock = threading.Lock()
        self._read: dict[Path, Bundle] = {}  # verified bundles, kept for activation (one per set at most)

    def current(self, name: str) -> str | None:
        return self.cache.version(name)

    def check(self, record: UpdateRecord, release: Release, staging: Path) -> None:
        bundle = read_bundle(staging, max_rows=self.cache.max_rows)
        info = bundle.info
        if info.set != record.name or info.version != record.version:
            raise BundleSchemaError(
                f"the artifact holds feature set {info.set} version {info.version}, "
                f"the release says {record.name} {record.version}"
            )
        if record.details.get("artifact") == "fallback" and info.kind != "snapshot":
            raise BundleSchemaError(f"the release's fallback must be a snapshot; it holds a {info.kind}")
        by = info.partition.get("by")
        if by is not None and {"by": by, "key": info.partition.get("key")} != release.partition:
            raise BundleSchemaError(
                f"bundle {info.id} is for partition {by}/{info.partition.get('key')}, the "
                f"release for {release.partition['by']}/{release.partition['key']}"
            )
        with self._lock:
            self._read[staging] = bundle

    def _bundle(self, staging: Path) -> Bundle:
        with self._lock:
            bundle = self._read.get(staging)
        return bundle if bundle is not None else read_bundle(staging, max_rows=self.cache.max_rows)  # after a restart

    def validate(self, record: UpdateRecord, release: Release, staging: Path, control: Control) -> Event | None:
        info = self._bundle(staging).info
        current = self.cache.set_info(record.name)
        record.details["bundle"] = {
            "id": info.id,
            "kind": info.kind,
            "base_version": info.base_version,
            "rows": info.rows,
            "deletes": info.deletes,
        }
        if current is not None and current.version == info.version and current.data_sha256 == info.data_sha256:
            return None  # already applied (e.g. by `edge-agent features apply`): activating is a no-op
        if (
            current is not None
            and parse_version(info.version) <= parse_version(current.version)
            and not (release.rollback and info.kind == "snapshot" and info.version != current.version)
        ):
            raise VersionNotNewer(
                f"bundle {info.id}: version {info.version} is not newer than the cached "
                f"{record.name} version {current.version}"
            )
        if info.kind == "delta":
            why = None
            if current is None or current.version != info.base_version:
                why = (
                    f"delta {info.id} is from {record.name} {info.base_version} but the cache holds "
                    f"{'no ' + record.name if current is None else record.name + ' ' + current.version}"
                )
            elif (
                current.features != info.feature_names
                or current.dtype != info.features[0].dtype
                or current.entity_key != info.entity_key
            ):
                why = f"delta {info.id}'s features/dtype/entity key differ from the cached {current.version}"
            if why is not None:
                if release.fallback is not None and record.details.get("artifact") != "fallback":
                    record.details["artifact"] = "fallback"
                    record.details["fallback"] = why
                    self.forget(staging)
                    return E.FALLBACK
                raise DeltaBaseMismatch(
                    f"{why}; the release carries no fallback snapshot",
                    set=record.name,
                    current_version=current.version if current else None,
                    base_version=info.base_version,
                )
        elif self.cache.max_rows is not None:
            others = sum(s.rows for s in self.cache.list_sets() if s.name != record.name)
            if others + info.rows > self.cache.max_rows:
                raise CacheFull(
                    f"bundle {info.id}: the cache would hold {others + info.rows} rows, above "
                    f"max_rows={self.cache.max_rows}"
                )
        return None

    def activate(self, record: UpdateRecord, release: Release, staging: Path, control: Control) -> None:
        if not staging.is_dir() and self.cache.version(record.name) == record.version:
            return  # applied, then interrupted before the clean-up removed the staging copy
        result = self.cache.apply(self._bundle(staging), allow_downgrade=release.rollback)
        self.forget(staging)
        record.details["apply"] = {
            "previous_version": result.previous_version,
            "rows": result.rows,
            "upserted": result.upserted,
            "deleted": result.deleted,
            "noop": result.noop,
            "seconds": round(result.seconds, 3),
        }

    def watch(self, record: UpdateRecord, release: Release, control: Control) -> tuple[Event, str | None]:
        return E.OK, None  # zero-length: the next read serves the new version; there is no error rate to watch

    def restore(self, record: UpdateRecord, control: Control, interruptible: bool) -> str | None:
        return self.cache.version(record.name)  # a failed apply rolled back in SQLite: nothing to undo

    def commit(self, record: UpdateRecord) -> None:
        return None  # the apply's COMMIT was the commit

    def forget(self, staging: Path) -> None:
        with self._lock:
            self._read.pop(staging, None)


# -- the machine -------------------------------------------------------------------------------
class UpdateMachine:
    """Runs update records through their states; one record per artifact, one run per artifact at a time."""

    def __init__(
        self,
        data_dir: str | Path,
        seams: Seams,
        *,
        max_loops: int = DEFAULT_MAX_LOOPS,
        poll_s: float = 0.5,
        serve_timeout_s: float = 120.0,
        health_min_calls: int = 5,
        download_attempts: int = 5,
        retry_backoff_s: float = 2.0,
        on_change: Callable[[UpdateRecord], None] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.records = RecordStore(data_dir)
        self.downloads = self.data_dir / "downloads"
        self.staging = self.data_dir / "staging"
        self.seams = seams
        self.health = seams.health or server_health(seams.server)
        self.max_loops = max_loops
        self.poll_s = poll_s
        self.serve_timeout_s = serve_timeout_s
        self.health_min_calls = health_min_calls
        self.download_attempts = max(1, download_attempts)
        self.retry_backoff_s = retry_backoff_s
        self.on_change = on_change
        self.installers: dict[str, Installer] = {"model": ModelInstaller(self)}
        if seams.features is not None:
            self.installers["features"] = FeatureInstaller(seams.features)
        self._steps: dict[State, Callable[[UpdateRecord, Release, Control], tuple[Event, str | None]]] = {
            S.IDLE: self._admit,
            S.DOWNLOADING: self._download,
            S.VERIFYING: self._verify,
            S.VALIDATING: self._validate,
            S.WAITING_WINDOW: self._wait_window,
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
                return record
            step = self._act(record, state, control)
            if step is None:
                self._log(record, logging.INFO, "stopped in %s; resumes there on the next start", state.value)
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
        self._log(
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
            self._log(record, logging.ERROR, "%s", reason)
            record.reason, state = reason, S.FAILED
        now = self.seams.now()
        record.state = state.value
        record.updated_at = now
        record.history.append((state.value, now))
        self.records.save(record)  # persisted before the state's action runs
        with control.lock:
            control.state = state
        self._log(
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
        except _Interrupted:
            event, reason = E.ERROR, "interrupted"
        except RejectedError as exc:
            event, reason = E.REJECTED, str(exc)
        except Exception as exc:  # Failed… errors and anything unexpected: the table decides
            if not isinstance(exc, EdgeError):
                self._log(record, logging.ERROR, "step %s raised unexpectedly", state.value, exc_info=True)
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
            self._log(record, logging.WARNING, "%s: %s → %s: %s", state.value, event.value, nxt.value, reason)
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
        for attempt in range(1, self.download_attempts + 1):
            try:
                self.seams.fetcher.fetch(artifact, out, control.interrupt)
                break
            except FailedError as exc:
                if control.interrupt.is_set():
                    raise _Interrupted() from exc
                if attempt == self.download_attempts:
                    raise
                delay = self.retry_backoff_s * 2 ** (attempt - 1)
                self._log(
                    record, logging.WARNING, "download attempt %d failed (%s); retrying in %.1fs", attempt, exc, delay
                )
                if self.seams.wait(control.interrupt, delay):
                    raise _Interrupted() from exc
        self._log(record, logging.INFO, "downloaded %d bytes", artifact.size)
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
            self._log(
                record, logging.WARNING, "%s; fetching the release's fallback snapshot", record.details.get("fallback")
            )
            return E.FALLBACK, None
        return (E.IN_WINDOW, None) if self._may_activate(release) else (E.OUT_OF_WINDOW, None)

    def _may_activate(self, release: Release) -> bool:
        return release.policy.urgent or in_window(release.policy.window, time.localtime(self.seams.now()))

    def _wait_window(self, record: UpdateRecord, release: Release, control: Control) -> tuple[Event, str | None]:
        self._log(record, logging.INFO, "waiting for the maintenance window %s", release.policy.window)
        while not self._may_activate(release):
            if self.seams.wait(control.interrupt, self.poll_s):
                raise _Interrupted()
        return E.IN_WINDOW, None

    def _activate(self, record: UpdateRecord, release: Release, control: Control) -> tuple[Event, str | None]:
        self.installer(record.kind).activate(record, release, self.staging_dir(record), control)
        return E.OK, None

    def _health_check(self, record: UpdateRecord, release: Release, control: Control) -> tuple[Event, str | None]:
        return self.installer(record.kind).watch(record, release, control)

    def _roll_back(self, record: UpdateRecord, release: Release, control: Control) -> tuple[Event, str | None]:
        restored = self.installer(record.kind).restore(record, control, False)
        self._log(record, logging.INFO, "rolled back: %s %s serves", record.name, restored)
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
                self._log(record, logging.WARNING, "could not clean up the download: %s", exc)

    # -- helpers ----------------------------------------------------------------------------
    def _wait_served(self, record: UpdateRecord, version: str, control: Control) -> None:
        """Block until the server serves ``version`` of the model (its hot swap does the swap)."""
        server, name = self.seams.server, record.name
        deadline = self.seams.monotonic() + self.serve_timeout_s
        while True:
            if hasattr(server, "sync"):
                server.sync()
            try:
                if server.get(name).version == version:
                    return
            except EdgeError:
                pass
            err = server.errors().get(name) if hasattr(server, "errors") else None
            if err is not None and err.version == version:
                raise IncompatibleModelError(f"{name} {version} failed to load: {err.reason}")
            if self.seams.monotonic() >= deadline:
                raise FailedError(f"{name} {version} did not start serving within {self.serve_timeout_s:g}s")
            if self.seams.wait(control.interrupt, min(self.poll_s, 0.05)):
                raise _Interrupted()

    def _log(self, record: UpdateRecord, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        log.log(level, "update %s (%s %s): " + msg, record.release_id, record.name, record.version, *args, **kwargs)

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
