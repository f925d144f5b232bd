"""The ``report`` step: one self-contained ``report.html`` (PNG figures embedded as data URIs).

Sections: verdict (which gate failed and why), metrics against production, reliability
before/after, confusion matrix (digits) or ROC (maintenance), data checks, field drift (from
``data summary``), what was released and to whom, and how long each step took.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cloud_batch.pipeline.context import STEP_NAMES, Run, StepResult
from cloud_batch.pipeline.models import Rows
from cloud_batch.pipeline.steps_model import PROBS
from cloud_batch.pipeline.steps_release import REPORT_FILE
from edge_agent.fsutil import atomic_write_bytes

_STYLE = (
    "body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.fail{color:#b00}.ok{color:#070}"
)


def _img(fig: Figure | bytes) -> str:
    if isinstance(fig, Figure):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
        fig = buf.getvalue()
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(fig).decode()}">'


def _table(rows: list[list[Any]], head: list[str]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def quality_figure(run: Run, hold: Rows, after: np.ndarray, prod: np.ndarray | None) -> Figure:
    """Confusion matrix of the candidate (softmax) or ROC of candidate and production (sigmoid)."""
    spec = run.spec
    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    if spec.kind == "softmax":
        cm = np.zeros((spec.n_classes, spec.n_classes), np.int64)
        np.add.at(cm, (hold.y, after.argmax(axis=1)), 1)
        ax.imshow(cm, cmap="Blues")
        for (true, pred), n in np.ndenumerate(cm):
            if n:
                ax.text(
                    pred,
                    true,
                    str(n),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if n < cm.max() / 2 else "white",
                )
        ax.set_xticks(range(spec.n_classes))
        ax.set_yticks(range(spec.n_classes))
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{spec.name} candidate: confusion on the holdout")
        return fig
    from sklearn.metrics import roc_curve

    for label, p in (("candidate", after), ("production", prod)):
        if p is not None and len(np.unique(hold.y)) == 2:
            fpr, tpr, _ = roc_curve(hold.y, p.reshape(len(p), -1)[:, 0])
            ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], ls="--", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{spec.name}: ROC on the holdout")
    ax.legend()
    return fig


def _drift(summary: dict[str, Any], model: str) -> str:
    rows = []
    for device, info in sorted((summary.get("devices") or {}).items()):
        drift = (info.get("drift") or {}).get(model)
        if drift:
            psi = drift.get("psi") or {}
            worst = sorted(psi.items(), key=lambda kv: -float(kv[1] or 0))[:3]
            rows.append(
                [
                    device,
                    drift.get("version"),
                    ", ".join(f"{k}={float(v):.3f}" for k, v in worst),
                    drift.get("output_psi"),
                ]
            )
    if not rows:
        return "<p>No drift records from the field for this model.</p>"
    return _table(rows, ["device", "version", "worst input PSI", "output PSI"])


def _metrics(run: Run) -> str:
    cal, gate = run.data("calibrate"), run.data("gate")
    prod = gate.get("production", {})
    ps = prod.get("scores", {})
    m = run.spec.metric
    rows = [
        [f"holdout {m}", cal["scores"]["holdout"], ps.get("holdout", "-")],
        [f"field-slice {m}", cal["scores"]["field"], ps.get("field", "-")],
        ["ECE (15 bins)", cal["after"]["ece"], prod.get("ece", "-")],
        ["Brier", cal["after"]["brier"], prod.get("brier", "-")],
        ["NLL", cal["after"]["nll"], prod.get("nll", "-")],
        ["p50 latency, 1 row (ms)", gate["candidate"]["latency_p50_ms"], "-"],
    ]
    head = ["metric", "candidate (calibrated)", f"production v{prod.get('version')} ({prod.get('origin', '')})"]
    return _table(rows, head)


def report(run: Run, out: Path) -> StepResult:
    """Write ``report.html`` from what the earlier steps recorded."""
    gate, cal = run.data("gate"), run.data("calibrate")
    hold = Rows.load(run.step_dir("dataset") / "holdout.npz")
    with np.load(run.step_dir("calibrate") / PROBS) as z:
        after = z["after"]
    prod_file = run.step_dir("gate") / PROBS
    prod = np.load(prod_file)["p"] if prod_file.is_file() else None
    failed = [g for g in gate["gates"] if not g["passed"]]
    verdict = (
        '<p class="ok">Every gate passed.</p>'
        if not failed
        else "".join(
            f'<p class="fail">Gate <b>{html.escape(g["name"])}</b> failed: {html.escape(g["detail"])}</p>'
            for g in failed
        )
    )
    release = run.marker("release") or {}
    rel = release.get("data") or {}
    if release.get("skipped"):
        released = f"<p>Nothing released: {html.escape(str(release['skipped']))}.</p>"
    else:
        pushes = ", ".join(f"{p['set']} v{p['version']}" for p in rel.get("feature_pushes", [])) or "none"
        released = (
            f"<p>Released {html.escape(run.spec.name)} v{html.escape(str(rel.get('version')))} to fleet "
            f"{html.escape(str(rel.get('fleet')))} as {html.escape(str(rel.get('release_id')))}; rollout stages "
            f"{rel.get('stages')}, window {html.escape(str(rel.get('window') or 'any time'))}. Feature sets pushed first: {html.escape(pushes)}.</p>"
        )
    timings = [
        [s, (run.marker(s) or {}).get("seconds", "-"), (run.marker(s) or {}).get("line", "")] for s in STEP_NAMES[:-1]
    ]
    checks = [
        [c["name"], "pass" if c["passed"] else "FAIL", c["detail"]] for c in run.data("dataset").get("checks", [])
    ]
    summary = _read_json(run.step_dir("dataset") / "summary.json")
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{run.spec.name} {run.as_of}</title>",
        f"<style>{_STYLE}</style></head><body><h1>Nightly run: {html.escape(run.spec.name)}, as of {run.as_of}</h1>",
        f"<h2>Verdict</h2>{verdict}{released}",
        "<h2>Gates</h2>"
        + _table(
            [[g["name"], "pass" if g["passed"] else "FAIL", g["detail"]] for g in gate["gates"]], ["gate", "", "detail"]
        ),
        "<h2>Metrics against production</h2>" + _metrics(run),
        f"<h2>Calibration (T = {cal['temperature']:.4f})</h2>"
        + _img((run.step_dir("calibrate") / "reliability.png").read_bytes()),
        "<h2>Quality</h2>" + _img(quality_figure(run, hold, after, prod)),
        "<h2>Data checks</h2>" + _table(checks, ["check", "", "detail"]),
        "<h2>Drift seen in the field</h2>" + _drift(summary, run.spec.name),
        "<h2>Step timings</h2>" + _table(timings, ["step", "seconds", "summary"]),
        "</body></html>",
    ]
    path = out / REPORT_FILE
    atomic_write_bytes(path, "\n".join(parts).encode())
    return StepResult(f"wrote {path}", {"report": str(path), "gates_passed": not failed})


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}
