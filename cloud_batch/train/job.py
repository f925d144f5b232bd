"""The skeleton every training job shares: claim a version, fit, quantize, gate, register, report.

A job module keeps only what is its own (data, model, metrics, figure). The order lives
here once: the version is claimed before the expensive fit, nothing is written before the
gate passes, and the report goes beside the registered version.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cloud_batch.errors import InputError
from cloud_batch.progress import Reporter
from cloud_batch.registry.models import Registry
from cloud_batch.train.evalreport import write_report
from cloud_batch.train.gate import Gate
from cloud_batch.train.quantize import MODES, representative_samples, to_quantized_tflite
from cloud_batch.train.reference import build_reference
from cloud_batch.train.result import TrainResult
from cloud_batch.train.tf_env import quiet_native_output, seed_everything, tensorflow
from edge_agent.wire.model.manifest import Manifest


@dataclass(frozen=True)
class TrainOptions:
    """What every training job takes: where to register, which version, and how to train (the CLI's shared flags)."""

    registry_dir: str | Path
    version: str | None
    epochs: int
    seed: int
    progress: bool


class TrainJob:
    """One training run of model ``name``: its version, options, progress and gate, and what the fit left.

    ``metric_label`` names the gated metric in status lines (``"accuracy"``, ``"AUC"``).
    """

    def __init__(self, name: str, options: TrainOptions, gate: Gate, quantization: str, metric_label: str) -> None:
        if options.epochs < 1:
            raise InputError(f"epochs must be at least 1, got {options.epochs}")
        if quantization not in MODES:
            raise InputError(f"unknown quantization {quantization!r}; use one of {list(MODES)}")
        self.name, self.epochs, self.seed, self.gate = name, options.epochs, options.seed, gate
        self.quantization, self.metric_label = quantization, metric_label
        self.report = Reporter(options.progress)
        self.registry = Registry(options.registry_dir)
        self.version = options.version or self.registry.next_version(name)
        self.registry.require_free(name, self.version)
        self.train_seconds = 0.0
        self.history: dict[str, list[Any]] = {}
        # What the drift reference is built from: the training inputs (``quantize``'s calibration
        # set) and the float model's held-out predictions (``fit_predict``).
        self.training_inputs: Mapping[str, np.ndarray] = {}
        self.float_predictions: Any = None

    def status(self, message: str) -> None:
        self.report.status(message)

    def tensorflow(self) -> Any:
        """Load TensorFlow (edge runtime first) and seed it: call before building the model."""
        tf = tensorflow()
        seed_everything(self.seed)
        return tf

    def fit_predict(
        self, model: Any, x: Any, y: np.ndarray, x_test: Any, *, batch_size: int, predict_batch_size: int | None = None
    ) -> Any:
        """Fit ``model`` with native output muted and a progress bar; return its float predictions on ``x_test``."""
        t0 = time.perf_counter()
        with quiet_native_output():
            fit = model.fit(
                x,
                y,
                epochs=self.epochs,
                batch_size=batch_size,
                shuffle=True,
                verbose=0,
                callbacks=[self.report.keras_callback(self.epochs, f"{self.name} {self.version}")],
            )
            self.train_seconds = time.perf_counter() - t0
            self.history = fit.history
            self.float_predictions = model.predict(x_test, batch_size=predict_batch_size, verbose=0)
            return self.float_predictions

    def quantize(self, model: Any, calibration: Mapping[str, np.ndarray], float_value: float) -> bytes:
        """The full-integer TFLite of ``model``, calibrated on (a seeded sample of) the training inputs."""
        self.status(
            f"float {self.metric_label} {float_value:.4f}; "
            f"quantizing ({self.quantization}, calibrated on the training split)"
        )
        self.training_inputs = calibration
        return to_quantized_tflite(model, representative_samples(calibration, seed=self.seed), self.quantization)

    def register(
        self, path: Path, float_value: float, quant_value: float, metrics: dict[str, Any], **kwargs: Any
    ) -> Manifest:
        """Gate the quantized model (QualityGateError, nothing written, on refusal), then register it."""
        self.status(
            f"{self.quantization} {self.metric_label} {quant_value:.4f} (float {float_value:.4f}); "
            "checking the quality gate"
        )
        self.gate.check(float_value, quant_value, metrics)
        kwargs["extra"] = {**kwargs.get("extra", {}), "reference": self.drift_reference(kwargs)}
        return self.registry.register(path, self.name, self.version, metrics=metrics, **kwargs)

    def drift_reference(self, register_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The manifest's drift reference (``train/reference.py``): training-input bins, predicted-class fractions."""
        preds = self.float_predictions
        if not isinstance(preds, Mapping):  # one output: named by the job's rename (``output_0`` -> ``probs``)
            renamed = list((register_kwargs.get("rename_outputs") or {}).values())
            preds = {renamed[0]: preds} if preds is not None and len(renamed) == 1 else {}
        names = (register_kwargs.get("extra") or {}).get("feature_names")
        return build_reference(self.training_inputs, preds, names if isinstance(names, Mapping) else None, self.seed)

    def finish(self, manifest: Manifest, metrics: dict[str, Any], extra: dict[str, Any], figure: Figure) -> TrainResult:
        """Write the report (``eval.json`` with ``extra``, ``eval.png``) beside the version and return the result."""
        gate = self.gate
        data = {
            "name": self.name,
            "version": self.version,
            "metrics": metrics,
            "gate": {"metric": gate.metric, "minimum": gate.minimum, "max_drop": gate.max_drop},
            "train_seconds": round(self.train_seconds, 2),
            "history": {k: [round(float(v), 5) for v in vs] for k, vs in self.history.items()},
            "model_bytes": manifest.size,
            "sha256": manifest.sha256,
            **extra,
        }
        eval_dir = write_report(self.registry.eval_dir(self.name, self.version), data, figure)
        self.status(f"registered {self.name} {self.version} ({manifest.size} bytes); report in {eval_dir}")
        path = self.registry.path(self.name, self.version)
        return TrainResult(manifest=manifest, path=path, eval_dir=eval_dir, metrics=metrics)
