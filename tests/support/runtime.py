"""Loading the models of tests/modelzoo.py into the TFLite runtime, and comparing real-valued outputs.

Shared by ``tests/test_runtime.py``, ``tests/test_runtime_errors.py`` and ``tests/test_runtime_quantize.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_agent.inference.modelpack import sha256_file
from edge_agent.inference.runtime import LoadedModel, RuntimeOptions, inspect_model
from edge_agent.wire.model.manifest import Manifest
from tests.modelzoo import Zoo

QUANTIZED = ("int8", "uint8", "multi_io", "fixed_batch")


def manifest_for(path: Path, name: str = "zoo") -> Manifest:
    ins, outs = inspect_model(path)
    return Manifest(
        name=name, version="1", sha256=sha256_file(path), size=path.stat().st_size, inputs=ins, outputs=outs
    )


def load(zoo: Zoo, model: str, options: RuntimeOptions | None = None) -> LoadedModel:
    path = zoo.path(model)
    return LoadedModel(path, manifest_for(path, model), options)


def assert_close(model: LoadedModel, got: dict[str, np.ndarray], want: dict[str, np.ndarray], steps: float = 1) -> None:
    """Real-valued outputs agree within ``steps`` quantization steps (quantized) or 1e-4 (float)."""
    assert set(got) == set(want)
    for name, w in want.items():
        spec = model.manifest.output(name)
        assert spec is not None
        g = got[name]
        assert g.shape == w.shape, name
        assert g.dtype == np.float32, name
        tol = steps * spec.quantization.scale * (1 + 1e-6) if spec.quantization else 1e-4
        err = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)))) if g.size else 0.0
        assert err <= tol, f"{name}: max abs error {err} > {tol}"
