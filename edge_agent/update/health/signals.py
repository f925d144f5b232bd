"""Health signals that judge the model: p99 latency and output distribution against the previous version here.

Before activation, ``baseline`` takes the previous version's recent requests on this device
(``models.taps``: latencies and outputs) and keeps their p99 and output distribution in the
update record (``details["baseline"]``, saved with the next state, so a restart keeps it).
When the health window closes, ``check`` compares the new version's requests in the window:

* p99 latency above ``policy.max_latency_ratio`` x the baseline p99;
* PSI (``telemetry.drift.psi``, the drift monitor's own) of the predicted classes, or of the
  outputs binned at the baseline's deciles for a regression, above ``policy.max_output_psi``.

Each signal needs ``MIN_SAMPLES`` requests on both sides; with fewer it cannot judge and is
skipped (logged). The error rate stays the installer's own, continuous check.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_agent.models.taps import ModelTaps
from edge_agent.telemetry.drift import psi
from edge_agent.wire.model.reference import MAX_BINS, bin_counts
from edge_agent.wire.policy import Policy

MIN_SAMPLES = 30  # requests needed on each side before a signal may judge


def wanted(policy: Policy) -> bool:
    """Does the release ask for any model signal?"""
    return policy.max_latency_ratio is not None or policy.max_output_psi is not None


def _values(outputs: list[np.ndarray]) -> np.ndarray | None:
    """The kept output summaries (``models.taps.summarize``) as one array, None when there are none."""
    return np.concatenate(outputs) if outputs else None


def distribution(values: np.ndarray, width: int, edges: list[float] | None = None) -> dict[str, Any]:
    """Class counts ``{"counts"}`` when ``width > 1``; else deciles ``{"edges", "counts"}`` (or counts at ``edges``)."""
    if width > 1:
        return {"counts": np.bincount(values.astype(np.int64), minlength=width)[:width].tolist()}
    v = values.astype(np.float64)
    if edges is None:
        edges = np.unique(np.quantile(v, np.linspace(0, 1, MAX_BINS + 1))).tolist()
        if len(edges) < 2:
            edges = [float(v.min()) - 0.5, float(v.max()) + 0.5]
    return {"edges": edges, "counts": bin_counts(v, edges).tolist()}


def baseline(taps: ModelTaps | None, name: str, version: str | None) -> dict[str, Any] | None:
    """The previous version's figures on this device (None when too few requests were seen)."""
    recent = taps.recent(name, version) if taps is not None and version is not None else None
    if recent is None:
        return None
    latencies, outputs = recent.snapshot()
    values = _values(outputs)
    if len(latencies) < MIN_SAMPLES or values is None:
        return None
    return {
        "version": version,
        "requests": len(latencies),
        "p99_ms": float(np.percentile(latencies, 99)) * 1e3,
        "width": recent.width,
        "outputs": distribution(values, recent.width),
    }


def start(taps: ModelTaps | None, name: str, version: str) -> int:
    """The new version's request count when the window opens (only later requests are judged)."""
    recent = taps.recent(name, version) if taps is not None else None
    return recent.count if recent is not None else 0


def check(
    policy: Policy, base: dict[str, Any] | None, taps: ModelTaps | None, name: str, version: str, since: int
) -> tuple[str | None, dict[str, Any]]:
    """``(breach reason or None, the figures measured)`` for the new version's requests after ``since``."""
    recent = taps.recent(name, version) if taps is not None else None
    if base is None or recent is None:
        return None, {"skipped": "no baseline of the previous version on this device"}
    latencies, outputs = recent.snapshot()
    n = min(recent.count - since, len(latencies))
    latencies, outputs = latencies[len(latencies) - n :], outputs[max(0, len(outputs) - n) :]
    if n < MIN_SAMPLES:
        return None, {"skipped": f"{n} requests in the window (at least {MIN_SAMPLES} needed)"}
    prev = base["version"]
    figures: dict[str, Any] = {"requests": n, "p99_ms": float(np.percentile(latencies, 99)) * 1e3}
    reasons = []
    ratio = policy.max_latency_ratio
    if ratio is not None and figures["p99_ms"] > ratio * base["p99_ms"]:
        reasons.append(
            f"p99 latency {figures['p99_ms']:.3f} ms > {ratio:g} x {prev}'s p99 {base['p99_ms']:.3f} ms "
            f"({n} vs {base['requests']} requests)"
        )
    values = _values(outputs)
    if policy.max_output_psi is not None and values is not None and recent.width == base.get("width"):
        ref = base["outputs"]
        now = distribution(values, recent.width, ref.get("edges"))
        if len(now["counts"]) == len(ref["counts"]):
            figures["output_psi"] = psi(np.asarray(now["counts"]), np.asarray(ref["counts"]))
            if figures["output_psi"] > policy.max_output_psi:
                reasons.append(
                    f"output distribution shift PSI {figures['output_psi']:.3f} > {policy.max_output_psi:g} "
                    f"against {prev}'s recent outputs ({n} vs {base['requests']} requests)"
                )
    return ("health window: " + "; ".join(reasons) if reasons else None), figures
