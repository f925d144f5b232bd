"""How a shadow candidate's outputs are compared with the active version's, per row (pure)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_agent.wire.model.reference import output_classes
from edge_agent.wire.shadow import REGRESSION_TOLERANCE


def compare(active: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> tuple[int, int, float]:
    """``(rows, rows that agree, mean absolute difference)`` over the outputs both versions return.

    A row agrees when, for every shared output, the predicted class is the same (argmax of
    ``[N, C>1]``, ``score >= 0.5`` of ``[N, 1]`` sigmoid-like outputs in 0..1) or, for a
    regression output, the relative error is within ``REGRESSION_TOLERANCE``.
    """
    names = [n for n in active if n in candidate]
    rows = 0
    agree: np.ndarray | None = None
    diffs = []
    for name in names:
        a = np.asarray(active[name], dtype=np.float64)
        c = np.asarray(candidate[name], dtype=np.float64)
        if a.shape != c.shape:
            return max(1, a.shape[0] if a.ndim else 1), 0, float("nan")
        diffs.append(np.abs(a - c).ravel())
        if _is_classes(a):
            ok = output_classes(a)[0] == output_classes(c)[0]
        else:
            flat_a, flat_c = a.reshape(a.shape[0] if a.ndim else 1, -1), c.reshape(c.shape[0] if c.ndim else 1, -1)
            rel = np.abs(flat_a - flat_c) / np.maximum(np.abs(flat_a), 1e-6)
            ok = np.all(rel <= REGRESSION_TOLERANCE, axis=1)
        agree = ok if agree is None else agree & ok
        rows = len(ok)
    if agree is None:
        return 0, 0, 0.0
    return rows, int(agree.sum()), float(np.concatenate(diffs).mean()) if diffs else 0.0


def _is_classes(a: np.ndarray) -> bool:
    """Class scores: ``[N, C>1]``, or ``[N, 1]`` values within 0..1 (a sigmoid)."""
    if a.ndim < 2:
        return False
    return a.shape[-1] > 1 or bool(np.all((a >= 0) & (a <= 1)))
