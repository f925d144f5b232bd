"""The Debian package on this machine, for tests: built by ``tools/deb.py``, installed with ``dpkg -i``.

Package tests install into this machine's ``/opt``, ``/etc`` and ``/var/lib``, so they need root and
dpkg and run one at a time per machine (``package_machine``: a file lock, and a purge after).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edge_agent.fsutil import locked
from edge_agent.update.agent.slots import BINARY, write_manifest
from tests.support.env import PYTHON, REPO

AGENT = Path("/opt/edgefleet/agent")
STATE = Path("/var/lib/edgefleet")
CONF = Path("/etc/edgefleet/agent.toml")
UNIT = Path("/lib/systemd/system/edge-agent.service")
PKG = "edgefleet-agent"
LOCK = "/tmp/edgefleet-deb-test.lock"


def dpkg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dpkg", *args], capture_output=True, text=True, timeout=300)


def installed() -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", PKG], capture_output=True, text=True)
    return "installed" in out.stdout or "config-files" in out.stdout


@contextmanager
def package_machine() -> Iterator[None]:
    """Hold this machine for a package test (skip without root or dpkg); purge the package after."""
    if os.geteuid() != 0 or shutil.which("dpkg-deb") is None:
        pytest.skip("the package test needs root and dpkg")
    with locked(LOCK):
        if STATE.exists() and not installed():
            pytest.skip(f"{STATE} exists and is not the package's: the test would purge it")
        try:
            yield
        finally:
            if installed():
                dpkg("--purge", PKG)


def build_deb(folder: Path, out_dir: Path, level: int = 1) -> Path:
    """``make deb`` of the one-folder build ``folder`` (``tools/deb.py``); returns the .deb."""
    done = subprocess.run([PYTHON, str(REPO / "tools" / "deb.py"), "--folder", str(folder), "--out", str(out_dir),
                           "-z", str(level)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


def stand_in(dest: Path, version: str) -> Path:
    """A one-folder build without the frozen agent: a script ``edge-agent``, one library, the manifest.

    For tests of the package's slot rules, where the payload never runs (the real build: test_deb.py).
    """
    (dest / "_internal").mkdir(parents=True)
    (dest / BINARY).write_text(f"#!/bin/sh\necho 'stand-in agent {version}'\n")
    (dest / BINARY).chmod(0o755)
    (dest / "_internal" / "libagent.so").write_bytes(b"stand-in library " + version.encode())
    write_manifest(dest, version)
    return dest
