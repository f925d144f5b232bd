"""The frozen (PyInstaller) agent for tests: built once per build digest, shared by sessions and xdist workers.

``frozen_build()`` runs ``tools/package.py`` into ``build/frozen/<digest>/`` (``$EDGEFLEET_FROZEN_CACHE``
overrides the parent) under a file lock, so the three xdist workers of a run, and every later run
with the same sources and dependency versions (``source_digest``), reuse one build. ``FrozenAgent`` runs ``<folder>/edge-agent run`` on a free
port with the environment a unit would give it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from edge_agent.fsutil import locked
from tests.support.env import REPO, free_port
from tests.support.telemetry import call

CACHE = Path(os.environ.get("EDGEFLEET_FROZEN_CACHE") or REPO / "build" / "frozen")
DONE = "build.json"


def package_tool() -> ModuleType:
    """``tools/package.py`` as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("edgefleet_package_tool", REPO / "tools" / "package.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cannot_build() -> str | None:
    """Why PyInstaller cannot run here, or None."""
    if importlib.util.find_spec("PyInstaller") is None:
        return "PyInstaller is not installed (pip install .[test])"
    if os.name != "posix":
        return "the frozen agent is built and tested on POSIX only"
    return None


def frozen_build() -> tuple[Path, dict[str, Any]]:
    """The one-folder build for the current sources, and its build record (digest, seconds)."""
    tool = package_tool()
    digest = tool.source_digest()[:16]
    out = CACHE / digest
    with locked(CACHE / ".lock"):
        record = out / DONE
        if not record.is_file():
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.monotonic()
            tool.build(out / "dist", out / "work")
            shutil.rmtree(out / "work", ignore_errors=True)
            record.write_text(json.dumps({"digest": digest, "build_s": round(time.monotonic() - t0, 1)}))
            for old in CACHE.iterdir():  # builds of older sources, unused for a day
                if old.is_dir() and old != out and time.time() - old.stat().st_mtime > 86400:
                    shutil.rmtree(old, ignore_errors=True)
    return out / "dist" / tool.NAME, json.loads(record.read_text())


def agent_env(**extra: str) -> dict[str, str]:
    """The test's environment without any ``EDGEFLEET_*`` or systemd variables, plus ``extra``."""
    drop = ("EDGEFLEET_", "NOTIFY_SOCKET", "WATCHDOG_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


class FrozenAgent:
    """``[prefix] <binary> run`` on a free port over ``data_dir``; ``wait_ready`` polls ``/v2/health/ready``."""

    def __init__(
        self, binary: Path, data_dir: Path, *, prefix: tuple[str, ...] = (), log: Path | None = None, **env: str
    ) -> None:
        self.binary, self.data_dir, self.port, self.prefix = binary, data_dir, free_port(), prefix
        self.env = agent_env(**env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = log or data_dir.parent / f"{data_dir.name}-agent.log"

    def start(self, *args: str) -> FrozenAgent:
        listen = ["--listen", f"127.0.0.1:{self.port}"]
        cmd = [*self.prefix, str(self.binary), "run", "--data-dir", str(self.data_dir), *listen, *args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 60) -> float:
        """Seconds from now until the agent answers ready (fails with the agent's log if it exits)."""
        assert self.proc is not None
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if self.request("GET", "/v2/health/ready")[0] == 200:
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"agent not ready after {timeout} s: {self.log.read_text()[-3000:]}")

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            return call(conn, method, path, body)
        finally:
            conn.close()

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def digits_body(seed: int = 0) -> dict[str, Any]:
    """One V2 infer request for the shipped digits model."""
    import numpy as np

    x = np.random.default_rng(seed).random(64).astype(np.float32) * 16
    return {"inputs": [{"name": "pixels", "shape": [1, 8, 8, 1], "datatype": "FP32", "data": x.tolist()}]}


# What PyInstaller's multiprocessing hook runs inside a frozen binary started as a forkserver:
# ``edge-agent <interpreter flags> -c "from multiprocessing.forkserver import main..."``. The flags
# must be the frozen interpreter's own (``subprocess._args_from_interpreter_flags()`` there).
FORKSERVER_PREFIX = "from multiprocessing.forkserver import main"
FROZEN_FLAGS = ("-B", "-S", "-I")


def run_in_frozen(binary: Path, fn: Any, *args: Any, timeout_s: float = 300) -> Any:
    """``fn(*args)`` inside the frozen interpreter of ``binary``; its JSON-able result.

    ``fn`` is sent as source (``inspect.getsource``), so it imports what it needs in its body, from
    what the frozen build bundles. This is how a bench or a test reaches code paths of the frozen
    agent that no CLI command exposes (the diversion exists because ``__main__`` calls
    ``multiprocessing.freeze_support()``).
    """
    import inspect
    import textwrap

    code = (
        f"{FORKSERVER_PREFIX}; import json, sys; ns = {{}}; exec(sys.argv[-2], ns); "
        f"print('RESULT ' + json.dumps(ns[{fn.__name__!r}](*json.loads(sys.argv[-1]))))"
    )
    source = "from __future__ import annotations\n" + textwrap.dedent(inspect.getsource(fn))
    done = subprocess.run(
        [str(binary), *FROZEN_FLAGS, "-c", code, source, json.dumps(list(args))],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"frozen run failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT ") :])
