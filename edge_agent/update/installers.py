"""What each update step does to one kind of artifact (RAUC's slot handlers); the machine does the rest.

``ModelInstaller`` (``kind = "model"``) installs into the ``ModelStore``, validates in a child
process, activates by the store's pointer and watches the health window. ``FeatureInstaller``
(``kind = "features"``) reads the feature bundle while verifying, dry-runs it against the cache
while validating, and activates with ``FeatureCache.apply``: one SQLite transaction, so the swap
is atomic. Installers get their collaborators (the seams, the OTA settings) explicitly and never
reach into the machine: the machine calls them, never the other way round.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Protocol

from edge_agent.config import OtaConfig
from edge_agent.errors import (
    BundleSchemaError,
    DeltaBaseMismatch,
    EdgeError,
    FailedError,
    IncompatibleModelError,
    Interrupted,
    ManifestError,
    NotFoundError,
)
from edge_agent.features.cache import FeatureCache
from edge_agent.inference.modelpack import verify_version_dir
from edge_agent.models.sealed import check_key, load_fleet_key
from edge_agent.update.health import signals
from edge_agent.update.health.window import HealthWindow
from edge_agent.update.seams import Control, Seams, server_health
from edge_agent.update.states import Event, UpdateRecord, log_update
from edge_agent.wire.bundle import Bundle, read_bundle
from edge_agent.wire.model.signature import require_compatible
from edge_agent.wire.protocol import Release

E = Event


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

    def __init__(self, seams: Seams, config: OtaConfig) -> None:
        self.store = seams.store
        self.server = seams.server
        self.validator = seams.validate
        self.health = seams.health or server_health(seams.server)
        self.taps = seams.taps  # the request path's figures: the model health signals (health.signals)
        self.monotonic = seams.monotonic
        self.wait = seams.wait
        self.config = config

    def current(self, name: str) -> str | None:
        return self.store.active(name)

    def check(self, record: UpdateRecord, release: Release, staging: Path) -> None:
        manifest = verify_version_dir(staging, run_golden=False)  # manifest, size and sha256; no interpreter
        if manifest.name != record.name or manifest.version != record.version:
            raise ManifestError(
                f"the artifact holds {manifest.name} {manifest.version}, "
                f"the release says {record.name} {record.version}"
            )
        key = self.config.fleet_key
        check_key(manifest, load_fleet_key(key) if key is not None else None)  # sealed: can this device open it?
        active = self.store.active(record.name)
        if active is not None and active != record.version:  # the clients of the active version keep working
            old = self.store.manifest(record.name, active)
            record.details["signature_changes"] = require_compatible(old, manifest, breaking=release.policy.breaking)
        record.details["encrypted"] = manifest.extra.get("encrypted") is True

    def validate(self, record: UpdateRecord, release: Release, staging: Path, control: Control) -> Event | None:
        report = self.validator(staging, release.policy.max_latency_ms, control.interrupt)
        record.details["validation"] = {k: report[k] for k in ("p50_ms", "delegate") if k in report}
        log_update(record, logging.INFO, "validated: %s", record.details["validation"])
        return None

    def activate(self, record: UpdateRecord, release: Release, staging: Path, control: Control) -> None:
        store, name = self.store, record.name
        if staging.is_dir():
            store.install_dir(staging, verify=False)  # validated in the child process already
        elif record.version not in store.versions(name):
            raise FailedError(f"staged candidate {staging} is gone and {name} {record.version} is not installed")
        if signals.wanted(release.policy) and "baseline" not in record.details:  # before the pointer moves
            record.details["baseline"] = signals.baseline(self.taps, name, record.previous_version)
        store.activate(name, record.version)
        log_update(record, logging.INFO, "activated %s %s (previous %s)", name, record.version, record.previous_version)
        self.wait_served(record, record.version, control)

    def watch(self, record: UpdateRecord, release: Release, control: Control) -> tuple[Event, str | None]:
        window = HealthWindow(
            self.health, self.taps, self.config.health_min_calls, self.config.poll_s, self.monotonic, self.wait
        )
        got = window.watch(
            record.name, record.version, release.policy, record.details.get("baseline"), control.interrupt
        )
        if got.signals is not None:
            record.details["signals"] = got.signals
        if got.breach is not None:
            return E.HEALTH_BREACH, got.breach
        log_update(record, logging.INFO, "health window passed: %d calls, %d failures", got.calls, got.failures)
        return E.OK, None

    def restore(self, record: UpdateRecord, control: Control, interruptible: bool) -> str | None:
        """Make the version that served before the candidate active again (no-op if the candidate is not active)."""
        store, name = self.store, record.name
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
            self.wait_served(record, target, control if interruptible else Control())
        return target

    def commit(self, record: UpdateRecord) -> None:
        self.store.mark_good(record.name, record.version)

    def forget(self, staging: Path) -> None:
        return None

    def wait_served(self, record: UpdateRecord, version: str, control: Control) -> None:
        """Block until the server serves ``version`` of the model (its hot swap does the swap)."""
        server, name, timeout_s = self.server, record.name, self.config.serve_timeout_s
        deadline = self.monotonic() + timeout_s
        while True:
            server.sync()
            try:
                if server.get(name).version == version:
                    return
            except EdgeError:
                pass
            err = server.errors().get(name)
            if err is not None and err.version == version:
                raise IncompatibleModelError(f"{name} {version} failed to load: {err.reason}")
            if self.monotonic() >= deadline:
                raise FailedError(f"{name} {version} did not start serving within {timeout_s:g}s")
            if self.wait(control.interrupt, min(self.config.poll_s, 0.05)):
                raise Interrupted()


class FeatureInstaller:
    """Feature bundles into the FeatureCache: ``apply`` is one SQLite transaction, i.e. the atomic swap.

    verifying reads and fully validates the bundle (``read_bundle``: hashes, NaN, duplicate keys,
    the device's row bound) and checks it is the release's set and version; validating is
    ``FeatureCache.plan``, the dry run of ``apply``'s own admission (version newer, delta base,
    row bound), so a bundle that cannot apply fails before activation, and a delta whose base is
    not the cached version asks for the release's fallback snapshot; activating applies; there is nothing to
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
        record.details["bundle"] = {
            "id": info.id,
            "kind": info.kind,
            "base_version": info.base_version,
            "rows": info.rows,
            "deletes": info.deletes,
        }
        try:
            self.cache.plan(info, allow_downgrade=release.rollback)  # the cache's own rules, as a dry run
        except DeltaBaseMismatch as exc:
            why = _delta_mismatch(record.name, info.id, info.base_version, exc.current_version)
            if release.fallback is not None and record.details.get("artifact") != "fallback":
                record.details["artifact"] = "fallback"
                record.details["fallback"] = why
                self.forget(staging)
                return E.FALLBACK
            raise DeltaBaseMismatch(
                f"{why}; the release carries no fallback snapshot",
                set=record.name,
                current_version=exc.current_version,
                base_version=info.base_version,
            ) from exc
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


def _delta_mismatch(name: str, bundle_id: str, base: str | None, cached: str | None) -> str:
    """The record's words for a delta that does not fit the cache (``plan`` decided that it does not)."""
    if cached != base:
        held = f"no {name}" if cached is None else f"{name} {cached}"
        return f"delta {bundle_id} is from {name} {base} but the cache holds {held}"
    return f"delta {bundle_id}'s features/dtype/entity key differ from the cached {cached}"
