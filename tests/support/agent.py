"""A real ``edge-agent run`` process for tests: start it, wait for readiness, talk JSON over TCP or UDS, stop it."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from tests.support.env import MODELS

BIN = Path(sys.executable).parent


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection over a Unix domain socket at ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def request(conn: http.client.HTTPConnection, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """Send ``body`` as JSON; return (status, decoded JSON body or {})."""
    conn.request(
        method, path, body=json.dumps(body) if body is not None else None, headers={"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, json.loads(data) if data else {}


def start_agent(
    data_dir: Path, listen: str, models_dir: Path | None = MODELS, settings: Mapping[str, str] | None = None
) -> subprocess.Popen:
    """``edge-agent run`` with no inherited EDGEFLEET_* settings but ``settings``, shipping ``models_dir`` (None: none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")} | dict(settings or {})
    env["EDGEFLEET_MODELS_DIR"] = str(models_dir) if models_dir else ""
    env["EDGEFLEET_WATCH_INTERVAL_S"] = "0.2"
    env["EDGEFLEET_RUNTIME__MAX_BATCH"] = "20000"  # the drain test's slow request is ~18k digits in one batch
    return subprocess.Popen(
        [str(BIN / "edge-agent"), "run", "--data-dir", str(data_dir), "--listen", listen],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(connect: Callable[[], http.client.HTTPConnection], proc: subprocess.Popen, timeout: float = 60) -> None:
    """Poll /v2/health/ready until 200; fail with the agent's stderr if it exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            if request(connect(), "GET", "/v2/health/ready")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("agent never became ready")


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM the agent and return its exit code."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)
