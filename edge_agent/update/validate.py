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
only that process, and the report comes back over a pipe; a frozen (PyInstaller) agent has its
own forkserver too. ``isolation="subprocess"`` runs a fresh interpreter instead (``python -m``, or
the frozen binary as ``__validate__``). Both ways of starting a child are ``inference.childproc``'s,
shared with the shadow runner.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from edge_agent.errors import (
    EdgeError,
    FailedError,
    IncompatibleModelError,
    ManifestError,
    SealedModelRejected,
    ValidationError,
)
from edge_agent.inference.childproc import (
    Isolation,
    child_command,
    child_env,
    die_with_parent,
    exit_reason,
    forkserver,
    isolation,
    options_from_json,
    options_to_json,
    release,
    start,
    warm,
)
from edge_agent.inference.runtime import RuntimeOptions, call_times

DEFAULT_RUNS = 30
_ERROR_KINDS: dict[str, type[EdgeError]] = {
    "incompatible": IncompatibleModelError,
    "manifest": ManifestError,
    "sealed": SealedModelRejected,
    "validation": ValidationError,
}
PRELOAD = ("edge_agent.update.validate", "edge_agent.inference.golden")  # what the forkserver imports for the child


def warm_up() -> None:
    """Start the forkserver in the background (idempotent), so the next validation forks at once.

    The agent calls this as a download starts: the server's start (~0.15 s from source, ~0.3 s
    frozen) overlaps the transfer instead of adding to the validation.
    """
    warm(PRELOAD)


def cool_down() -> None:
    """Stop the forkserver once an update has ended, if no child needs it (``childproc.release``)."""
    if release():
        logging.getLogger(__name__).info("validation forkserver stopped until the next update")


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
    ``isolation``: ``forkserver`` (default, frozen or not) or ``subprocess``. ``fleet_key``:
    the private key file a sealed candidate is opened with, by the child, into its memory only.
    """
    key = None if fleet_key is None else {"fleet_key": str(fleet_key)}
    job = _Job(Path(version_dir), runtime_options, timeout_s, runs, stop, key)
    return _judge(_isolated(job, isolation), max_latency_ms)


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
    job = _Job(Path(out_dir), runtime_options, timeout_s, DEFAULT_RUNS, None, build)
    return _judge(_isolated(job, isolation), None)


@dataclass(frozen=True)
class _Job:
    """One isolated validation: what the child loads and how long the parent waits for it."""

    version_dir: Path
    options: RuntimeOptions | None
    timeout_s: float
    runs: int
    stop: threading.Event | None
    build: dict[str, str] | None = None

    def deadline(self) -> float:
        return time.monotonic() + self.timeout_s

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()


def _isolated(job: _Job, mode: Isolation | None) -> dict[str, Any]:
    return _run_forked(job) if isolation(mode) == "forkserver" else _run_subprocess(job)


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
    return ValidationError(f"validation process crashed ({exit_reason(exitcode)})")


def _stopped(version_dir: Path) -> FailedError:
    return FailedError(f"validation of {version_dir} stopped")


def _timed_out(version_dir: Path, timeout_s: float) -> ValidationError:
    return ValidationError(f"validation of {version_dir} did not finish within {timeout_s:g}s (killed)")


# -- forkserver isolation -------------------------------------------------------------
def _forked_child(version_dir: str, options: str, runs: int, build: dict[str, str] | None, conn: Connection) -> None:
    """The forked child: one report over the pipe (a crash sends nothing; the parent sees the signal)."""
    die_with_parent()
    conn.send(report_for(Path(version_dir), options_from_json(options), runs, build))
    conn.close()


def _run_forked(job: _Job) -> dict[str, Any]:
    ctx = forkserver(PRELOAD)
    reader, writer = ctx.Pipe(duplex=False)
    args = (str(job.version_dir), options_to_json(job.options), job.runs, job.build, writer)
    proc = ctx.Process(target=_forked_child, args=args, daemon=True)
    start(proc)
    writer.close()
    deadline = job.deadline()
    report: dict[str, Any] | None = None
    try:
        while report is None and proc.exitcode is None:
            if job.stopped():
                raise _stopped(job.version_dir)
            if time.monotonic() >= deadline:
                raise _timed_out(job.version_dir, job.timeout_s)
            report = _receive(reader, min(0.05, max(0.0, deadline - time.monotonic())), proc)
        if report is None:  # it exited: a report it sent just before is still in the pipe
            report = _receive(reader, 0, proc)
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


def _receive(reader: Connection, wait_s: float, proc: Any) -> dict[str, Any] | None:
    """The child's report if one arrives within ``wait_s``; None otherwise (a dead child: its exit code says how)."""
    if not reader.poll(wait_s):
        return None
    try:
        report: dict[str, Any] = reader.recv()
        return report
    except (EOFError, OSError):
        proc.join(5)
        return None


# -- subprocess isolation ----------------------------------------------------------------
def _run_subprocess(job: _Job) -> dict[str, Any]:
    # A frozen (PyInstaller) agent has no `python -m`: its own binary runs the child instead.
    child = child_command("edge_agent.update.validate", VALIDATE_COMMAND)
    cmd = [*child, str(job.version_dir), "--runs", str(job.runs), "--options", options_to_json(job.options)]
    build = job.build
    if build is not None and "tflite" in build:
        cmd += ["--build-from", build["tflite"], "--name", build["name"], "--version", build["version"]]
    if build is not None and "fleet_key" in build:
        cmd += ["--fleet-key", build["fleet_key"]]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), text=True, start_new_session=True
    )
    deadline = job.deadline()
    while True:
        if job.stopped():
            proc.kill()
            proc.communicate()
            raise _stopped(job.version_dir)
        try:
            out, err = proc.communicate(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
            break
        except subprocess.TimeoutExpired:  # retrying communicate() loses no output
            if time.monotonic() >= deadline:
                proc.kill()
                proc.communicate()
                raise _timed_out(job.version_dir, job.timeout_s) from None
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
    started = time.perf_counter()
    manifest = verify_version_dir(version_dir, run_golden=False)
    source = model_source(version_dir, manifest, load_fleet_key(fleet_key) if fleet_key else None)
    check_specs(manifest, *inspect_model(source, options.backend))
    model = LoadedModel(source, manifest, options)
    golden = check_golden(model, load_golden(version_dir / manifest.golden)) if manifest.golden else {}
    sample = model.example_inputs(batch=1, seed=3)
    for _ in range(3):
        model.predict(sample)
    stats = latency_stats(call_times(lambda: model.predict(sample), runs))
    ident = {"name": manifest.name, "version": manifest.version, "delegate": model.delegate, "pid": os.getpid()}
    timing = {"p50_ms": stats["p50_ms"], "p95_ms": stats["p95_ms"], "runs": stats["n"]}
    timing["check_ms"] = round((time.perf_counter() - started) * 1e3, 3)  # the model's own work, for overhead figures
    return {"ok": True, **ident, **timing, "golden": golden}


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
    die_with_parent()
    build = {} if args.build_from is None else {"tflite": args.build_from, "name": args.name, "version": args.version}
    if args.fleet_key:
        build["fleet_key"] = args.fleet_key
    report = report_for(args.version_dir, options_from_json(args.options), args.runs, build)
    print(json.dumps(report, sort_keys=True), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
