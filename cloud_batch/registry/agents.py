"""Agent builds in the registry: ``DIR/edge-agent/<version>/{edge-agent.tar.gz, VERSION}``.

``register_agent`` takes a one-folder build (``make package``'s ``dist/edge-agent/``), checks
that its ``SHA256SUMS`` matches every file and that its ``VERSION`` is the version being
registered, and stores the tar of the folder (top folder ``edge-agent/``, gzip) beside its
``VERSION``: the two plain files ``cloud-batch release edge-agent --kind agent`` packs, signs and
chunks like a model version. Versions are immutable (built in a hidden temp dir, fsynced, renamed).
These directories hold no ``manifest.json``, so they never show up as models.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from pathlib import Path

from cloud_batch.errors import InputError, RegistryError
from edge_agent.errors import EdgeError
from edge_agent.fsutil import fsync_dir, fsync_tree, locked
from edge_agent.update.admission import AGENT_RELEASE_NAME
from edge_agent.update.agent.installer import ARCHIVE
from edge_agent.update.agent.slots import BINARY, VERSION_FILE, folder_version, verify_manifest
from edge_agent.wire.names import parse_version


def check_agent_release(name: str, encrypt: bool) -> None:
    """An agent release is named ``edge-agent`` and is not sealed (models are; the agent is code)."""
    if name != AGENT_RELEASE_NAME:
        raise InputError(f"an agent release is named {AGENT_RELEASE_NAME!r}, not {name!r}")
    if encrypt:
        raise InputError("--encrypt seals models; an agent build is released signed but not encrypted")


def agent_dir(registry_dir: str | Path, version: str) -> Path:
    """The registered build ``version``; RegistryError if it is not registered."""
    try:
        parse_version(version)
    except EdgeError as exc:
        raise InputError(str(exc)) from exc
    path = Path(registry_dir) / AGENT_RELEASE_NAME / version
    if not (path / ARCHIVE).is_file() or not (path / VERSION_FILE).is_file():
        raise RegistryError(f"agent {version} is not registered in {registry_dir} (cloud-batch agent register)")
    return path


def register_agent(registry_dir: str | Path, dist_dir: str | Path, version: str) -> Path:
    """Store the one-folder build ``dist_dir`` as agent ``version``; returns its registry directory."""
    dist, root = Path(dist_dir), Path(registry_dir)
    if not (dist / BINARY).is_file():
        raise InputError(f"{dist} is not a one-folder agent build (no {BINARY} in it; run `make package`)")
    try:
        parse_version(version)
        built = folder_version(dist)
    except EdgeError as exc:
        raise InputError(str(exc)) from exc
    if built != version:
        raise InputError(f"{dist}/VERSION says {built}, not {version}")
    bad = verify_manifest(dist)
    if bad:
        raise InputError(f"{dist} does not match its SHA256SUMS: {', '.join(bad[:5])}")
    target = root / AGENT_RELEASE_NAME / version
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(root / ".lock"):
        if target.exists():
            raise RegistryError(f"agent {version} is already registered in {root}: versions are immutable")
        staged = Path(tempfile.mkdtemp(prefix=".tmp-agent-", dir=target.parent))
        try:
            with tarfile.open(staged / ARCHIVE, "w:gz", compresslevel=1) as tar:
                tar.add(dist, arcname=BINARY)
            shutil.copy(dist / VERSION_FILE, staged / VERSION_FILE)
            staged.chmod(0o755)
            fsync_tree(staged)
            staged.rename(target)
            fsync_dir(target.parent)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    return target
