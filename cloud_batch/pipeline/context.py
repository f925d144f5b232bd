"""One run of the pipeline: its directory, its steps' markers, and what a step hands the runner.

Layout: ``<runs_dir>/<model>/<as-of>/<step>/`` holds a step's outputs and, once it finished,
``_done.json`` (the marker, written atomically last); a failed step leaves ``_failed.json``.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_batch.errors import InputError
from cloud_batch.pipeline.config import PipelineConfig
from cloud_batch.pipeline.models import ModelSpec, spec_for
from cloud_batch.progress import Reporter

STEP_NAMES = (
    "ingest",
    "dataset",
    "features",
    "train",
    "quantize",
    "calibrate",
    "gate",
    "register",
    "release",
    "report",
)
DONE = "_done.json"
FAILED = "_failed.json"
KILL_ENV = "EDGEFLEET_PIPELINE_KILL_AT"  # tests: SIGKILL the run at a named point (``kill_point``)


@dataclass
class StepResult:
    """What a step returns: its one-line summary and JSON data kept in the marker for later steps and status."""

    line: str
    data: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None  # why the step did nothing (gate failed, dry run, no broker)


@dataclass
class Run:
    config: PipelineConfig
    as_of: str
    dry_run: bool = False
    reporter: Reporter = field(default_factory=lambda: Reporter(False))

    @property
    def spec(self) -> ModelSpec:
        return spec_for(self.config.model)

    @property
    def dir(self) -> Path:
        return self.config.run_dir(self.as_of)

    def step_dir(self, step: str) -> Path:
        return self.dir / step

    def marker(self, step: str) -> dict[str, Any] | None:
        """The finished step's marker, None when it has not finished."""
        return read_marker(self.step_dir(step) / DONE)

    def data(self, step: str) -> dict[str, Any]:
        """The data a finished earlier step recorded (InputError when it has not finished)."""
        m = self.marker(step)
        if m is None:
            raise InputError(f"step {step} has not finished in {self.dir}")
        return dict(m.get("data") or {})


def kill_point(point: str) -> None:
    """SIGKILL this process when ``EDGEFLEET_PIPELINE_KILL_AT`` names ``point`` (crash tests only)."""
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # unreadable: treat as unfinished, the step runs again
        return None


def check_as_of(as_of: str) -> str:
    """``YYYY-MM-DD`` (InputError otherwise)."""
    import datetime as dt

    try:
        return dt.date.fromisoformat(as_of).isoformat() if len(as_of) == 10 else _bad(as_of)
    except ValueError:
        return _bad(as_of)


def _bad(as_of: str) -> str:
    raise InputError(f"--as-of {as_of!r} is not a date YYYY-MM-DD")
