"""Temperature scaling: one scalar ``T`` that makes a classifier's probabilities honest.

``T`` divides the logits (``softmax(z / T)`` for digits, ``sigmoid(z / T)`` for maintenance) and is
fitted on held-out data by minimising the negative log-likelihood. It never changes which class
wins, so accuracy and AUC stay; only the confidence moves.

The temperature is folded into the model before conversion (``fold_temperature``: the final
Dense layer's kernel and bias are divided by ``T``), so the ``.tflite`` artifact carries its own
calibration: the device runs it unchanged and batch/edge parity stays exact.

Measures: ECE over ``BINS`` equal-width bins (confidence of the top class for softmax, the
positive-class probability for sigmoid), Brier score and NLL.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cloud_batch.errors import CloudError, InputError

BINS = 15
KINDS = ("softmax", "sigmoid")
_EPS = 1e-7
_LOG_T_RANGE = (-4.0, 4.0)  # T between ~0.02 and ~55


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InputError(f"unknown output kind {kind!r}; use one of {list(KINDS)}")


def probabilities(logits: np.ndarray, kind: str, temperature: float = 1.0) -> np.ndarray:
    """``softmax(z / T)`` over the last axis, or ``sigmoid(z / T)`` (shape kept)."""
    _check_kind(kind)
    z = np.asarray(logits, np.float64) / temperature
    if kind == "sigmoid":
        return np.asarray(1.0 / (1.0 + np.exp(-z)))
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def _positive(p: np.ndarray) -> np.ndarray:
    return np.asarray(p, np.float64).reshape(len(p), -1)[:, 0]


def nll(p: np.ndarray, y: np.ndarray, kind: str) -> float:
    """Mean negative log-likelihood of labels ``y`` (class index, or 0/1) under probabilities ``p``."""
    _check_kind(kind)
    y = np.asarray(y)
    if kind == "sigmoid":
        q = np.clip(_positive(p), _EPS, 1 - _EPS)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
    q = np.clip(np.asarray(p, np.float64)[np.arange(len(y)), y.astype(int)], _EPS, 1.0)
    return float(-np.mean(np.log(q)))


def brier(p: np.ndarray, y: np.ndarray, kind: str) -> float:
    """Mean squared error of the probabilities against the one-hot (or 0/1) truth."""
    _check_kind(kind)
    if kind == "sigmoid":
        return float(np.mean((_positive(p) - np.asarray(y, np.float64)) ** 2))
    p = np.asarray(p, np.float64)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), np.asarray(y).astype(int)] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def reliability(p: np.ndarray, y: np.ndarray, kind: str, bins: int = BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty bin: mean confidence, observed frequency, count (the reliability diagram's points)."""
    _check_kind(kind)
    if kind == "sigmoid":
        conf, hit = _positive(p), np.asarray(y, np.float64)
    else:
        p = np.asarray(p, np.float64)
        conf, hit = p.max(axis=1), (p.argmax(axis=1) == np.asarray(y)).astype(np.float64)
    which = np.clip((conf * bins).astype(int), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    keep = count > 0
    mean_conf = np.bincount(which, conf, bins)[keep] / count[keep]
    freq = np.bincount(which, hit, bins)[keep] / count[keep]
    return mean_conf, freq, count[keep]


def ece(p: np.ndarray, y: np.ndarray, kind: str, bins: int = BINS) -> float:
    """Expected calibration error: the count-weighted mean gap between confidence and frequency."""
    conf, freq, count = reliability(p, y, kind, bins)
    return float(np.sum(count * np.abs(conf - freq)) / max(1, int(count.sum())))


def measures(p: np.ndarray, y: np.ndarray, kind: str) -> dict[str, float]:
    """``{"ece", "brier", "nll"}`` rounded for reports."""
    return {"ece": round(ece(p, y, kind), 5), "brier": round(brier(p, y, kind), 5), "nll": round(nll(p, y, kind), 5)}


def fit_temperature(logits: np.ndarray, y: np.ndarray, kind: str) -> float:
    """The ``T`` that minimises NLL of ``y`` under ``probabilities(logits, kind, T)`` (bounded 1-D search on log T)."""
    from scipy.optimize import minimize_scalar  # type: ignore[import-untyped]

    _check_kind(kind)
    if len(y) == 0:
        raise InputError("cannot fit a temperature on an empty holdout")
    z = np.asarray(logits, np.float64)
    res = minimize_scalar(
        lambda log_t: nll(probabilities(z, kind, float(np.exp(log_t))), y, kind),
        bounds=_LOG_T_RANGE,
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(res.x))


def _final_dense(model: Any) -> Any:
    layer = model.layers[-1]
    activation = getattr(getattr(layer, "activation", None), "__name__", None)
    if not hasattr(layer, "kernel") or activation not in KINDS:
        raise CloudError(
            f"model {model.name!r} does not end in a Dense softmax/sigmoid layer: cannot fold a temperature"
        )
    return layer


def logits(model: Any, inputs: Mapping[str, np.ndarray] | np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The final layer's pre-activation ``z = h @ W + b`` on ``inputs`` (float, exact: no log of rounded probabilities)."""
    import keras

    layer = _final_dense(model)
    hidden = keras.Model(model.inputs, layer.input).predict(inputs, batch_size=batch_size, verbose=0)
    kernel, bias = (np.asarray(w, np.float64) for w in layer.get_weights())
    return np.asarray(np.asarray(hidden, np.float64) @ kernel + bias)


def output_kind(model: Any) -> str:
    """``"softmax"`` or ``"sigmoid"``: the final layer's activation."""
    return str(_final_dense(model).activation.__name__)


def fold_temperature(model: Any, temperature: float) -> None:
    """Divide the final Dense layer's kernel and bias by ``temperature``, in place: the model now outputs ``f(z / T)``."""
    if not (temperature > 0 and np.isfinite(temperature)):
        raise InputError(f"temperature {temperature!r} must be a positive number")
    layer = _final_dense(model)
    layer.set_weights([np.asarray(w) / np.float32(temperature) for w in layer.get_weights()])


def reliability_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], kind: str, title: str) -> Figure:
    """Reliability diagram: one line per ``label -> (probabilities, labels)``, ECE in the legend."""
    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect")
    for label, (p, y) in curves.items():
        conf, freq, _ = reliability(p, y, kind)
        ax.plot(conf, freq, marker="o", label=f"{label} (ECE {ece(p, y, kind):.3f})")
    ax.set_xlabel("mean predicted probability" if kind == "sigmoid" else "confidence (top class)")
    ax.set_ylabel("observed frequency" if kind == "sigmoid" else "accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    return fig
