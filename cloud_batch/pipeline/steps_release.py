"""The ``register`` and ``release`` steps: the calibrated candidate into the registry, then to the fleet.

Both are skipped, with the reason on their line, when a gate failed or under ``--dry-run``.
Both are safe to repeat after a kill: ``register`` persists the version it claims before
registering and reuses it (a version with the same sha256 is already done); ``release`` does not
publish again once ``published.json`` records the release (a kill between the broker's ack and
that record re-signs the same version: devices that already took it refuse it as not newer).
The manifest's ``metrics`` carry the run's numbers, the calibration (``temperature``, ``ece``:
``edge_agent.wire.model.calibration``) and the path of the run's report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cloud_batch.pipeline.context import Run, StepResult, kill_point
from cloud_batch.pipeline.models import Rows
from cloud_batch.pipeline.steps_model import TFLITE, device_probs
from cloud_batch.registry.models import Registry
from cloud_batch.train.reference import build_reference
from edge_agent.fsutil import atomic_write_json, sha256_file
from edge_agent.wire.model.calibration import CALIBRATION_KEY

CLAIM = "claim.json"
REPORT_FILE = "report.html"


def skip_reason(run: Run, step: str) -> str | None:
    """Why ``step`` must not act: a failed gate or a dry run (None: go ahead)."""
    gates = run.data("gate")
    if not gates.get("passed"):
        failed = [g["name"] for g in gates.get("gates", []) if not g["passed"]]
        return f"gate(s) failed: {', '.join(failed)}; nothing {'registered' if step == 'register' else 'released'}"
    if run.dry_run:
        return "--dry-run"
    return None


def _metrics(run: Run) -> dict[str, Any]:
    cal, gate = run.data("calibrate"), run.data("gate")
    return {
        "metric": run.spec.metric,
        "holdout": cal["scores"]["holdout"],
        "field_slice": cal["scores"]["field"],
        "quantization": run.spec.quantization,
        "float_vs_quantized_drop": run.data("quantize")["drop"],
        "brier": cal["after"]["brier"],
        "nll": cal["after"]["nll"],
        "latency_p50_ms": gate["candidate"]["latency_p50_ms"],
        CALIBRATION_KEY: {
            "temperature": cal["temperature"],
            "ece": cal["after"]["ece"],
            "ece_before": cal["before"]["ece"],
            "bins": cal["bins"],
            "method": "temperature scaling (folded into the final layer)",
        },
        "pipeline": {
            "as_of": run.as_of,
            "run_dir": str(run.dir),
            "report": str(run.step_dir("report") / REPORT_FILE),
            "production_before": gate["production"].get("version"),
            "train_rows": run.data("dataset")["train_rows"],
            "epochs": run.config.train.epochs,
        },
    }


def register(run: Run, out: Path) -> StepResult:
    """Register the calibrated candidate as the next version (the claimed one after a restart)."""
    why = skip_reason(run, "register")
    if why:
        return StepResult(f"skipped: {why}", skipped=why)
    cfg, spec = run.config, run.spec
    reg = Registry(cfg.registry)
    model = run.step_dir("calibrate") / TFLITE
    claim = out / CLAIM
    version = json.loads(claim.read_text())["version"] if claim.is_file() else reg.next_version(spec.name)
    atomic_write_json(claim, {"version": version})
    if version in reg.versions(spec.name) and reg.manifest(spec.name, version).sha256 == sha256_file(model):
        manifest = reg.manifest(spec.name, version)
    else:
        tr, hold = Rows.load(run.step_dir("dataset") / "train.npz"), Rows.load(run.step_dir("dataset") / "holdout.npz")
        kwargs = spec.register_kwargs(hold)
        preds = {spec.output: device_probs(model.read_bytes(), spec, hold.inputs)}
        names = kwargs.get("extra", {}).get("feature_names")
        reference = build_reference(tr.inputs, preds, names, cfg.train.seed)
        kwargs["extra"] = {**kwargs.get("extra", {}), "reference": reference}
        manifest = reg.register(model, spec.name, version, metrics=_metrics(run), **kwargs)
        kill_point("register.registered")  # registered, no marker yet: the rerun must not make another version
    path = reg.path(spec.name, version)
    return StepResult(
        f"registered {spec.name} {version} -> {path} ({manifest.size:,} bytes)", {"version": version, "path": str(path)}
    )


def release(run: Run, out: Path) -> StepResult:
    """Push the features this run built, then release the registered version with the configured policy."""
    why = skip_reason(run, "release")
    cfg = run.config
    if why is None and not cfg.broker:
        why = "no [pipeline] broker configured"
    if why:
        return StepResult(f"skipped: {why}", skipped=why)
    from cloud_batch.features.push import push
    from cloud_batch.fleetops.broker import open_link
    from cloud_batch.fleetops.release import release as release_model

    version, rel_cfg, key = run.data("register")["version"], cfg.release, cfg.key_path()
    progress = run.reporter.enabled
    pushes = []
    published = out / "published.json"
    with open_link(cfg.broker) as link:
        for built in run.data("features").get("built", []):
            res = push(cfg.registry, built["set"], built["version"], cfg.fleet, key, link, progress=progress)
            pushes.append({"set": res.set, "version": res.version, "releases": len(res.releases)})
        if published.is_file():  # published before a kill: never sign a second release of this version
            release_id = str(json.loads(published.read_text())["release_id"])
        else:
            rel = release_model(
                cfg.registry,
                cfg.model,
                version,
                cfg.fleet,
                key,
                link,
                stages=rel_cfg.stages,
                window=rel_cfg.window or None,
                max_failure_rate=rel_cfg.max_failure_rate,
                health_window_s=rel_cfg.health_window_s,
                max_latency_ms=rel_cfg.max_latency_ms or None,
                progress=progress,
            )
            release_id = rel.release_id
            atomic_write_json(published, {"release_id": release_id})
    stages = ",".join(map(str, rel_cfg.stages))
    data = {"version": version, "release_id": release_id, "fleet": cfg.fleet, "stages": rel_cfg.stages}
    data.update(window=rel_cfg.window or None, feature_pushes=pushes)
    feats = ", ".join(f"{p['set']} v{p['version']}" for p in pushes) or "no feature sets"
    line = f"pushed {feats}; released {cfg.model} {version} to fleet {cfg.fleet} ({release_id}), stages {stages}"
    return StepResult(line + (f", window {rel_cfg.window}" if rel_cfg.window else ""), data)
