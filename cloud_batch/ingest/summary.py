"""``cloud-batch data summary``: what the store holds, per device, and what it is missing.

Rows per device and kind and label coverage come from the Parquet data; seq gaps, drops the
devices reported and rejections come from the ledger (gaps are seqs never received between 1 and
the highest one received; the devices re-send them unless they were lost on the device itself).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from cloud_batch.ingest.ledger import gaps
from cloud_batch.ingest.read import bodies, open_ledger, read_kind
from edge_agent.wire.telemetry import KINDS

MAX_REASONS = 10


def summarize(store: str | Path) -> dict[str, Any]:
    """The summary as a JSON-ready dict: ``devices``, ``models`` (label coverage), ``rejections``."""
    ledger = open_ledger(store)
    try:
        entries = dict(ledger.devices)
        rejections = ledger.rejections()
    finally:
        ledger.close()
    devices: dict[str, dict[str, Any]] = {
        d: {
            "fleet": e.fleet,
            "rows": {},
            "acked_seq": e.acked,
            "gaps": [list(g) for g in gaps(e.ranges)],
            "dropped": dict(e.dropped),
            "rejected": e.rejected,
            "drift": {},
        }
        for d, e in sorted(entries.items())
    }
    for kind in KINDS:
        counts = Counter(read_kind(store, kind).column("device_id").to_pylist())
        for d, n in counts.items():
            devices.setdefault(d, {"rows": {}, "drift": {}})["rows"][kind] = n
    _newest_drift(store, devices)
    return {
        "devices": devices,
        "models": _label_coverage(store),
        "rejections": {"count": len(rejections), "latest": [r["reason"] for r in rejections[-MAX_REASONS:]]},
    }


def _label_coverage(store: str | Path) -> dict[str, dict[str, Any]]:
    """Per model: predictions, labels, and the share of predictions (with sampled inputs) that have a label."""
    preds = read_kind(store, "prediction")
    labels = read_kind(store, "feedback")
    labeled = set(
        zip(
            labels.column("device_id").to_pylist(),
            labels.column("model").to_pylist(),
            labels.column("request_id").to_pylist(),
            strict=True,
        )
    )
    out: dict[str, dict[str, Any]] = {}
    for device, model, rid, body in zip(
        preds.column("device_id").to_pylist(),
        preds.column("model").to_pylist(),
        preds.column("request_id").to_pylist(),
        bodies(preds),
        strict=True,
    ):
        m = out.setdefault(str(model), {"predictions": 0, "labeled": 0, "with_inputs": 0, "labeled_with_inputs": 0})
        hit = (device, model, rid) in labeled
        has_inputs = isinstance(body.get("inputs"), dict)
        m["predictions"] += 1
        m["labeled"] += hit
        m["with_inputs"] += has_inputs
        m["labeled_with_inputs"] += hit and has_inputs
    for m in out.values():
        m["label_coverage"] = round(m["labeled"] / m["predictions"], 4) if m["predictions"] else 0.0
    return out


def _newest_drift(store: str | Path, devices: dict[str, dict[str, Any]]) -> None:
    """Each device's newest drift record per model (PSI per feature, output PSI, window)."""
    table = read_kind(store, "drift")
    newest: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
    for device, ts, body in zip(
        table.column("device_id").to_pylist(), table.column("ts").to_pylist(), bodies(table), strict=True
    ):
        key = (device, str(body.get("model")))
        if key not in newest or ts >= newest[key][0]:
            newest[key] = (ts, body)
    for (device, model), (ts, body) in newest.items():
        devices.setdefault(device, {"rows": {}, "drift": {}})["drift"][model] = {
            "ts": ts,
            "version": body.get("version"),
            "window": body.get("window"),
            "psi": body.get("psi"),
            "output_psi": body.get("output_psi"),
        }


def format_summary(summary: dict[str, Any], watch: float = 0.1) -> str:
    """The summary as text for a terminal."""
    lines = ["device                rows (prediction/feedback/event/drift)  acked   gaps  dropped  rejected"]
    for d, info in summary["devices"].items():
        rows = "/".join(str(info["rows"].get(k, 0)) for k in KINDS)
        gap = sum(hi - lo + 1 for lo, hi in info.get("gaps", []))
        dropped = sum(info.get("dropped", {}).values())
        lines.append(
            f"{d:<21} {rows:<39} {info.get('acked_seq', 0):<7} {gap:<5} {dropped:<8} {info.get('rejected', 0)}"
        )
        for model, drift in sorted(info["drift"].items()):
            psi = drift.get("psi") or {}
            worst = sorted(psi.items(), key=lambda kv: -float(kv[1] or 0))[:3]
            shown = ", ".join(f"{k}={float(v):.3f}" for k, v in worst)
            flag = " (drift)" if worst and float(worst[0][1] or 0) >= watch else ""
            lines.append(f"    drift {model} v{drift.get('version')}: {shown}; output {drift.get('output_psi')}{flag}")
    lines.append("model                 predictions  labeled  coverage  with inputs  labeled with inputs")
    for model, m in sorted(summary["models"].items()):
        lines.append(
            f"{model:<21} {m['predictions']:<12} {m['labeled']:<8} {m['label_coverage']:<9} "
            f"{m['with_inputs']:<12} {m['labeled_with_inputs']}"
        )
    rej = summary["rejections"]
    lines.append(f"rejected messages/records: {rej['count']}")
    lines.extend(f"    {why}" for why in rej["latest"])
    return "\n".join(lines)
