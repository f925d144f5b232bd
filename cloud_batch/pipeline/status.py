"""``cloud-batch pipeline status``: every run on disk, the state of each step, gate outcomes, release ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cloud_batch.errors import InputError
from cloud_batch.pipeline.context import DONE, FAILED, STEP_NAMES, read_marker


def _step_state(step_dir: Path) -> dict[str, Any]:
    marker = read_marker(step_dir / DONE)
    if marker is not None:
        state = "skipped" if marker.get("skipped") else "done"
        if marker.get("dry_run") and step_dir.name in ("register", "release", "report"):
            state += " (dry run)"
        return {
            "state": state,
            "line": marker.get("line", ""),
            "seconds": marker.get("seconds"),
            "data": marker.get("data") or {},
        }
    failed = read_marker(step_dir / FAILED)
    if failed is not None:
        return {"state": "failed", "line": failed.get("error", ""), "seconds": None, "data": {}}
    return {"state": "pending", "line": "", "seconds": None, "data": {}}


def run_status(run_dir: Path) -> dict[str, Any]:
    """One run: ``{"model", "as_of", "steps": {step: {state, line, seconds}}, "gates", "release_id"}``."""
    steps = {s: _step_state(run_dir / s) for s in STEP_NAMES}
    gate = steps["gate"]["data"]
    release = steps["release"]["data"]
    out = {
        "model": run_dir.parent.name,
        "as_of": run_dir.name,
        "steps": {s: {k: v for k, v in info.items() if k != "data"} for s, info in steps.items()},
        "gates": {g["name"]: g["passed"] for g in gate.get("gates", [])},
        "gates_passed": gate.get("passed"),
        "registered": steps["register"]["data"].get("version"),
        "release_id": release.get("release_id"),
    }
    return out


def list_runs(runs_dir: str | Path, model: str | None = None) -> list[dict[str, Any]]:
    """Every run under ``runs_dir`` (optionally of one model), oldest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise InputError(f"no runs directory {root}")
    models = [root / model] if model else sorted(p for p in root.iterdir() if p.is_dir())
    if model and not models[0].is_dir():
        raise InputError(f"no runs of model {model!r} in {root}")
    return [run_status(d) for m in models for d in sorted(p for p in m.iterdir() if p.is_dir())]


def format_runs(runs: list[dict[str, Any]]) -> str:
    """A table for a terminal: one block per run, one line per step."""
    if not runs:
        return "no runs"
    lines = []
    for r in runs:
        verdict = {True: "gates passed", False: "gate failed", None: "not gated yet"}[r["gates_passed"]]
        failed = [g for g, ok in r["gates"].items() if not ok]
        lines.append(
            f"{r['model']} {r['as_of']}: {verdict}"
            + (f" ({', '.join(failed)})" if failed else "")
            + (f"; registered v{r['registered']}" if r["registered"] else "")
            + (f"; release {r['release_id']}" if r["release_id"] else "")
        )
        for step, info in r["steps"].items():
            secs = f"{info['seconds']:.1f}s" if info["seconds"] is not None else "-"
            lines.append(f"  {step:<10} {info['state']:<18} {secs:>7}  {info['line'][:110]}")
    return "\n".join(lines)


def to_json(runs: list[dict[str, Any]]) -> str:
    return json.dumps(runs, indent=2, sort_keys=True)
