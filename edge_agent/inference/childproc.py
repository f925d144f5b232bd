"""Child processes that run models apart from the agent: one forkserver, one frozen-binary fallback.

Two jobs run a model outside the agent's process: validating a candidate that might crash the
runtime (``update.validate``) and running a shadow candidate on copies of live traffic without
taking the agent's GIL (``models.shadow``). Both start their child the same way:

- by default it is forked from a multiprocessing *forkserver* that imported numpy and the
  installed TFLite runtime once (``forkserver``): no ~100-300 ms of imports per child, yet each
  child is its own process (a segfault kills only it). A frozen (PyInstaller) agent has one too:
  its binary, re-run as multiprocessing asks, serves as the forkserver (``edge_agent.__main__``
  calls ``multiprocessing.freeze_support()``, which PyInstaller's runtime hook diverts);
- ``isolation="subprocess"`` runs a fresh interpreter per child: ``python -m module``, or a
  frozen binary with a hidden first argument (``child_command``).

``Child`` is a started child with one duplex ``Connection`` in either mode (a socketpair whose
child end is passed by descriptor to a subprocess), for a child that lives as long as a job.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # not imported at run time: a child that runs no model (the chunk sink) loads no numpy
    from edge_agent.inference.runtime import RuntimeOptions

Isolation = Literal["forkserver", "subprocess"]
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_LOCK = threading.Lock()
_STARTS = threading.Lock()  # held while a forkserver child starts and while ``release`` checks and stops
_CTX: multiprocessing.context.ForkServerContext | None = None
_PRELOAD: list[str] = []


def options_to_json(options: RuntimeOptions | None) -> str:
    """The runtime options a child is given (num_threads, delegates; the backend seam stays in this process)."""
    from edge_agent.inference.runtime import RuntimeOptions

    o = options or RuntimeOptions()
    delegates = [{"library": d.library, "options": dict(d.options)} for d in o.delegates]
    return json.dumps({"num_threads": o.num_threads, "delegates": delegates})


def options_from_json(text: str) -> RuntimeOptions:
    """A child's runtime options from ``options_to_json``: one interpreter."""
    from edge_agent.inference.runtime import DelegateSpec, RuntimeOptions

    raw = json.loads(text)
    delegates = tuple(
        DelegateSpec(str(d["library"]), {str(k): str(v) for k, v in (d.get("options") or {}).items()})
        for d in raw.get("delegates") or []
    )
    # One interpreter: a child times single calls, as one request sees them (validation, shadow).
    return RuntimeOptions(num_threads=raw.get("num_threads"), delegates=delegates, pool_size=1)


def frozen() -> bool:
    """A PyInstaller-built agent (no ``python -m``)."""
    return bool(getattr(sys, "frozen", False))


def isolation(requested: Isolation | None) -> Isolation:
    """The mode a child starts in: ``requested``, else ``forkserver`` (frozen or not)."""
    return requested or "forkserver"


def forkserver(preload: Sequence[str] = ()) -> multiprocessing.context.ForkServerContext:
    """The forkserver context; its server (started by the first child) imports numpy, the runtime and ``preload``.

    Callers name the modules their children need; the server preloads all those named before it starts.
    """
    global _CTX
    with _LOCK:
        if _CTX is None:
            from edge_agent.inference.interpreter import runtime_preload  # (numpy: not for a child without models)

            _CTX = multiprocessing.get_context("forkserver")
            _PRELOAD.extend(["numpy", "edge_agent.inference.runtime", *runtime_preload()])
        for module in preload:
            if module not in _PRELOAD:
                _PRELOAD.append(module)
        _CTX.set_forkserver_preload(list(_PRELOAD))
        return _CTX


def warm(preload: Sequence[str] = ()) -> None:
    """Start the forkserver on a background thread unless it runs; a child started later waits for it, no more."""
    from multiprocessing import forkserver as server

    forkserver(preload)
    threading.Thread(target=server.ensure_running, name="edgefleet-forkserver-start", daemon=True).start()


def start(proc: multiprocessing.process.BaseProcess) -> None:
    """``proc.start()`` for a forkserver child: never while ``release`` is stopping the server."""
    with _STARTS:
        proc.start()


def release() -> bool:
    """Stop the forkserver and multiprocessing's resource tracker if no child of this process is alive.

    Together they hold ~36 MB beside a frozen agent (docs/deploy.md, "Sizing"); the next child, or
    ``warm``, starts them again. A live child keeps them running: a forked child reports its exit
    through the server. This uses multiprocessing's ``_stop()`` methods (Python 3.10-3.13); where
    they are missing nothing is stopped. Returns whether they were stopped.
    """
    from multiprocessing import forkserver as server
    from multiprocessing import resource_tracker as tracker

    stops = [
        getattr(getattr(m, name, None), "_stop", None)
        for m, name in ((server, "_forkserver"), (tracker, "_resource_tracker"))
    ]
    with _STARTS:
        if _CTX is None or multiprocessing.active_children() or not all(map(callable, stops)):
            return False
        for stop in stops:
            stop()  # type: ignore[misc]
    return True


def child_command(module: str, frozen_command: str) -> list[str]:
    """``python -m module``, or the frozen binary with its hidden ``frozen_command`` (see ``cli.main``)."""
    return [sys.executable, frozen_command] if frozen() else [sys.executable, "-m", module]


def child_env() -> dict[str, str]:
    """The environment of a ``child_command``: this package importable, TensorFlow's logging quiet."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def exit_reason(exitcode: int) -> str:
    """``SIGSEGV`` for a death by signal (a negative exit code), else ``status N``."""
    if exitcode >= 0:
        return f"status {exitcode}"
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def die_with_parent() -> None:
    """Linux: get SIGKILL when the parent dies (kill -9), instead of working for nobody."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def lower_priority(nice: int) -> None:
    """This process ``nice`` steps below the agent; a refusal (a seccomp filter) leaves it where it is."""
    try:
        os.nice(nice)
    except OSError:
        pass


class Child:
    """A started child and its end of one duplex ``Connection`` (``conn``); ``exitcode`` None while it runs."""

    def __init__(
        self,
        target: Callable[[Connection], None],
        module: str,
        frozen_command: str,
        mode: Isolation | None = None,
        preload: Sequence[str] = (),
    ) -> None:
        """Forkserver: ``target(conn)`` runs in the child. Subprocess: ``child_command(...) --fd N`` does."""
        self.mode = isolation(mode)
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        if self.mode == "forkserver":
            ctx = forkserver(preload)
            self.conn, theirs = ctx.Pipe(duplex=True)
            self._proc = ctx.Process(target=target, args=(theirs,), daemon=True)
            start(self._proc)
            theirs.close()
        else:
            mine, child = socket.socketpair()
            cmd = [*child_command(module, frozen_command), "--fd", str(child.fileno())]
            self._popen = subprocess.Popen(
                cmd, pass_fds=(child.fileno(),), env=child_env(), stdin=subprocess.DEVNULL, start_new_session=True
            )
            child.close()
            self.conn = Connection(mine.detach())
        self.pid = self._proc.pid if self._proc is not None else self._popen.pid if self._popen else None

    @property
    def exitcode(self) -> int | None:
        if self._proc is not None:
            return self._proc.exitcode
        return self._popen.poll() if self._popen is not None else None

    def kill(self) -> None:
        """SIGKILL the child (a parent blocked writing to it then gets an error instead of waiting)."""
        if self._proc is not None and self._proc.exitcode is None:
            self._proc.kill()
        elif self._popen is not None and self._popen.poll() is None:
            self._popen.kill()

    def stop(self, timeout_s: float) -> None:
        """Close the connection (the child's cue to exit), wait ``timeout_s``, then kill it."""
        self.conn.close()
        if self._proc is not None:
            self._proc.join(timeout_s)
            if self._proc.exitcode is None:
                self._proc.kill()
                self._proc.join()
        elif self._popen is not None:
            try:
                self._popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait()


def connection_from_fd(fd: int) -> Connection:
    """A subprocess child's end of its ``Child.conn`` (the descriptor passed with ``--fd``)."""
    return Connection(fd)


def fd_main(argv: Sequence[str] | None, module: str, description: str, serve: Callable[[Connection], None]) -> int:
    """A subprocess child's ``main``: ``python -m module --fd N`` serves the inherited connection, dying with the agent."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}", description=description, epilog=f"Example: python -m {module} --fd 5"
    )
    parser.add_argument("--fd", type=int, required=True, help="the connection's descriptor, inherited from the agent")
    args = parser.parse_args(argv)
    die_with_parent()
    serve(connection_from_fd(args.fd))
    return 0
