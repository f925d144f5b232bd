"""The on-device model store: immutable version directories and one atomic active pointer per model.

Layout under ``<data-dir>/models``::

    <name>/versions/<version>/   model.tflite, manifest.json, golden.npz   (never written in place)
                                 (a sealed model: model.tflite.enc instead, opened only into memory)
    <name>/state.json            {"active": ..., "history": [...], "good": [...]}  (os.replace'd)
    .lock                        flock held by every writer (CLI or agent)

Installing copies into a hidden temp dir, fsyncs it and renames it into place; activating
rewrites ``state.json`` atomically. A ``kill -9`` at any moment therefore leaves either the
old or the new state, and the previously active version on disk, intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edge_agent.errors import NotFoundError, RejectedError, StoreError
from edge_agent.fsutil import atomic_write_json, fsync_dir, locked
from edge_agent.inference.modelpack import build_version_dir, copy_version_dir, verify_version_dir
from edge_agent.inference.runtime import LoadedModel, ModelSource, RuntimeOptions
from edge_agent.models.sealed import load_fleet_key, model_source
from edge_agent.wire.model.manifest import MANIFEST_FILE, Manifest, list_versions
from edge_agent.wire.names import check_name, parse_version

STATE_FILE = "state.json"
STATE_SCHEMA = 1


@dataclass
class ModelState:
    """Persisted status of one model name: which version serves and which served before."""

    active: str | None = None
    history: list[str] = field(default_factory=list)  # activation order, newest last
    good: list[str] = field(default_factory=list)  # versions that have served successfully

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": STATE_SCHEMA, "active": self.active, "history": self.history, "good": self.good}

    @classmethod
    def from_dict(cls, raw: Any) -> ModelState:
        if not isinstance(raw, dict) or raw.get("schema_version") != STATE_SCHEMA:
            raise StoreError(f"unsupported model state {raw!r:.80}")
        return cls(active=raw.get("active"), history=list(raw.get("history") or []), good=list(raw.get("good") or []))


class ModelStore:
    """Versions of models on disk, with crash-safe activation and rollback.

    ``fleet_key``: the private fleet key file (``ota.fleet_key``) that opens sealed versions; read
    on first use. Without it, a sealed version is refused with the reason (SealedModelRejected).
    """

    def __init__(self, data_dir: str | Path, keep: int = 3, fleet_key: Path | None = None) -> None:
        self.root = Path(data_dir) / "models"
        self.keep = max(2, keep)
        self.fleet_key = fleet_key
        self._key: X25519PrivateKey | None = None
        self.root.mkdir(parents=True, exist_ok=True)

    # -- opening models ------------------------------------------------------
    def key(self) -> X25519PrivateKey | None:
        """The private fleet key (loaded once, mode 0600 enforced), or None when none is configured."""
        if self._key is None and self.fleet_key is not None:
            self._key = load_fleet_key(self.fleet_key)
        return self._key

    def open_source(self, version_dir: Path, manifest: Manifest) -> ModelSource:
        """What to load for a version directory: its model file, or a sealed model's plaintext in memory."""
        return model_source(version_dir, manifest, self.key())

    def load(self, name: str, version: str, options: RuntimeOptions | None = None) -> LoadedModel:
        """An installed version, ready to serve (a sealed one is decrypted into memory only)."""
        manifest = self.manifest(name, version)
        return LoadedModel(self.open_source(self.version_dir(name, version), manifest), manifest, options)

    # -- locking --------------------------------------------------------------
    def _locked(self) -> AbstractContextManager[None]:
        return locked(self.root / ".lock")

    # -- reading ----------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, name: str) -> list[str]:
        return list_versions(self.root / check_name(name) / "versions")

    def version_dir(self, name: str, version: str) -> Path:
        parse_version(version)
        return self.root / check_name(name) / "versions" / version

    def manifest(self, name: str, version: str) -> Manifest:
        path = self.version_dir(name, version)
        if not (path / MANIFEST_FILE).is_file():
            raise NotFoundError(f"model {name!r} has no version {version!r}")
        return Manifest.load(path / MANIFEST_FILE)

    def state(self, name: str) -> ModelState:
        path = self.root / check_name(name) / STATE_FILE
        try:
            return ModelState.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return ModelState()
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc

    def active(self, name: str) -> str | None:
        return self.state(name).active

    def active_map(self) -> dict[str, str]:
        """``{name: active version}`` for every model that has one."""
        out = {}
        for name in self.names():
            version = self.active(name)
            if version is not None:
                out[name] = version
        return out

    def list(self) -> list[dict[str, Any]]:
        """A summary row per model: versions, the active one and the rollback target."""
        rows = []
        for name in self.names():
            st = self.state(name)
            rows.append(
                {
                    "name": name,
                    "active": st.active,
                    "versions": self.versions(name),
                    "previous": _previous(st),
                    "good": st.good,
                }
            )
        return rows

    # -- writing ------------------------------------------------------------
    def _write_state(self, name: str, st: ModelState) -> None:
        atomic_write_json(self.root / name / STATE_FILE, st.to_dict())

    def install_dir(self, src: str | Path, *, verify: bool = True, options: RuntimeOptions | None = None) -> Manifest:
        """Install a prepared version directory (registry, OTA download). The first version becomes active."""
        manifest = (
            verify_version_dir(src, run_golden=verify, options=options, opener=self.open_source)
            if verify
            else Manifest.load(Path(src) / MANIFEST_FILE)
        )
        with self._locked():
            target = self.version_dir(manifest.name, manifest.version)
            if target.exists():
                existing = Manifest.load(target / MANIFEST_FILE)
                if existing.sha256 != manifest.sha256:
                    raise RejectedError(
                        f"{manifest.name} version {manifest.version} is already installed with different content"
                    )
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = copy_version_dir(src, target.parent)
                os.replace(tmp, target)
                fsync_dir(target.parent)
            st = self.state(manifest.name)
            if st.active is None:
                self._activate_locked(manifest.name, manifest.version, st)
            self._prune_locked(manifest.name, manifest.version)
        return manifest

    def install_file(
        self,
        tflite: str | Path,
        name: str,
        version: str | None = None,
        *,
        builder: Callable[..., Any] = build_version_dir,
        **build: Any,
    ) -> Manifest:
        """Install a bare ``.tflite``: derive its spec, make golden samples by running it, then install.

        ``builder(tflite, out_dir, name=, version=, **build)`` makes the version directory; the
        CLI passes one that does it in the isolated validation child (the file is untrusted).
        """
        check_name(name)
        if version is None:
            existing = self.versions(name)
            version = str(parse_version(existing[-1])[0] + 1) if existing else "1"
        parse_version(version)
        staging = self.root / ".staging"
        staging.mkdir(exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=staging))
        try:
            builder(tflite, work, name=name, version=version, **build)
            return self.install_dir(work, verify=False)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def activate(self, name: str, version: str) -> None:
        """Point ``name`` at an installed ``version``, atomically."""
        parse_version(version)
        with self._locked():
            if version not in self.versions(name):
                raise NotFoundError(f"model {name!r} has no installed version {version!r}")
            self._activate_locked(name, version, self.state(name))

    def _activate_locked(self, name: str, version: str, st: ModelState) -> None:
        if st.active == version:
            return
        history = [v for v in st.history if v != version] + [version]
        self._write_state(name, ModelState(active=version, history=history, good=st.good))

    def rollback(self, name: str) -> str:
        """Re-activate the version that served before the current one; return it."""
        with self._locked():
            st = self.state(name)
            prev = _previous(st, installed=self.versions(name))
            if st.active is None or prev is None:
                raise NotFoundError(f"model {name!r} has no previous version to roll back to")
            history = [v for v in st.history if v != st.active]
            self._write_state(name, ModelState(active=prev, history=history, good=st.good))
            return prev

    def mark_good(self, name: str, version: str) -> None:
        """Record that ``version`` has served successfully (it becomes a safe rollback target)."""
        with self._locked():
            st = self.state(name)
            if version not in st.good:
                st.good.append(version)
                self._write_state(name, st)

    def _prune_locked(self, name: str, just_installed: str) -> None:
        """Delete the oldest versions beyond ``keep``; never the active one, its rollback target or the new one."""
        st = self.state(name)
        versions = self.versions(name)
        protected = {just_installed, st.active, _previous(st, installed=versions)}
        removable = [v for v in versions if v not in protected]  # oldest first
        excess = len(versions) - self.keep
        victims = removable[: max(0, excess)]
        for v in victims:
            victim = self.version_dir(name, v)
            trash = victim.parent / f".trash-{v}"
            os.replace(victim, trash)
            shutil.rmtree(trash, ignore_errors=True)
        if victims:
            fsync_dir(self.root / name / "versions")

    def recover(self) -> None:
        """Clean up after a crash: drop half-copied temp dirs, activate a lone version left without a pointer."""
        with self._locked():
            for name in self.names():
                vdir = self.root / name / "versions"
                if vdir.is_dir():
                    for p in vdir.iterdir():
                        if p.name.startswith((".tmp-", ".trash-")):
                            shutil.rmtree(p, ignore_errors=True)
                st = self.state(name)
                versions = self.versions(name)
                if st.active is None and versions:
                    self._activate_locked(name, versions[0], st)
                elif st.active is not None and st.active not in versions:
                    raise StoreError(f"model {name!r}: active version {st.active!r} is missing on disk")
            shutil.rmtree(self.root / ".staging", ignore_errors=True)


def _previous(st: ModelState, installed: list[str] | None = None) -> str | None:
    for v in reversed(st.history):
        if v != st.active and (installed is None or v in installed):
            return v
    return None
