"""The model registry: released model versions in a plain directory tree.

Layout (each version directory is exactly what ``edge_agent.inference.modelpack.build_version_dir``
writes, so the device, OTA downloads and the shipped ``models/`` folder share it)::

    DIR/<name>/<version>/         model.tflite, manifest.json, golden.npz
    DIR/<name>/<version>.eval/    optional training report (eval.json, eval.png); never shipped
    DIR/.lock                     flock held while a version is published

Versions are immutable: a version is built in a hidden temp dir, fsynced and renamed into
place, so readers never see half a version. Registering an existing version again is a
no-op when the content is identical and an error when it differs: a version number must
always mean one model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from cloud_batch.errors import RegistryError
from edge_agent.errors import EdgeError
from edge_agent.fsutil import atomic_write_bytes, fsync_dir, fsync_tree, locked
from edge_agent.inference.golden import load_golden
from edge_agent.inference.modelpack import build_version_dir, sha256_file, verify_version_dir
from edge_agent.wire.model.manifest import GOLDEN_FILE, MANIFEST_FILE, MODEL_FILE, Manifest, list_versions
from edge_agent.wire.names import check_name, parse_version

EVAL_SUFFIX = ".eval"


def _publishable(directory: Path) -> None:
    """Give a staged version the usual umask permissions (temp dirs/files start owner-only),
    so a registry can be served or copied by other users."""
    umask = _current_umask()
    os.chmod(directory, 0o777 & ~umask)
    for item in directory.iterdir():
        os.chmod(item, 0o666 & ~umask)


def _current_umask() -> int:
    """The process umask without the racy set-and-restore dance (Linux exposes it in /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _checked(name: str, version: str | None = None) -> None:
    try:
        check_name(name)
        if version is not None:
            parse_version(version)
    except EdgeError as exc:
        raise RegistryError(str(exc)) from exc


class Registry:
    """Versions of models under one directory, published atomically and never overwritten."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- reading ----------------------------------------------------------------
    def names(self) -> list[str]:
        """Model names that have at least one version."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".") and self.versions(p.name)
        )

    def versions(self, name: str) -> list[str]:
        """Registered versions of ``name``, oldest first (numeric order: '10' after '9')."""
        _checked(name)
        return list_versions(self.root / name)

    def latest(self, name: str) -> str | None:
        """The highest registered version of ``name``, or None."""
        versions = self.versions(name)
        return versions[-1] if versions else None

    def next_version(self, name: str) -> str:
        """The next integer version: one past the major part of the latest, or ``"1"``."""
        latest = self.latest(name)
        return str(parse_version(latest)[0] + 1) if latest else "1"

    def path(self, name: str, version: str) -> Path:
        """The directory of a registered version; RegistryError if it is not registered."""
        _checked(name, version)
        d = self.root / name / version
        if not (d / MANIFEST_FILE).is_file():
            known = self.versions(name)
            raise RegistryError(
                f"model {name!r} has no version {version!r} in {self.root} (versions: {known or 'none'})"
            )
        return d

    def manifest(self, name: str, version: str) -> Manifest:
        """The manifest of a registered version."""
        try:
            return Manifest.load(self.path(name, version) / MANIFEST_FILE)
        except EdgeError as exc:
            raise RegistryError(str(exc)) from exc

    def eval_dir(self, name: str, version: str) -> Path:
        """Where a training report for ``name`` ``version`` goes (beside, never inside, the version dir)."""
        _checked(name, version)
        return self.root / name / f"{version}{EVAL_SUFFIX}"

    def require_free(self, name: str, version: str) -> None:
        """Raise RegistryError if ``version`` is taken (checked before an expensive training run)."""
        _checked(name, version)
        if (self.root / name / version).exists():
            raise RegistryError(
                f"{name} version {version} already exists in {self.root}; pick another version "
                f"(next free: {self.next_version(name)})"
            )

    # -- writing ------------------------------------------------------------
    def _locked(self) -> AbstractContextManager[None]:
        return locked(self.root / ".lock")

    def register(
        self,
        tflite_path: str | Path,
        name: str,
        version: str,
        golden: str | Path | Mapping[str, np.ndarray] | None = None,
        **manifest_fields: Any,
    ) -> Manifest:
        """Publish ``tflite_path`` as ``name`` ``version`` and return its manifest.

        ``golden`` is a ``golden.npz`` path (or its arrays) checked against the model; without
        it golden samples come from running the model (on ``golden_inputs=`` if given).
        ``manifest_fields`` go to ``build_version_dir``: labels, preprocessing, metrics,
        rename_inputs, rename_outputs, extra, golden_inputs; plus ``validation`` (golden
        tolerances ``{"atol", "rtol", "quant_steps"}``, which build_version_dir cannot set).
        The staged version is verified (sha256, specs, golden samples) before it is published.
        """
        _checked(name, version)
        validation = manifest_fields.pop("validation", None)
        src = Path(tflite_path)
        if not src.is_file():
            raise RegistryError(f"model file not found: {src}")
        samples = None
        if golden is not None:
            try:
                samples = load_golden(golden) if isinstance(golden, (str, Path)) else dict(golden)
            except EdgeError as exc:
                raise RegistryError(str(exc)) from exc
        parent = self.root / name
        fresh = not parent.exists()
        parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
        try:
            try:
                manifest = build_version_dir(src, work, name=name, version=version, golden=samples, **manifest_fields)
                if validation is not None:
                    manifest.validation = dict(validation)
                    atomic_write_bytes(work / MANIFEST_FILE, manifest.to_json().encode())
                verify_version_dir(work)
            except EdgeError as exc:
                raise RegistryError(f"cannot register {src.name} as {name} {version}: {exc}") from exc
            except TypeError as exc:  # an unknown manifest field
                raise RegistryError(f"cannot register {name} {version}: {exc}") from exc
            _publishable(work)
            fsync_tree(work)
            with self._locked():
                target = parent / version
                if target.exists():
                    return self._same_or_refuse(target, work, name, version)
                os.rename(work, target)
                fsync_dir(parent)
            return manifest
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if fresh:  # a failed first registration leaves no empty model directory behind
                try:
                    parent.rmdir()
                except OSError:
                    pass  # not empty: the version was published (or someone else wrote there)

    @staticmethod
    def _same_or_refuse(target: Path, staged: Path, name: str, version: str) -> Manifest:
        """Return the existing manifest when ``staged`` is the same version again, else refuse."""
        try:
            old = Manifest.load(target / MANIFEST_FILE)
        except EdgeError as exc:
            raise RegistryError(f"{name} version {version} exists but is unreadable: {exc}") from exc
        new = Manifest.load(staged / MANIFEST_FILE)
        what = []
        if sha256_file(target / MODEL_FILE) != new.sha256 or old.sha256 != new.sha256:
            what.append(f"model sha256 {old.sha256[:12]}… != {new.sha256[:12]}…")
        a, b = old.to_dict(), new.to_dict()
        a.pop("created_at"), b.pop("created_at")
        fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in ("sha256", "size"))
        if fields:
            what.append(f"manifest fields {fields}")
        if (target / GOLDEN_FILE).read_bytes() != (staged / GOLDEN_FILE).read_bytes():
            what.append("golden samples")
        if what:
            raise RegistryError(
                f"{name} version {version} already exists with different content ({'; '.join(what)}); "
                "versions are immutable, register a new version"
            )
        return old
