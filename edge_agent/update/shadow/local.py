"""``edge-agent models shadow NAME VERSION``: a shadow release without a broker (air-gapped devices).

The command writes a request, ``<data-dir>/shadow/<name>.json`` (temp file, fsync,
``os.replace``), for a version already installed with ``edge-agent models install``. The
running agent's ``LocalShadows`` thread picks it up, marks it ``shadowing`` (persisted
first), compares the version with the active one on a sampled copy of live traffic
(``update.shadow.compare_live``, the same code and rules as a shadow release). If the rules
hold it saves ``health_check``, activates the version through the store's pointer (the hot
swap serves it) and watches the health window like a release does (``update.health.window``:
error rate, and the p99 and output-shift signals when the policy sets them). It writes the
verdict: ``promoted`` (the window passed; the version is marked good), ``rolled_back`` (the
window breached: the previous version is active again, the reason names the signal) or
``rejected`` with the figures. The command waits for that and prints it.

Crash safety: the store's pointer moves only after ``health_check`` is saved, so the candidate
never answers a client unpromoted; a request left ``shadowing`` by a crash runs again when the
agent starts, and one left in ``health_check`` re-runs its health window.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from edge_agent.config import OtaConfig
from edge_agent.errors import EdgeError, FailedError, Interrupted, ManifestError, NotFoundError, RejectedError
from edge_agent.fsutil import atomic_write_json
from edge_agent.models.store import ModelStore
from edge_agent.update.health import signals
from edge_agent.update.health.window import HealthWindow
from edge_agent.update.shadow.verdict import ShadowHost, compare_live
from edge_agent.wire.model.signature import require_compatible
from edge_agent.wire.names import check_name
from edge_agent.wire.policy import Policy
from edge_agent.wire.shadow import ShadowFigures, check_policy

log = logging.getLogger(__name__)


class RequestState(str, Enum):
    """A local shadow request's state; the values are written to ``<name>.json`` and printed (frozen)."""

    REQUESTED = "requested"
    SHADOWING = "shadowing"
    HEALTH_CHECK = "health_check"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"

    def __str__(self) -> str:  # the value in messages and f-strings, on every Python version
        return self.value


R = RequestState
PENDING = (R.REQUESTED, R.SHADOWING, R.HEALTH_CHECK)
FINAL = (R.PROMOTED, R.REJECTED, R.ROLLED_BACK, R.FAILED)
SERVED_TIMEOUT_S = 30.0  # the hot swap serves an activated version within the server's watch interval
SHADOW_DIR = "shadow"


@dataclass
class ShadowRequest:
    """One local shadow run of ``name`` ``version``, as saved in ``<data-dir>/shadow/<name>.json``."""

    name: str
    version: str
    policy: dict[str, Any]  # the Policy fields: shadow_rate, shadow_min_samples, shadow_window_s, promote_*
    state: RequestState = R.REQUESTED
    previous: str | None = None  # the active version it was compared with
    reason: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    updated_at: float = field(default_factory=time.time)
    baseline: dict[str, Any] | None = None  # the previous version's recent figures (health signals), before activation

    def __post_init__(self) -> None:
        self.state = RequestState(self.state)  # as read back from JSON: a plain string

    @property
    def rules(self) -> Policy:
        return check_policy(Policy(mode="shadow", **self.policy))


def request_path(data_dir: str | Path, name: str) -> Path:
    return Path(data_dir) / SHADOW_DIR / f"{check_name(name)}.json"


def save(data_dir: str | Path, request: ShadowRequest) -> None:
    request.updated_at = time.time()
    path = request_path(data_dir, request.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, asdict(request), mode=0o600)


def load(data_dir: str | Path, name: str) -> ShadowRequest | None:
    path = request_path(data_dir, name)
    try:
        raw = json.loads(path.read_text())
        return ShadowRequest(**raw)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise ManifestError(f"shadow request {path} unreadable: {exc}") from exc


def request(store: ModelStore, data_dir: str | Path, name: str, version: str, policy: dict[str, Any]) -> ShadowRequest:
    """Check and save a request (the command's side); RejectedError/NotFoundError when it cannot run."""
    rules = check_policy(Policy(mode="shadow", **policy))
    active = store.active(name)
    if version not in store.versions(name):
        raise NotFoundError(f"{name} {version} is not installed (edge-agent models install first)")
    if active is None or active == version:
        raise RejectedError(
            f"{name} {version} is {'the active version' if active else 'not comparable'}: nothing to shadow"
        )
    require_compatible(store.manifest(name, active), store.manifest(name, version), breaking=rules.breaking)
    pending = load(data_dir, name)
    if pending is not None and pending.state in PENDING:
        raise RejectedError(f"{name} {pending.version} is already being shadowed")
    req = ShadowRequest(name, version, policy, previous=active)
    save(data_dir, req)
    return req


class LocalShadows(threading.Thread):
    """The agent's side: a daemon thread that runs saved requests one at a time (``start``, ``stop``)."""

    def __init__(self, data_dir: str | Path, store: ModelStore, host: ShadowHost, poll_s: float = 0.5) -> None:
        super().__init__(name="local-shadow", daemon=True)
        self.data_dir, self.store, self.host, self.poll_s = Path(data_dir), store, host, poll_s
        self.halt = threading.Event()

    def stop(self) -> None:
        self.halt.set()  # a shadow in progress is interrupted: it stays "shadowing" and runs again on the next start
        if self.is_alive():
            self.join(10)

    def run(self) -> None:
        while not self.halt.wait(self.poll_s):
            for path in sorted((self.data_dir / SHADOW_DIR).glob("*.json")):
                try:
                    req = load(self.data_dir, path.stem)
                    if req is not None and req.state is R.HEALTH_CHECK:
                        self.watch_health(req)
                    elif req is not None and req.state in PENDING:
                        self.shadow(req)
                except Interrupted:
                    return  # stopping: the request stays as it is and goes on at the next start
                except Exception:
                    log.exception("local shadow of %s failed", path.stem)

    def shadow(self, req: ShadowRequest) -> ShadowRequest:
        """Shadow, then reject or go on to the health window; every state saved before the step that depends on it."""
        req.state, req.figures = R.SHADOWING, {}
        save(self.data_dir, req)

        def report(figures: ShadowFigures) -> None:
            req.figures = figures.to_dict()
            save(self.data_dir, req)

        try:
            active = self.store.active(req.name)
            if active is None or active != req.previous:
                raise RejectedError(f"{req.name} {req.previous} no longer serves (active: {active})")
            ok, req.reason = compare_live(
                self.host, req.name, active, req.version, req.rules, self.halt, self.poll_s, report
            )
            if ok:
                wanted = signals.wanted(req.rules)
                req.baseline = signals.baseline(self.host.taps, req.name, active) if wanted else None
                req.state = R.HEALTH_CHECK  # saved before the pointer moves
                save(self.data_dir, req)
                return self.watch_health(req)
            req.state = R.REJECTED
        except EdgeError as exc:
            req.state, req.reason = R.FAILED, str(exc)
        return self._decided(req)

    def watch_health(self, req: ShadowRequest) -> ShadowRequest:
        """Activate the promoted version (again, after a restart) and watch its health window; roll back on a breach."""
        try:
            if self.store.active(req.name) != req.version:
                self.store.activate(req.name, req.version)  # the hot swap serves it within watch_interval_s
            window = self._window()
            self._wait_served(window, req)
            got = window.watch(req.name, req.version, req.rules, req.baseline, self.halt)
            if got.breach is None:
                self.store.mark_good(req.name, req.version)
                req.state = R.PROMOTED
                req.reason = f"{req.reason}; health window passed: {got.calls} calls, {got.failures} failures"
            else:
                if req.previous is not None and self.store.active(req.name) == req.version:
                    self.store.activate(req.name, req.previous)
                req.state, req.reason = R.ROLLED_BACK, got.breach
        except EdgeError as exc:
            req.state, req.reason = R.FAILED, str(exc)
        return self._decided(req)

    def _window(self) -> HealthWindow:
        if self.host.health is None:
            raise FailedError("this agent cannot watch a health window (no model server)")
        min_calls, clock = OtaConfig.health_min_calls, self.host.monotonic
        return HealthWindow(self.host.health, self.host.taps, min_calls, self.poll_s, clock, self.host.wait)

    def _wait_served(self, window: HealthWindow, req: ShadowRequest) -> None:
        deadline = time.monotonic() + SERVED_TIMEOUT_S
        while window.health(req.name)[0] != req.version:
            if time.monotonic() > deadline:
                raise FailedError(f"{req.name} {req.version} was activated but not served within {SERVED_TIMEOUT_S:g}s")
            if self.halt.wait(0.05):
                raise Interrupted()

    def _decided(self, req: ShadowRequest) -> ShadowRequest:
        level = logging.INFO if req.state is R.PROMOTED else logging.WARNING
        log.log(level, "local shadow %s: %s: %s", req.name, req.state, req.reason)
        save(self.data_dir, req)
        return req
