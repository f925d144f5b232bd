"""Agent slots for self-update tests: variants of the real frozen build, and a supervisor with the unit's restart rules.

The supervisor reproduces ``packaging/edge-agent.service``: before every start it runs
``<root>/good/edge-agent __boot__`` (ExecStartPre; a failure is a failed start), then
``<root>/current/edge-agent run`` (ExecStart); an exit other than 0 restarts after ``RestartSec``
(``Restart=on-failure``, which also covers exit 75), an exit 0 stops it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path

from edge_agent.update.agent.slots import SUMS_FILE, VERSION_FILE, write_manifest
from tests.support.frozen import agent_env
from tests.support.telemetry import call

RESTART_SEC = 0.2


def variant(build: Path, dest: Path, version: str, drop: tuple[str, ...] = ()) -> Path:
    """A copy of ``build`` (hard links: the real binary) with another VERSION and without ``drop``, re-manifested."""
    shutil.copytree(build, dest, symlinks=True, copy_function=os.link)
    for rel in (VERSION_FILE, SUMS_FILE, *drop):
        (dest / rel).unlink()  # unlink first: the build's own files are hard links
    write_manifest(dest, version)
    return dest


def tar_of(folder: Path, out: Path) -> Path:
    """The agent artifact: a tar whose top folder is ``edge-agent/``."""
    with tarfile.open(out, "w") as tar:
        tar.add(folder, arcname="edge-agent")
    return out


def install_root(build: Path, root: Path) -> Path:
    """``root/slots/a`` = the build, ``current`` and ``good`` → ``slots/a``, as the .deb installs it."""
    (root / "slots").mkdir(parents=True)
    shutil.copytree(build, root / "slots" / "a", symlinks=True, copy_function=os.link)
    os.symlink("slots/a", root / "current")
    os.symlink("slots/a", root / "good")
    return root


class Supervisor:
    """Starts and restarts the agent of ``root`` like systemd would, in a thread; records every exit code."""

    def __init__(self, root: Path, data_dir: Path, port: int, log: Path, **env: str) -> None:
        self.root, self.data_dir, self.port, self.log = root, data_dir, port, log
        self.env = agent_env(EDGEFLEET_DATA_DIR=str(data_dir), **env)
        self.exits: list[int] = []
        self.boots: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stopping.is_set():
            boot = subprocess.run([str(self.root / "good" / "edge-agent"), "__boot__"], env=self.env,
                                  capture_output=True, text=True, timeout=60)  # fmt: skip
            self.boots.append(boot.stdout.strip() or boot.stderr.strip())
            if boot.returncode == 0:
                cmd = [str(self.root / "current" / "edge-agent"), "run", "--listen", f"127.0.0.1:{self.port}"]
                with open(self.log, "ab") as log:
                    self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
                code = self.proc.wait()
                self.exits.append(code)
                if code == 0:
                    return
            time.sleep(RESTART_SEC)

    def status(self) -> dict[str, object] | None:
        """``/agent/status`` of whatever agent runs now, or None while none answers."""
        import http.client

        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                code, body = call(conn, "GET", "/agent/status")
            finally:
                conn.close()
        except (OSError, ValueError):
            return None
        return body if code == 200 else None

    def wait(self, what: str, pred: object, timeout: float = 120) -> dict[str, object]:
        """Poll ``/agent/status`` until ``pred(status)``; fail with the exits, boots and the log's tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if st is not None and pred(st):  # type: ignore[operator]
                return st
            time.sleep(0.1)
        raise AssertionError(f"{what}: exits {self.exits}, boots {self.boots}\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self._stopping.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self._thread.join(60)
