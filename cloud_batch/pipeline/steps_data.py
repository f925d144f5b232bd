"""The ``ingest``, ``dataset`` and ``features`` steps: field telemetry in, checked training data out.

* ``ingest`` is ``cloud-batch ingest --idle-exit-s`` (``ingest.consumer.run_ingest``);
* ``dataset`` is ``pipeline.dataset.build``; its checks go to ``checks.json`` and the field drift
  (``data summary``) to ``summary.json`` for the report;
* ``features`` rebuilds the feature sets in ``[features] build`` (keywords of
  ``features.build.build``; when empty, the sets the model's manifest joins, each by its recipe
  on the ``[train]`` history) and runs the batch-scoring jobs in ``[features] score`` (keywords of
  ``score.job.score``, ``publish_features`` included), each as the next version of its set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cloud_batch.errors import InputError
from cloud_batch.pipeline import dataset
from cloud_batch.pipeline.context import Run, StepResult
from edge_agent.fsutil import atomic_write_json

RAY_ADDRESS_ENV = "RAY_ADDRESS"


def ingest(run: Run, out: Path) -> StepResult:
    """Drain the fleet's telemetry into the store until ``idle_exit_s`` without a message."""
    cfg = run.config
    if not cfg.broker:
        return StepResult("skipped: no [pipeline] broker, using the store as it is", skipped="no broker")
    from cloud_batch.ingest.consumer import IngestOptions, run_ingest

    stats = run_ingest(IngestOptions(cfg.fleet, cfg.broker, cfg.store, idle_exit_s=cfg.ingest.idle_exit_s))
    data = {
        "rows": stats.rows,
        "messages": stats.messages,
        "duplicates": stats.duplicates,
        "devices": len(stats.devices),
    }
    return StepResult(stats.summary(), data)


def build_dataset(run: Run, out: Path) -> StepResult:
    """Base + labeled field rows, time-based holdout, field slice, data checks (InputError on a failed check)."""
    from cloud_batch.ingest.summary import summarize

    train, holdout, checks = dataset.build(run.config, run.spec)
    atomic_write_json(out / "checks.json", [c.to_dict() for c in checks])
    try:
        summary = summarize(run.config.store)
    except (InputError, OSError) as exc:
        summary = {"error": str(exc)}
    atomic_write_json(out / "summary.json", summary)
    bad = dataset.failed(checks)
    if bad:
        raise InputError("data checks failed: " + "; ".join(f"{c.name}: {c.detail}" for c in bad))
    train.save(out / "train.npz")
    holdout.save(out / "holdout.npz")
    n_field = int(holdout.field.sum())
    line = (
        f"{len(train):,} training rows ({int(train.field.sum()):,} field), {len(holdout):,} held out "
        f"({n_field:,} in the field slice); {len(checks)} checks passed"
    )
    data = {"train_rows": len(train), "holdout_rows": len(holdout), "field_slice": n_field}
    return StepResult(line, {**data, "checks": [c.to_dict() for c in checks]})


def _next_version(registry: Path, set_name: str) -> str:
    from cloud_batch.features.build import FeatureRegistry
    from edge_agent.wire.names import parse_version

    versions = FeatureRegistry(registry).versions(set_name) if (registry / "features").is_dir() else []
    return str(parse_version(versions[-1])[0] + 1) if versions else "1"


def _paths(run: Run, options: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: (str(run.config.path(v)) if k in keys and isinstance(v, str) else v) for k, v in options.items()}


def build_entries(run: Run) -> list[dict[str, Any]]:
    """``[features] build``; when empty, every set the model joins, by its recipe on the ``[train]`` history."""
    cfg = run.config
    if cfg.features.build:
        return cfg.features.build
    t = cfg.train
    sets = run.spec.joined_sets()
    return [{"set": s, "recipe": r, "n_assets": t.n_assets, "days": t.days, "seed": t.seed} for s, r in sets.items()]


def features(run: Run, out: Path) -> StepResult:
    """Rebuild the sets (``build_entries``), run each ``[features] score`` job; record the versions made.

    Entries were checked at config load (``config.check_features``).
    """
    cfg = run.config
    built: list[dict[str, str]] = []
    for entry in build_entries(run):
        from cloud_batch.features.build import build

        opts = _paths(run, dict(entry), ("source", "history"))
        set_name = str(opts.pop("set"))
        version = str(opts.pop("version", None) or _next_version(cfg.registry, set_name))
        result = build(cfg.registry, set_name, version, progress=run.reporter.enabled, **opts)
        built.append({"set": set_name, "version": version, "summary": result.summary().splitlines()[0]})
    scored: list[dict[str, Any]] = []
    for entry in cfg.features.score:
        from cloud_batch.score.job import score

        opts = _paths(run, dict(entry), ("input", "output"))
        model, version, source = opts.pop("model"), opts.pop("version"), opts.pop("input")
        target = opts.pop("output", str(out / f"{model}-{version}.parquet"))
        if opts.get("publish_features") and not opts.get("features_version"):
            opts["features_version"] = _next_version(cfg.registry, str(opts["publish_features"]))
        if opts.get("engine") == "ray":
            opts.setdefault("ray_address", os.environ.get(RAY_ADDRESS_ENV))
        res = score(cfg.registry, model, version, source, target, progress=run.reporter.enabled, **opts)
        scored.append({"model": model, "version": version, "rows": res.rows, "output": str(res.output)})
        if res.published is not None:
            built.append(
                {"set": str(opts["publish_features"]), "version": str(opts["features_version"]), "summary": "scored"}
            )
    stale = sorted(set(run.spec.joined_sets()) - {b["set"] for b in built})
    note = f"; joined set(s) {stale} not rebuilt: they keep their current version" if stale else ""
    if not built and not scored:
        return StepResult(f"nothing to rebuild (the model joins no set){note}", {"built": [], "not_rebuilt": stale})
    line = ", ".join(f"{b['set']} v{b['version']}" for b in built) or "no sets"
    data = {"built": built, "scored": scored, "not_rebuilt": stale}
    return StepResult(f"built {line}; {len(scored)} scoring job(s){note}", data)
