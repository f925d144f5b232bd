"""The ``train``, ``quantize`` and ``calibrate`` steps: Keras model → int8 TFLite → temperature folded in.

Every number here that a gate reads comes from the edge runtime (``train.device_eval``), never
from TensorFlow's interpreter. ``quantize`` converts the trained model as ``cloud-batch train``
does; ``calibrate`` fits the temperature on the holdout's float logits, folds it into the
model's last layer and converts again: that second ``.tflite`` is the candidate artifact.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from cloud_batch.pipeline.context import Run, StepResult
from cloud_batch.pipeline.models import ModelSpec, Rows
from cloud_batch.train import calibrate
from cloud_batch.train.device_eval import predict_batched, staged_model
from cloud_batch.train.quantize import representative_samples, to_quantized_tflite
from cloud_batch.train.tf_env import quiet_native_output, seed_everything, tensorflow
from edge_agent.fsutil import atomic_write_bytes, atomic_write_json

MODEL_FILE = "model.keras"
TFLITE = "model.tflite"
PROBS = "probs.npz"


def _rows(run: Run) -> tuple[Rows, Rows]:
    d = run.step_dir("dataset")
    return Rows.load(d / "train.npz"), Rows.load(d / "holdout.npz")


def _load_model(run: Run) -> Any:
    tensorflow()
    import keras

    with quiet_native_output():
        return keras.models.load_model(run.step_dir("train") / MODEL_FILE)


def device_probs(tflite: bytes, spec: ModelSpec, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """``tflite``'s output probabilities on ``inputs``, run by the edge runtime exactly as a device runs it."""
    with staged_model(tflite, spec.name, rename_outputs={"output_0": spec.output}) as (_, served):
        return predict_batched(served, inputs)[spec.output]


def scores(spec: ModelSpec, p: np.ndarray, holdout: Rows) -> dict[str, float]:
    """The gated metric on the whole holdout and on its field slice (NaN when the slice cannot be scored)."""
    f = holdout.field
    field = spec.score(p[f], holdout.y[f]) if f.any() else float("nan")
    return {"holdout": round(spec.score(p, holdout.y), 5), "field": round(field, 5)}


def train(run: Run, out: Path) -> StepResult:
    """Fit the model's network on base + field training rows; save it as ``model.keras``."""
    cfg, spec = run.config.train, run.spec
    tr, hold = _rows(run)
    tf = tensorflow()
    seed_everything(cfg.seed)
    model = spec.build_model(tr)
    t0 = time.perf_counter()
    with quiet_native_output():
        fit = model.fit(
            tr.inputs,
            tr.y.astype(np.float32) if spec.kind == "sigmoid" else tr.y,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            shuffle=True,
            verbose=0,
            callbacks=[run.reporter.keras_callback(cfg.epochs, f"train {spec.name}")],
        )
        p = model.predict(hold.inputs, batch_size=1024, verbose=0)
        model.save(out / MODEL_FILE)
    seconds = time.perf_counter() - t0
    s = scores(spec, p, hold)
    history = {k: [round(float(v), 5) for v in vs] for k, vs in fit.history.items()}
    atomic_write_json(out / "history.json", history)
    line = (
        f"{cfg.epochs} epochs on {len(tr):,} rows ({int(tr.field.sum()):,} from the field) in {seconds:.1f} s "
        f"(TensorFlow {tf.__version__}); float {spec.metric} {s['holdout']:.4f}, field slice {s['field']:.4f}"
    )
    return StepResult(
        line, {"float": s, "train_rows": len(tr), "field_rows": int(tr.field.sum()), "epochs": cfg.epochs}
    )


def quantize(run: Run, out: Path) -> StepResult:
    """Full-integer conversion (the model's mode), calibrated on the training inputs; int8 vs float on the holdout."""
    spec, seed = run.spec, run.config.train.seed
    tr, hold = _rows(run)
    model = _load_model(run)
    tflite = to_quantized_tflite(model, representative_samples(tr.inputs, seed=seed), spec.quantization)
    atomic_write_bytes(out / TFLITE, tflite)
    p = device_probs(tflite, spec, hold.inputs)
    np.savez(out / PROBS, p=p)
    q = scores(spec, p, hold)
    f = run.data("train")["float"]
    drop = round(f["holdout"] - q["holdout"], 5)
    line = f"{spec.quantization} {spec.metric} {q['holdout']:.4f} vs float {f['holdout']:.4f} (drop {drop:+.4f}); {len(tflite):,} bytes"
    return StepResult(line, {"quantized": q, "float": f, "drop": drop, "bytes": len(tflite)})


def calibrate_step(run: Run, out: Path) -> StepResult:
    """Fit T on the holdout's float logits, fold it into the model, convert: the calibrated candidate."""
    spec, seed = run.spec, run.config.train.seed
    tr, hold = _rows(run)
    model = _load_model(run)
    kind = calibrate.output_kind(model)
    z = calibrate.logits(model, hold.inputs)
    temperature = calibrate.fit_temperature(z, hold.y, kind)
    calibrate.fold_temperature(model, temperature)
    tflite = to_quantized_tflite(model, representative_samples(tr.inputs, seed=seed), spec.quantization)
    atomic_write_bytes(out / TFLITE, tflite)
    with np.load(run.step_dir("quantize") / PROBS) as zf:
        before = zf["p"]
    after = device_probs(tflite, spec, hold.inputs)
    np.savez(out / PROBS, before=before, after=after)
    data: dict[str, Any] = {
        "temperature": round(temperature, 5),
        "kind": kind,
        "before": calibrate.measures(before, hold.y, kind),
        "after": calibrate.measures(after, hold.y, kind),
        "scores": scores(spec, after, hold),
        "bins": calibrate.BINS,
        "bytes": len(tflite),
    }
    if hold.field.any():
        data["after_field"] = calibrate.measures(after[hold.field], hold.y[hold.field], kind)
    fig = calibrate.reliability_figure(
        {"before": (before, hold.y), f"after (T={temperature:.3f})": (after, hold.y)},
        kind,
        f"{spec.name}: reliability on the holdout",
    )
    fig.savefig(out / "reliability.png", dpi=90, bbox_inches="tight")
    (out / "calibration.json").write_text(json.dumps(data, indent=2) + "\n")
    b, a = data["before"], data["after"]
    line = (
        f"T={temperature:.3f}: ECE {b['ece']:.4f} -> {a['ece']:.4f}, Brier {b['brier']:.4f} -> {a['brier']:.4f}, "
        f"NLL {b['nll']:.4f} -> {a['nll']:.4f} (holdout, {kind}, in the device runtime)"
    )
    return StepResult(line, data)
