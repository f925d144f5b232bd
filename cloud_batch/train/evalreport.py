"""Training reports: ``eval.json`` (numbers) and ``eval.png`` (plots) for one model version.

Reports go to ``<registry>/<name>/<version>.eval/``, beside the version directory and never
inside it: a version directory is exactly the three files a device installs.
Plots use matplotlib's object API (``Figure`` without pyplot): no display, no global backend
switch, so jobs run on headless batch machines and inside notebooks alike.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def write_report(eval_dir: str | Path, data: dict[str, Any], figure: Figure) -> Path:
    """Write ``eval.json`` and ``eval.png`` into ``eval_dir`` (created) and return it."""
    out = Path(eval_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n")
    figure.savefig(out / "eval.png", dpi=100, bbox_inches="tight")
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _bars(ax: Any, title: str, values: dict[str, float], floor: float | None) -> None:
    names = list(values)
    heights = [values[n] for n in names]
    bars = ax.bar(names, heights, color=["#4c72b0", "#dd8452", "#55a868"][: len(names)])
    for bar, h in zip(bars, heights, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, h, f"{h:.4f}", ha="center", va="bottom")
    if floor is not None:
        ax.axhline(floor, color="red", linestyle="--", linewidth=1, label=f"gate floor {floor:g}")
        ax.legend(loc="lower right")
    low = min(heights + ([floor] if floor is not None else []))
    ax.set_ylim(max(0.0, low - 0.1), 1.0 + 0.02)
    ax.set_title(title)


def confusion_figure(
    cm: np.ndarray, labels: Sequence[str], accuracies: dict[str, float], floor: float | None, title: str
) -> Figure:
    """Confusion matrix (rows: true, columns: predicted) beside an accuracy bar chart."""
    fig = Figure(figsize=(11, 4.8), layout="tight")
    ax_cm, ax_acc = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.3, 1]})
    ax_cm.imshow(cm, cmap="Blues")
    ax_cm.set_xticks(range(len(labels)), labels)
    ax_cm.set_yticks(range(len(labels)), labels)
    ax_cm.set_xlabel("predicted")
    ax_cm.set_ylabel("true")
    ax_cm.set_title(title)
    limit = cm.max() / 2 if cm.size else 0
    for (i, j), v in np.ndenumerate(cm):
        if v:
            ax_cm.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > limit else "black")
    _bars(ax_acc, "held-out accuracy", accuracies, floor)
    return fig


def roc_figure(
    curves: dict[str, tuple[np.ndarray, np.ndarray, float]],
    calibration: dict[str, tuple[np.ndarray, np.ndarray]],
    title: str,
) -> Figure:
    """ROC curves (``{label: (fpr, tpr, auc)}``) beside reliability curves (``{label: (mean predicted, observed rate)}``)."""
    fig = Figure(figsize=(11, 4.8), layout="tight")
    ax_roc, ax_cal = fig.subplots(1, 2)
    for label, (fpr, tpr, auc) in curves.items():
        ax_roc.plot(fpr, tpr, label=f"{label} (AUC {auc:.4f})")
    ax_roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax_roc.set_xlabel("false positive rate")
    ax_roc.set_ylabel("true positive rate")
    ax_roc.set_title(title)
    ax_roc.legend(loc="lower right")
    for label, (pred, observed) in calibration.items():
        ax_cal.plot(pred, observed, marker="o", label=label)
    ax_cal.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax_cal.set_xlabel("mean predicted failure probability")
    ax_cal.set_ylabel("observed failure rate")
    ax_cal.set_title("calibration (held-out)")
    ax_cal.legend(loc="upper left")
    return fig
