"""The ``gate`` step: the calibrated candidate against float, against production, and against the budgets.

Production is the version the registry's signed-document record last released to the fleet
(``registry.signed.SignedLog``); before any release it is the newest registered version (the one
agents install from the registry on first start). Both models are run by the edge runtime on the
same holdout and field slice. Gates (thresholds in ``[gates]``):

* ``quantization``: float minus quantized metric ≤ ``max_quantization_drop``;
* ``holdout_vs_production`` / ``field_vs_production``: the candidate's metric is at most
  ``max_regression`` below production's;
* ``ece``: calibrated ECE ≤ ``max_ece`` and ≤ production's ECE on the same holdout (plus
  ``max_ece_regression``, default 0);
* ``latency``: the candidate's p50 for one row in the edge runtime, measured here, ≤ ``latency_budget_ms``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from cloud_batch.pipeline.config import GatesSection
from cloud_batch.pipeline.context import Run, StepResult
from cloud_batch.pipeline.models import ModelSpec, Rows
from cloud_batch.pipeline.steps_model import PROBS, TFLITE, device_probs, scores
from cloud_batch.registry.models import Registry
from cloud_batch.registry.signed import SignedLog
from cloud_batch.train import calibrate
from cloud_batch.train.device_eval import staged_model
from edge_agent.fsutil import atomic_write_json
from edge_agent.wire.model.manifest import MODEL_FILE

LATENCY_RUNS = 50


def production_version(run: Run) -> tuple[str | None, str]:
    """(version, where it came from): the last release recorded for the fleet, else the newest registered version."""
    cfg = run.config
    doc = SignedLog(cfg.registry).latest(cfg.fleet, "model", cfg.model) if cfg.registry.is_dir() else None
    if doc is not None:
        return str(doc["version"]), f"released to fleet {cfg.fleet} ({doc.get('release_id')})"
    latest = Registry(cfg.registry).latest(cfg.model) if cfg.registry.is_dir() else None
    return latest, ("no release recorded: the newest registered version" if latest else "none")


def latency_p50_ms(tflite: bytes, run: Run, holdout: Rows) -> float:
    """Median wall time of one single-row predict in the edge runtime (after a warm-up call)."""
    spec = run.spec
    one = {k: v[:1] for k, v in holdout.inputs.items()}
    with staged_model(tflite, spec.name, rename_outputs={"output_0": spec.output}) as (_, served):
        served.predict(one)
        times = []
        for _ in range(LATENCY_RUNS):
            t0 = time.perf_counter()
            served.predict(one)
            times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def _gate(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail}


def _vs(name: str, cand: float, prod: float | None, allowed: float, what: str) -> dict[str, Any]:
    if prod is None or math.isnan(prod):
        return _gate(name, True, f"{what}: candidate {cand:.4f}; no production score to compare with")
    ok = cand >= prod - allowed
    return _gate(name, ok, f"{what}: candidate {cand:.4f} vs production {prod:.4f} (allowed regression {allowed:.4f})")


def evaluate(
    cfg: GatesSection, spec: ModelSpec, quant: dict[str, Any], candidate: dict[str, Any], production: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every gate on the figures: ``quant`` (the quantize step's data), ``candidate`` (``scores``,
    ``ece``, ``latency_p50_ms``) and ``production`` (``scores`` and ``ece`` when there is one)."""
    cand_scores, cand_ece, p50 = candidate["scores"], candidate["ece"], candidate["latency_p50_ms"]
    prod_scores, prod_ece = production.get("scores", {}), production.get("ece")
    return [
        _gate(
            "quantization",
            quant["drop"] <= cfg.max_quantization_drop,
            f"{spec.quantization} {spec.metric} {quant['quantized']['holdout']:.4f} vs float "
            f"{quant['float']['holdout']:.4f}: drop {quant['drop']:+.4f} (allowed {cfg.max_quantization_drop:.4f})",
        ),
        _vs(
            "holdout_vs_production",
            cand_scores["holdout"],
            prod_scores.get("holdout"),
            cfg.max_regression,
            f"holdout {spec.metric}",
        ),
        _vs(
            "field_vs_production",
            cand_scores["field"],
            prod_scores.get("field"),
            cfg.max_regression,
            f"field-slice {spec.metric}",
        ),
        _gate(
            "ece",
            cand_ece <= cfg.max_ece and (prod_ece is None or cand_ece <= prod_ece + cfg.max_ece_regression),
            f"calibrated ECE {cand_ece:.4f} (maximum {cfg.max_ece:.4f}"
            + (
                f"; production {prod_ece:.4f}, allowed {cfg.max_ece_regression:.4f} above it)"
                if prod_ece is not None
                else "; no production)"
            ),
        ),
        _gate(
            "latency", p50 <= cfg.latency_budget_ms, f"p50 {p50:.3f} ms for one row (budget {cfg.latency_budget_ms} ms)"
        ),
    ]


def gate(run: Run, out: Path) -> StepResult:
    """Evaluate every gate; the step succeeds either way and records ``passed`` for register/release."""
    spec = run.spec
    hold = Rows.load(run.step_dir("dataset") / "holdout.npz")
    cal = run.data("calibrate")
    version, origin = production_version(run)
    production: dict[str, Any] = {"version": version, "origin": origin}
    if version is not None:
        reg = Registry(run.config.registry)
        p = device_probs((reg.path(spec.name, version) / MODEL_FILE).read_bytes(), spec, hold.inputs)
        np.savez(out / PROBS, p=p)
        production.update(scores=scores(spec, p, hold), **calibrate.measures(p, hold.y, spec.kind))
    p50 = latency_p50_ms((run.step_dir("calibrate") / TFLITE).read_bytes(), run, hold)
    candidate = {"scores": cal["scores"], "ece": cal["after"]["ece"], "latency_p50_ms": round(p50, 4)}
    gates = evaluate(run.config.gates, spec, run.data("quantize"), candidate, production)
    failed = [g for g in gates if not g["passed"]]
    data = {"passed": not failed, "gates": gates, "production": production, "candidate": candidate}
    atomic_write_json(out / "gates.json", data)
    if failed:
        line = "FAILED " + "; ".join(f"{g['name']}: {g['detail']}" for g in failed)
    else:
        line = f"all {len(gates)} gates passed against production {version or '(none)'}"
    return StepResult(line, data)
