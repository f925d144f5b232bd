"""The models this agent serves, kept in step with the store and hot-swapped without dropping requests.

Exactly one version of each model serves: the store's active one (the slot model).
When the active pointer moves, the new version is loaded and warmed up on the watcher
thread first, then one dict assignment makes it take traffic. Requests that already hold
the old ``LoadedModel`` finish on it; it is freed when the last of them lets go.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import EdgeError, NotFoundError, NotReadyError
from edge_agent.inference.runtime import LoadedModel, RuntimeOptions
from edge_agent.models.store import ModelStore
from edge_agent.models.taps import ModelTaps

log = logging.getLogger(__name__)

SwapListener = Callable[[str, "LoadedModel | None", "LoadedModel | None"], None]


@dataclass
class LoadError:
    """Why the store's active version of a model could not be loaded (the old one keeps serving)."""

    version: str
    reason: str
    at: float


class ModelServer:
    """Loads the store's active versions and swaps them in atomically."""

    def __init__(self, store: ModelStore, options: RuntimeOptions | None = None, warmup_runs: int = 5) -> None:
        self.store = store
        self.options = options or RuntimeOptions()
        self.warmup_runs = warmup_runs
        self._models: dict[str, LoadedModel] = {}
        self._errors: dict[str, LoadError] = {}
        self._listeners: list[SwapListener] = []
        self._unloaded: set[str] = set()  # models stopped by the repository extension until loaded again
        self._sync_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.synced_once = False
        self.taps = ModelTaps()  # recent figures per version, shadow runners (fed by the request path)

    # -- lookups (hot path) ---------------------------------------------------
    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The serving model, or NotFoundError/NotReadyError with a reason a client can act on."""
        model = self._models.get(name)
        if model is None:
            if name in self._unloaded:
                raise NotReadyError(f"model {name!r} is unloaded (POST /v2/repository/models/{name}/load serves it)")
            if name in self._errors:
                raise NotReadyError(f"model {name!r} is not loaded: {self._errors[name].reason}")
            raise NotFoundError(f"unknown model {name!r}")
        if version is not None and version != model.version:
            try:
                installed = self.store.versions(name)
            except EdgeError:
                installed = []
            if version in installed:
                raise NotReadyError(
                    f"model {name!r} version {version!r} is installed but not active (active: {model.version})"
                )
            raise NotFoundError(f"model {name!r} has no version {version!r}")
        return model

    def loaded(self) -> dict[str, LoadedModel]:
        return dict(self._models)

    def errors(self) -> dict[str, LoadError]:
        return dict(self._errors)

    def unloaded(self) -> set[str]:
        """Models stopped by :meth:`unload`."""
        return set(self._unloaded)

    def add_listener(self, fn: SwapListener) -> None:
        """Call ``fn(name, old, new)`` after every swap (metrics, telemetry)."""
        self._listeners.append(fn)

    # -- reconciliation -----------------------------------------------------
    def sync(self) -> list[tuple[str, str | None, str | None]]:
        """Bring the served set in line with the store; return the swaps made as (name, old, new)."""
        with self._sync_lock:
            wanted = {n: v for n, v in self.store.active_map().items() if n not in self._unloaded}
            changes: list[tuple[str, str | None, str | None]] = []
            for name, version in wanted.items():
                current = self._models.get(name)
                if current is not None and current.version == version:
                    continue
                err = self._errors.get(name)
                if err is not None and err.version == version:
                    continue  # already failed on this version; wait for the pointer to move
                try:
                    new = self._load(name, version)
                except EdgeError as exc:
                    log.error(
                        "model %s version %s failed to load, keeping %s: %s",
                        name,
                        version,
                        current.version if current else "nothing",
                        exc,
                    )
                    self._errors[name] = LoadError(version, str(exc), time.time())
                    continue
                self._errors.pop(name, None)
                self._models[name] = new
                changes.append((name, current.version if current else None, version))
                log.info("serving %s version %s (was %s)", name, version, current.version if current else None)
                self._notify(name, current, new)
            for name in [n for n in self._models if n not in wanted]:
                old = self._models.pop(name)
                changes.append((name, old.version, None))
                self._notify(name, old, None)
            self.synced_once = True
            return changes

    def unload(self, name: str) -> None:
        """Stop serving ``name`` until :meth:`load` (in memory only: a restart serves it again)."""
        with self._sync_lock:
            self._unloaded.add(name)
        self.sync()

    def load(self, name: str) -> None:
        """Serve ``name`` again after :meth:`unload`, at the store's active version (synced now)."""
        with self._sync_lock:
            self._unloaded.discard(name)
            self._errors.pop(name, None)  # an explicit load retries a version that failed before
        self.sync()

    def _load(self, name: str, version: str) -> LoadedModel:
        model = self.store.load(name, version, self.options)  # a sealed model: decrypted into memory only
        model.warmup(self.warmup_runs)
        return model

    def _notify(self, name: str, old: LoadedModel | None, new: LoadedModel | None) -> None:
        for fn in self._listeners:
            try:
                fn(name, old, new)
            except Exception:  # a listener must never break serving
                log.exception("swap listener failed")

    # -- background watcher -----------------------------------------------
    def start(self, interval: float = 0.5) -> None:
        """Poll the store every ``interval`` seconds (CLI changes are served within ~interval + load time)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, args=(interval,), name="model-watcher", daemon=True)
        self._thread.start()

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.sync()
            except Exception:
                log.exception("model sync failed; retrying")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def status(self) -> dict[str, Any]:
        return {
            "models": {name: m.info() for name, m in sorted(self._models.items())},
            "errors": {name: {"version": e.version, "reason": e.reason} for name, e in self._errors.items()},
        }
