"""Run a candidate ``.tflite`` exactly as a device will, to measure it before it is registered.

The numbers that gate a model must come from the edge runtime (``edge_agent.inference.runtime``:
tflite-runtime, the same input quantization and output dequantization, the same tensor
names after renaming), not from TensorFlow's own interpreter, or the gate would vouch for
something the device never runs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cloud_batch.errors import CloudError
from edge_agent.errors import EdgeError
from edge_agent.inference.modelpack import build_version_dir
from edge_agent.inference.runtime import LoadedModel, RuntimeOptions
from edge_agent.wire.model.manifest import MODEL_FILE


@contextmanager
def staged_model(
    tflite: bytes,
    name: str,
    rename_inputs: Mapping[str, str] | None = None,
    rename_outputs: Mapping[str, str] | None = None,
) -> Iterator[tuple[Path, LoadedModel]]:
    """Write ``tflite`` to a temp file and yield ``(path, LoadedModel)`` with the served tensor names."""
    with tempfile.TemporaryDirectory(prefix="cloud-batch-candidate-") as tmp:
        path = Path(tmp) / f"{name}.tflite"
        path.write_bytes(tflite)
        try:
            manifest = build_version_dir(
                path,
                Path(tmp) / "staged",
                name=name,
                version="0",
                rename_inputs=rename_inputs,
                rename_outputs=rename_outputs,
            )
            model = LoadedModel(Path(tmp) / "staged" / MODEL_FILE, manifest, RuntimeOptions(pool_size=1))
        except EdgeError as exc:
            raise CloudError(f"the edge runtime cannot run the candidate {name} model: {exc}") from exc
        yield path, model


def predict_batched(model: LoadedModel, inputs: Mapping[str, np.ndarray], batch: int = 256) -> dict[str, np.ndarray]:
    """``model.predict`` over ``inputs`` in chunks of ``batch`` rows (at most the model's ``max_batch``), concatenated."""
    total = len(next(iter(inputs.values())))
    batch = min(batch, model.max_batch)
    parts = [model.predict({k: v[i : i + batch] for k, v in inputs.items()}) for i in range(0, total, batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
