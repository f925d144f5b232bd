"""Validate an update candidate in a child process, so a model that crashes the interpreter cannot take the agent down.

A ``.tflite`` file is a flatbuffer the runtime reads without a verifier: a hostile file can segfault
the process that loads it, so the agent never loads a candidate before ``validate_candidate``'s child

1. checks the manifest, size and sha256, opens a sealed (encrypted) model into the child's memory
   with the fleet key (``SealedModelRejected``: no key, another key, tampered ciphertext), loads the
   model and compares its tensors with the manifest (``IncompatibleModelError`` names e.g. a custom
   op the runtime lacks),
2. re-runs the golden samples (``ValidationError`` with the output and the error),
3. measures the p50 latency of single-sample calls,

and reports once. The parent turns that report, a death by signal or a timeout into
the agent's own errors; the latency budget is judged by the parent.

A fresh interpreter per candidate costs ~100-300 ms of imports before any model work, so by
default the child is forked from a multiprocessing *forkserver* that imported numpy and the TFLite
runtime once (``preload``): each candidate still runs in its own process, a segfault still kills
only that process, and the report comes back over a pipe. A frozen (PyInstaller) agent, or
``isolation="subprocess"``, uses the ``python -m`` child instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from edge_agent.errors import (
    EdgeError,
    FailedError,
    IncompatibleModelError,
    ManifestError,
    SealedModelRejected,
    ValidationError,
)
from edge_agent.inference.runtime import DelegateSpec, RuntimeOptions

DEFAULT_RUNS = 30
_ERROR_KINDS: dict[str, type[EdgeError]] = {
    "incompatible": IncompatibleModelError,
    "manifest": ManifestError,
    "sealed": SealedModelRejected,
    "validation": ValidationError,
}
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])


def options_to_json(options: RuntimeOptions | None) -> str:
    o = options or RuntimeOptions()
    delegates = [{"library": d.library, "options": dict(d.options)} for d in o.delegates]
    return json.dumps({"num_threads": o.num_threads, "delegates": delegates})


def options_from_json(text: str) -> RuntimeOptions:
    raw = json.loads(text)
    delegates = tuple(
        DelegateSpec(str(d["library"]), {str(k): str(v) for k, v in (d.get("options") or {}).items()})
        for d in raw.get("delegates") or []
    )
    # One interpreter: validation measures a single call's latency, as one request sees it.
    return RuntimeOptions(num_threads=raw.get("num_threads"), delegates=delegates, pool_size=1)


Isolation = Literal["forkserver", "subprocess"]


def validate_candidate(
    version_dir: str | Path,
    *,
    max_latency_ms: float | None,
    runtime_options: RuntimeOptions | None = None,
    timeout_s: float = 120,
    runs: int = DEFAULT_RUNS,
    stop: threading.Event | None = None,
    isolation: Isolation | None = None,
    fleet_key: Path | None = None,
) -> dict[str, Any]:
    """Validate ``version_dir`` in a child process; return its report or raise.

    Raises IncompatibleModelError or ManifestError (the model cannot run here), and
    ValidationError (golden samples differ, the child crashed or timed out, or the p50
    latency is above ``max_latency_ms``). The report holds ``name``, ``version``,
    ``p50_ms``, ``golden`` (worst error per output) and ``delegate``. Setting ``stop`` kills
    the child and raises FailedError (the agent is shutting down or the update was aborted).
    ``isolation``: ``forkserver`` (default) or ``subprocess`` (default when frozen). ``fleet_key``:
    the private key file a sealed candidate is opened with, by the child, into its memory only.
    """
    key = None if fleet_key is None else {"fleet_key": str(fleet_key)}
    return _judge(_isolated(Path(version_dir), runtime_options, timeout_s, runs, stop, isolation, key), max_latency_ms)


def build_and_validate(
    tflite: str | Path,
    out_dir: str | Path,
    *,
    name: str,
    version: str,
    runtime_options: RuntimeOptions | None = None,
    timeout_s: float = 120,
    isolation: Isolation | None = None,
) -> dict[str, Any]:
    """For an untrusted bare ``.tflite`` (``edge-agent models install``): build ``out_dir`` and validate it.

    Deriving the manifest and golden samples loads the model, so both happen in the isolated
    child; a model that crashes the runtime raises ValidationError here and this process never
    touched it. Same errors as ``validate_candidate``.
    """
    build = {"tflite": str(Path(tflite).resolve()), "name": name, "version": version}
    return _judge(_isolated(Path(out_dir), runtime_options, timeout_s, DEFAULT_RUNS, None, isolation, build), None)


def _isolated(
    version_dir: Path,
    options: RuntimeOptions | None,
    timeout_s: float,
    runs: int,
    stop: threading.Event | None,
    isolation: Isolation | None,
    build: dict[str, str] | None,
) -> dict[str, Any]:
    mode = isolation or ("subprocess" if getattr(sys, "frozen", False) else "forkserver")
    run = _run_forked if mode == "forkserver" else _run_subprocess
    return run(version_dir, options, timeout_s, runs, stop, build)


def _judge(report: dict[str, Any], max_latency_ms: float | None) -> dict[str, Any]:
    """A child's report → the report, or the agent's own error."""
    if not report.get("ok"):
        cls = _ERROR_KINDS.get(str(report.get("kind")), ValidationError)
        raise cls(str(report.get("reason") or "validation failed"))
    p50 = float(report["p50_ms"])
    if max_latency_ms is not None and p50 > max_latency_ms:
        raise ValidationError(f"p50 {p50:.3f} ms over the release's budget {max_latency_ms:g} ms")
    return report


def _crashed(exitcode: int) -> ValidationError:
    try:
        sig = signal.Signals(-exitcode).name
    except ValueError:
        sig = f"signal {-exitcode}"
    return ValidationError(f"validation process crashed ({sig})")


def _stopped(version_dir: Path) -> FailedError:
    return FailedError(f"validation of {version_dir} stopped")


def _timed_out(version_dir: Path, timeout_s: float) -> ValidationError:
    return ValidationError(f"validation of {version_dir} did not finish within {timeout_s:g}s (killed)")


# -- forkserver isolation -------------------------------------------------------------
_CTX_LOCK = threading.Lock()
_CTX: multiprocessing.context.ForkServerContext | None = None


def _context() -> multiprocessing.context.ForkServerContext:
    """The forkserver context, its server preloaded with numpy and the installed TFLite runtime."""
    global _CTX
    with _CTX_LOCK:
        if _CTX is None:
            ctx = multiprocessing.get_context("forkserver")
            runtimes = [m for m in ("tflite_runtime.interpreter", "ai_edge_litert.interpreter") if _importable(m)]
            ctx.set_forkserver_preload(["edge_agent.update.validate", "edge_agent.inference.golden", *runtimes[:1]])
            _CTX = ctx
        return _CTX


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _forked_child(
    version_dir: str, options: str, runs: int, build: dict[str, str] | None, conn: multiprocessing.connection.Connection
) -> None:
    """The forked child: one report over the pipe (a crash sends nothing; the parent sees the signal)."""
    _die_with_parent()
    conn.send(report_for(Path(version_dir), options_from_json(options), runs, build))
    conn.close()


def _run_forked(
    version_dir: Path,
    options: RuntimeOptions | None,
    timeout_s: float,
    runs: int,
    stop: threading.Event | None,
    build: dict[str, str] | None = None,
) -> dict[str, Any]:
    ctx = _context()
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_forked_child, args=(str(version_dir), options_to_json(options), runs, build, writer), daemon=True
    )
    proc.start()
    writer.close()
    deadline = time.monotonic() + timeout_s
    report: dict[str, Any] | None = None
    try:
        while report is None and proc.exitcode is None:
            if stop is not None and stop.is_set():
                raise _stopped(version_dir)
            if time.monotonic() >= deadline:
                raise _timed_out(version_dir, timeout_s)
            if reader.poll(min(0.05, max(0.0, deadline - time.monotonic()))):
                try:
                    report = reader.recv()
                except (EOFError, OSError):  # died without a report: the exit code says how
                    proc.join(5)
    finally:
        if report is None:
            proc.kill()
        proc.join()
        reader.close()
    exitcode = proc.exitcode or 0
    proc.close()
    if report is not None:
        return report
    if exitcode < 0:
        raise _crashed(exitcode)
    raise ValidationError(f"validation process exited with status {exitcode} without a report")


# -- subprocess isolation ----------------------------------------------------------------
def _run_subprocess(
    version_dir: Path,
    options: RuntimeOptions | None,
    timeout_s: float,
    runs: int,
    stop: threading.Event | None,
    build: dict[str, str] | None = None,
) -> dict[str, Any]:
    # A frozen (PyInstaller) agent has no `python -m`: its own binary runs the child instead.
    child = (
        [sys.executable, VALIDATE_COMMAND]
        if getattr(sys, "frozen", False)
        else [sys.executable, "-m", "edge_agent.update.validate"]
    )
    cmd = [*child, str(version_dir), "--runs", str(runs), "--options", options_to_json(options)]
    if build is not None and "tflite" in build:
        cmd += ["--build-from", build["tflite"], "--name", build["name"], "--version", build["version"]]
    if build is not None and "fleet_key" in build:
        cmd += ["--fleet-key", build["fleet_key"]]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, start_new_session=True
    )
    deadline = time.monotonic() + timeout_s
    while True:
        if stop is not None and stop.is_set():
            proc.kill()
            proc.communicate()
            raise _stopped(version_dir)
        try:
            out, err = proc.communicate(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
            break
        except subprocess.TimeoutExpired:  # retrying communicate() loses no output
            if time.monotonic() >= deadline:
                proc.kill()
                proc.communicate()
                raise _timed_out(version_dir, timeout_s) from None
    if proc.returncode < 0:
        raise _crashed(proc.returncode)
    report = _last_json_line(out)
    if report is None:
        tail = " | ".join(line for line in err.strip().splitlines()[-3:])
        raise ValidationError(f"validation process exited with status {proc.returncode} without a report: {tail}")
    return report


def _last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                return doc
    return None


# -- child side ---------------------------------------------------------------------------
def check(version_dir: Path, options: RuntimeOptions, runs: int, fleet_key: str | None = None) -> dict[str, Any]:
    """Everything the child does (also callable in-process by tools that trust the file)."""
    from edge_agent.inference.bench import latency_stats
    from edge_agent.inference.golden import check_golden, load_golden
    from edge_agent.inference.modelpack import check_specs, verify_version_dir
    from edge_agent.inference.runtime import LoadedModel, inspect_model
    from edge_agent.models.sealed import load_fleet_key, model_source

    # Manifest, size and sha256 first (no interpreter yet), then open (a sealed model: into this
    # process's memory only) and load: tensors against the manifest, golden.
    manifest = verify_version_dir(version_dir, run_golden=False)
    source = model_source(version_dir, manifest, load_fleet_key(fleet_key) if fleet_key else None)
    check_specs(manifest, *inspect_model(source, options.backend))
    model = LoadedModel(source, manifest, options)
    golden = check_golden(model, load_golden(version_dir / manifest.golden)) if manifest.golden else {}
    sample = model.example_inputs(batch=1, seed=3)
    for _ in range(3):
        model.predict(sample)
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        model.predict(sample)
        times.append(time.perf_counter() - t0)
    stats = latency_stats(times)
    return {
        "ok": True,
        "name": manifest.name,
        "version": manifest.version,
        "p50_ms": stats["p50_ms"],
        "p95_ms": stats["p95_ms"],
        "runs": stats["n"],
        "golden": golden,
        "delegate": model.delegate,
        "pid": os.getpid(),
    }


def report_for(
    version_dir: Path, options: RuntimeOptions, runs: int, build: dict[str, str] | None = None
) -> dict[str, Any]:
    """``check`` (after building ``version_dir`` from ``build["tflite"]``), every failure a ``{"ok": False}`` report.

    ``build["fleet_key"]``, when set, is the key file a sealed version is opened with.
    """
    build = build or {}
    try:
        if "tflite" in build:
            from edge_agent.inference.modelpack import build_version_dir

            build_version_dir(build["tflite"], version_dir, name=build["name"], version=build["version"])
        return check(version_dir, options, runs, build.get("fleet_key"))
    except EdgeError as exc:  # the kind the parent turns back into the class; else "validation" (sha256, size, ...)
        kind = next((k for k, cls in _ERROR_KINDS.items() if isinstance(exc, cls)), "validation")
        return {"ok": False, "kind": kind, "reason": str(exc)}
    except Exception as exc:  # the runtime raising something unexpected is still a verdict on the model
        return {"ok": False, "kind": "validation", "reason": f"{type(exc).__name__}: {exc}"}


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the agent dies (kill -9), instead of validating for nobody."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


VALIDATE_COMMAND = "__validate__"  # hidden first argument of a frozen edge-agent binary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_agent.update.validate VERSION_DIR``: print one JSON report line; exit 0 if it passed."""
    parser = argparse.ArgumentParser(
        prog="python -m edge_agent.update.validate",
        description="Validate a model version directory (run by the agent in a child process).",
        epilog="Example: python -m edge_agent.update.validate /var/lib/edgefleet/staging/digits-2",
    )
    parser.add_argument("version_dir", type=Path)
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="timed calls for the p50 latency")
    parser.add_argument("--options", default="{}", help="runtime options as JSON (num_threads, delegates)")
    parser.add_argument("--build-from", metavar="TFLITE", help="first build VERSION_DIR from this bare model")
    parser.add_argument("--name", default="model", help="model name (with --build-from)")
    parser.add_argument("--version", default="1", help="model version (with --build-from)")
    parser.add_argument("--fleet-key", metavar="FILE", help="private fleet key that opens a sealed model")
    args = parser.parse_args(argv)
    _die_with_parent()
    build = {} if args.build_from is None else {"tflite": args.build_from, "name": args.name, "version": args.version}
    if args.fleet_key:
        build["fleet_key"] = args.fleet_key
    report = report_for(args.version_dir, options_from_json(args.options), args.runs, build)
    print(json.dumps(report, sort_keys=True), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
