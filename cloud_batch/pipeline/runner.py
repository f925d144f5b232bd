"""Run the steps in order: resume at the first unfinished one, one run per model at a time.

* **Markers**: a step that returns writes ``<step>/_done.json`` atomically (temp + fsync + replace),
  after its outputs. A rerun for the same ``as-of`` skips every step with a marker, so a run killed
  at any moment resumes at the step it was in, which starts over (its outputs are rewritten).
* **Lock**: ``<runs_dir>/<model>/.lock``, a non-blocking ``flock`` held for the whole run (the
  kernel drops it when the process dies, so a kill -9 never leaves a stale lock).
* **Failure**: any exception in a step (a bug's TypeError too, named with its type) is that
  step's failure: ``_failed.json`` records the cause, earlier steps keep their outputs, and
  ``PipelineError`` names the step and the cause (the CLI's exit 2, never 1 "a gate failed").
* A dry run never marks ``register``/``release`` done, so a later real run does them.
* Markers record the config's fingerprint: a step resumed under other settings keeps its outputs,
  and its line (and the summary) says so.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape

from cloud_batch.errors import CloudError, PipelineError
from cloud_batch.pipeline import gates, report, steps_data, steps_model, steps_release
from cloud_batch.pipeline.context import DONE, FAILED, STEP_NAMES, Run, StepResult
from cloud_batch.progress import Reporter
from edge_agent.errors import EdgeError
from edge_agent.fsutil import atomic_write_json

Step = Callable[[Run, Path], StepResult]

STEPS: dict[str, Step] = {
    "ingest": steps_data.ingest,
    "dataset": steps_data.build_dataset,
    "features": steps_data.features,
    "train": steps_model.train,
    "quantize": steps_model.quantize,
    "calibrate": steps_model.calibrate_step,
    "gate": gates.gate,
    "register": steps_release.register,
    "release": steps_release.release,
    "report": report.report,
}
assert tuple(STEPS) == STEP_NAMES
NOT_DONE_WHEN_DRY = ("register", "release", "report")


@dataclass
class RunOutcome:
    """What one ``run_pipeline`` did: per step, ran/resumed/skipped and its line; gate outcome; release id."""

    run_dir: Path
    steps: list[dict[str, Any]] = field(default_factory=list)
    gates_passed: bool | None = None
    release_id: str | None = None

    @property
    def report(self) -> Path:
        return self.run_dir / "report" / steps_release.REPORT_FILE

    def summary(self) -> str:
        lines = [f"{s['step']:<10} {s['state']:<8} {s['line']}" for s in self.steps]
        verdict = "gates passed" if self.gates_passed else "a gate failed: nothing released"
        if self.release_id:
            verdict += f"; release {self.release_id}"
        return "\n".join([*lines, f"{verdict}; report {self.report}"])


@contextmanager
def run_lock(path: Path) -> Iterator[None]:
    """Hold ``path`` exclusively or raise PipelineError at once (another run of this model is going on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(f"another pipeline run holds {path}; one run per model at a time") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _done(run: Run, step: str) -> dict[str, Any] | None:
    marker = run.marker(step)
    if marker is None or (marker.get("dry_run") and not run.dry_run and step in NOT_DONE_WHEN_DRY):
        return None
    return marker


def run_pipeline(run: Run, *, stop_after: str | None = None) -> RunOutcome:
    """Run (or resume) every step of ``run``; PipelineError names a failed step and its cause."""
    if stop_after is not None and stop_after not in STEPS:
        raise PipelineError(f"unknown step {stop_after!r}; steps: {', '.join(STEPS)}")
    outcome = RunOutcome(run.dir)
    reporter: Reporter = run.reporter
    with run_lock(run.config.runs_dir / run.config.model / ".lock"):
        for i, (name, fn) in enumerate(STEPS.items(), 1):
            marker = _done(run, name)
            if marker is not None:
                state, line = "done", str(marker.get("line", "")) + _config_note(run, marker)
                reporter.status(escape(f"[{i}/{len(STEPS)}] {name}: already done ({line})"))
            else:
                state, line = "ran", _run_step(run, name, fn, f"[{i}/{len(STEPS)}]")
                marker = run.marker(name) or {}
            if marker.get("skipped"):
                state = "skipped"
            outcome.steps.append({"step": name, "state": state, "line": line, "seconds": marker.get("seconds")})
            if name == "gate":
                outcome.gates_passed = bool(marker.get("data", {}).get("passed"))
            if name == "release":
                outcome.release_id = marker.get("data", {}).get("release_id")
            if name == stop_after:
                break
    return outcome


def _config_note(run: Run, marker: dict[str, Any]) -> str:
    """A warning for a step finished under other settings (the rerun keeps its outputs)."""
    then = marker.get("config")
    if then is None or then == run.config.fingerprint():
        return ""
    return f" [WARNING: done under another config ({then}); rerun under a new --as-of to redo it]"


def _run_step(run: Run, name: str, fn: Step, counter: str) -> str:
    out = run.step_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    (out / FAILED).unlink(missing_ok=True)
    run.reporter.status(escape(f"{counter} {name} ..."))
    t0 = time.perf_counter()
    try:
        result = fn(run, out)
    except Exception as exc:  # any failure, a bug included, is this step's: recorded for `status`, exit 2
        cause = str(exc) or type(exc).__name__
        if not isinstance(exc, (CloudError, EdgeError, OSError, ValueError)):
            cause = f"{type(exc).__name__}: {cause}"  # unexpected: say what kind (the traceback is chained)
        atomic_write_json(out / FAILED, {"step": name, "error": cause, "at": time.time()})
        raise PipelineError(f"step {name} failed: {cause}") from exc
    seconds = round(time.perf_counter() - t0, 3)
    marker = {
        "step": name,
        "line": result.line,
        "seconds": seconds,
        "finished_at": time.time(),
        "data": result.data,
        "skipped": result.skipped,
        "dry_run": run.dry_run,
        "config": run.config.fingerprint(),
    }
    atomic_write_json(out / DONE, marker)
    run.reporter.status(escape(f"{counter} {name}: {result.line} ({seconds:.1f} s)"))
    return result.line
