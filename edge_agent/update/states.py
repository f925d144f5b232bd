"""The update lifecycle's vocabulary: named states, the one transitions table, the resume map, the records.

States are a ``str`` Enum whose values are the on-disk format (frozen: never rename a value)::

    idle ─ok▶ downloading ─ok▶ verifying ─ok▶ validating ─in_window▶ activating ─ok▶ health_check ─ok▶ committed
                                                  │                        ▲
                                                  └─out_of_window▶ waiting_window ─in_window┘
    validating ─shadow▶ shadowing ─in_window▶ activating | ─out_of_window▶ waiting_window   (a shadow release)
    shadowing ─rejected/error/abort▶ failed   (the candidate never served; the reason holds its figures)
    activating   ─error/rejected/abort▶ rolling_back ─ok▶ rolled_back
    health_check ─health_breach/error/abort▶ rolling_back ─error▶ failed
    idle ─rejected▶ rejected
    idle, downloading, verifying, validating, waiting_window ─error/rejected/abort▶ failed
    validating ─fallback▶ downloading   (a feature delta whose base is not the cached version: fetch the snapshot)

Finals (``committed``, ``rolled_back``, ``failed``, ``rejected``) have no transitions.
``RESUME`` maps each saved state to the step to run after a restart; an unknown state means
``rolling_back``. ``UpdateRecord`` is one transaction, saved by ``RecordStore`` (temp file,
fsync, ``os.replace``) before every step; it carries a schema version and a loop counter, which
``recover_before_serving`` also counts at every start.
Kept apart from the machine so the coordinator, the simulator and the tests share the names
without importing the machinery.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from edge_agent.config import OtaConfig
from edge_agent.errors import EdgeError, ManifestError
from edge_agent.fsutil import atomic_write_json
from edge_agent.wire.names import check_name
from edge_agent.wire.protocol import (
    RESULT_FAILED,
    RESULT_REJECTED,
    RESULT_ROLLED_BACK,
    RESULT_SUCCESS,
    Release,
    UpdateReport,
)

log = logging.getLogger("edge_agent.update")

RECORD_SCHEMA = 1


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
    SHADOWING = "shadowing"  # installed and loaded beside the active version, fed a copy of live traffic


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
    SHADOW = "shadow"  # a shadow release: compare the candidate on live traffic before activating


S, E = State, Event
FINAL: frozenset[State] = frozenset({S.COMMITTED, S.ROLLED_BACK, S.FAILED, S.REJECTED})
# States in which the candidate has not been activated: a newer release may supersede them.
PRE_ACTIVATION: frozenset[State] = frozenset(
    {S.IDLE, S.DOWNLOADING, S.VERIFYING, S.VALIDATING, S.WAITING_WINDOW, S.SHADOWING}
)

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
    (S.VALIDATING, E.SHADOW): S.SHADOWING,
    (S.SHADOWING, E.IN_WINDOW): S.ACTIVATING,
    (S.SHADOWING, E.OUT_OF_WINDOW): S.WAITING_WINDOW,
    (S.SHADOWING, E.REJECTED): S.FAILED,
    (S.SHADOWING, E.ERROR): S.FAILED,
    (S.SHADOWING, E.ABORT): S.FAILED,
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
    S.SHADOWING: S.SHADOWING,  # a new, full window: the candidate is loaded again, never served
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
    """The key of an artifact's update record and lane: the model name (or ``edge-agent``), or ``features:<set>``."""
    return name if kind in ("model", "agent") else f"{kind}:{name}"


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
            self.release_id,
            self.name,
            self.version,
            self.state,
            self.result,
            self.reason,
            self.updated_at,
            self.details.get("shadow"),
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
        atomic_write_json(path, record.to_dict(), mode=0o600)

    def load(self, key: str) -> UpdateRecord | None:
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


def log_update(record: UpdateRecord, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
    """Log one line of an update: every line names the update id and the artifact (house rule 7)."""
    log.log(level, "update %s (%s %s): " + msg, record.release_id, record.name, record.version, *args, **kwargs)


class ModelPointer(Protocol):
    """The model store's active pointer: all the loop breaker needs before anything serves."""

    def active(self, name: str) -> str | None: ...

    def activate(self, name: str, version: str) -> None: ...

    def mark_good(self, name: str, version: str) -> None: ...


def recover_before_serving(
    data_dir: str | Path,
    store: ModelPointer,
    *,
    max_loops: int = OtaConfig.max_loops,
    now: Callable[[], float] = time.time,
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
        if record is None or record.kind != "model":
            continue  # feature sets are not loaded at start: their updates count their loads when they resume
        if record.final:  # killed between saving `committed` and its final action: finish it before serving
            if record.state == State.COMMITTED.value and store.active(name) == record.version:
                store.mark_good(name, record.version)
            continue
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
            record.state, record.reason = State.FAILED.value, reason
            record.updated_at = now()
            record.history.append((State.FAILED.value, record.updated_at))
        records.save(record)
        out.append(record)
    return out
