"""Golden samples: a few inputs with their expected outputs, kept beside a model version.

They prove on the device that the model file loads and computes what the cloud saw.
Stored as ``golden.npz`` with arrays ``in:<input name>`` and ``out:<output name>``,
outputs in real (dequantized) values.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import ManifestError, ValidationError
from edge_agent.inference.runtime import LoadedModel

IN, OUT = "in:", "out:"


def make_golden(
    model: LoadedModel, inputs: Mapping[str, np.ndarray] | None = None, n: int = 4
) -> dict[str, np.ndarray]:
    """Run ``inputs`` (or ``n`` random spec-conforming samples) and record the outputs."""
    feeds = dict(inputs) if inputs is not None else model.example_inputs(batch=n, seed=1234)
    outs = model.predict(feeds)
    samples = {IN + k: np.asarray(v) for k, v in feeds.items()}
    samples.update({OUT + k: np.asarray(v) for k, v in outs.items()})
    return samples


def golden_bytes(samples: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **samples)
    return buf.getvalue()


def load_golden(path: str | Path) -> dict[str, np.ndarray]:
    """Read a golden file, rejecting anything that is not a plain npz of arrays."""
    try:
        with np.load(path, allow_pickle=False) as data:
            samples = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # truncated/corrupt npz: EOFError, BadZipFile
        raise ManifestError(f"golden samples {Path(path).name} unreadable: {exc}") from exc
    if not any(k.startswith(IN) for k in samples) or not any(k.startswith(OUT) for k in samples):
        raise ManifestError(f"golden samples {Path(path).name} need 'in:<name>' and 'out:<name>' arrays")
    return samples


def check_golden(model: LoadedModel, samples: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Re-run the golden inputs; raise ValidationError when an output is off by more than tolerance.

    Tolerance per output is ``atol + rtol*|expected|``, plus ``quant_steps`` quantization
    steps for quantized outputs (different TFLite builds may round one step apart).
    Returns the worst absolute error per output.
    """
    feeds = {k[len(IN) :]: v for k, v in samples.items() if k.startswith(IN)}
    expected = {k[len(OUT) :]: v for k, v in samples.items() if k.startswith(OUT)}
    got = model.predict(feeds)
    tol = model.manifest.validation
    atol, rtol = float(tol.get("atol", 0.0)), float(tol.get("rtol", 0.0))
    steps = float(tol.get("quant_steps", 1))
    worst: dict[str, Any] = {}
    for name, want in expected.items():
        spec = model.manifest.output(name)
        if spec is None or name not in got:
            raise ValidationError(f"golden output {name!r} is not an output of the model")
        have = got[name]
        if have.shape != want.shape:
            raise ValidationError(f"golden output {name!r}: shape {list(have.shape)} != expected {list(want.shape)}")
        a = atol + (steps * spec.quantization.scale if spec.quantization else 1e-5)
        have64, want64 = have.astype(np.float64), want.astype(np.float64)
        with np.errstate(invalid="ignore"):  # NaN/inf: equal values (both NaN, same inf) match, others fail
            same = (have64 == want64) | (np.isnan(have64) & np.isnan(want64))
            err = np.where(same, 0.0, np.abs(have64 - want64))
            limit = a + rtol * np.abs(np.where(np.isfinite(want64), want64, 0.0))
        worst[name] = float(err.max()) if err.size else 0.0
        if not np.all(err <= limit):
            raise ValidationError(
                f"golden output {name!r} differs: max abs error {worst[name]:.6g} above tolerance {float(limit.max()):.6g}"
            )
    return worst
