"""Train, quantize, gate and register the ``digits`` model (8x8 handwritten digits).

The served contract:

* input ``pixels``: FP32 ``[batch, 8, 8, 1]``, raw pixel intensities 0..16 (as in
  scikit-learn's ``load_digits``); the model rescales them itself, so clients never
  need to know the training normalisation;
* output ``probs``: FP32 ``[batch, 10]`` class probabilities for labels ``"0"``..``"9"``.

The data ships with scikit-learn (no download), so the job runs offline and in CI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cloud_batch.train.device_eval import predict_batched, staged_model
from cloud_batch.train.evalreport import confusion_figure
from cloud_batch.train.gate import Gate
from cloud_batch.train.job import TrainJob, TrainOptions
from cloud_batch.train.result import TrainResult

NAME = "digits"
LABELS = [str(i) for i in range(10)]
PREPROCESSING = {"kind": "image", "height": 8, "width": 8, "channels": 1, "range": [0, 16], "invert": True}
DEFAULT_EPOCHS = 20
TEST_FRACTION = 0.25


def load_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as raw float32 ``[N, 8, 8, 1]`` images (0..16), split stratified and seeded: x_train, x_test, y_train, y_test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.images.astype(np.float32)[..., None]
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y, random_state=seed)
    return x_tr, x_te, y_tr, y_te


def build_model() -> Any:
    """A small CNN; the Rescaling layer makes raw 0..16 pixels the model's input contract."""
    import keras

    inp = keras.Input((8, 8, 1), name="pixels")
    x = keras.layers.Rescaling(1.0 / 16.0)(inp)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    out = keras.layers.Dense(10, activation="softmax", name="probs")(x)
    model = keras.Model(inp, out, name=NAME)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _golden_inputs(x_test: np.ndarray, y_test: np.ndarray) -> dict[str, np.ndarray]:
    """One real held-out image per class: proves on the device that every label still comes out right."""
    idx = [int(np.flatnonzero(y_test == c)[0]) for c in range(10)]
    return {"pixels": x_test[idx]}


def train_digits(
    registry_dir: str | Path,
    version: str | None = None,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    progress: bool = True,
    *,
    min_accuracy: float = 0.95,
    max_drop: float = 0.01,
) -> TrainResult:
    """Train the digits CNN, quantize it, and register it if the quantized model passes the gate.

    The gate refuses (QualityGateError, nothing written) when held-out int8 accuracy is
    below ``min_accuracy`` or more than ``max_drop`` below the float model. The nightly pipeline
    (``cloud_batch.pipeline``) trains this network on base + field rows.
    """
    options = TrainOptions(registry_dir, version, epochs, seed, progress)
    job = TrainJob(NAME, options, Gate("accuracy", min_accuracy, max_drop), "int8", "accuracy")
    version, quantization = job.version, job.quantization

    job.status(f"digits {version}: loading data (sklearn load_digits)")
    x_tr, x_te, y_tr, y_te = load_split(seed)
    tf = job.tensorflow()
    model = build_model()
    job.status(f"training on {len(x_tr)} images, holding out {len(x_te)} (TensorFlow {tf.__version__})")
    float_pred = job.fit_predict(model, x_tr, y_tr, x_te, batch_size=32).argmax(axis=1)
    float_acc = float((float_pred == y_te).mean())

    tflite = job.quantize(model, {"pixels": x_tr}, float_acc)
    rename = {"output_0": "probs"}
    with staged_model(tflite, NAME, rename_outputs=rename) as (path, served):
        probs = predict_batched(served, {"pixels": x_te})["probs"]
        quant_pred = probs.argmax(axis=1)
        quant_acc = float((quant_pred == y_te).mean())
        metrics: dict[str, Any] = {
            "float_accuracy": round(float_acc, 4),
            "int8_accuracy": round(quant_acc, 4),
            "accuracy_drop": round(float_acc - quant_acc, 4),
            "float_int8_agreement": round(float((quant_pred == float_pred).mean()), 4),
            "quantization": quantization,
            "n_train": len(x_tr),
            "n_test": len(x_te),
            "epochs": epochs,
            "seed": seed,
            "dataset": "sklearn.datasets.load_digits",
        }
        manifest = job.register(
            path,
            float_acc,
            quant_acc,
            metrics,
            golden_inputs=_golden_inputs(x_te, y_te),
            labels=LABELS,
            preprocessing=PREPROCESSING,
            rename_outputs=rename,
        )

    cm = np.zeros((10, 10), dtype=np.int64)
    np.add.at(cm, (y_te, quant_pred), 1)
    figure = confusion_figure(
        cm,
        LABELS,
        {"float": float_acc, quantization: quant_acc},
        min_accuracy,
        f"digits {version}: {quantization} confusion",
    )
    return job.finish(manifest, metrics, {"confusion_matrix_int8": cm}, figure)
