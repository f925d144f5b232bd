"""``cloud-batch register`` keeps a model's clients working: generic names inherited, signature changes refused.

Before a version is written, its tensors are read from the ``.tflite``; generic names
(``output_0``...) that ``--manifest`` does not rename take the registry's latest version's
names by position (``wire.signature.positional_names``), and the resulting signature is
compared with that version's (``wire.signature``, the rule the devices apply too). A
difference is refused unless ``breaking``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cloud_batch.errors import RegistryError, input_errors
from cloud_batch.registry.models import Registry
from edge_agent.inference.golden import load_golden
from edge_agent.inference.interpreter import inspect_model
from edge_agent.wire.model.manifest import Manifest, TensorSpec
from edge_agent.wire.model.signature import positional_names, spec_differences


def _renamed(specs: list[TensorSpec], names: Mapping[str, str]) -> list[TensorSpec]:
    return [TensorSpec(names.get(s.name, s.name), s.dtype, s.shape, s.quantization, s.tensor) for s in specs]


def register_compatible(
    registry: Registry,
    tflite: str | Path,
    name: str,
    version: str,
    *,
    breaking: bool = False,
    golden: str | Path | Mapping[str, np.ndarray] | None = None,
    **fields: Any,
) -> tuple[Manifest, dict[str, str], list[str]]:
    """Register like ``Registry.register``; return (manifest, names taken from the previous version, changes)."""
    latest = registry.latest(name)
    if latest is None or latest == version:
        return registry.register(tflite, name, version, golden=golden, **fields), {}, []
    previous = registry.manifest(name, latest)
    if not Path(tflite).is_file():
        raise RegistryError(f"model file not found: {tflite}")
    with input_errors():
        ins, outs = inspect_model(Path(tflite))
    taken: dict[str, str] = {}
    for key, specs, prev in (("rename_inputs", ins, previous.inputs), ("rename_outputs", outs, previous.outputs)):
        given = dict(fields.get(key) or {})
        auto = {k: v for k, v in positional_names(specs, prev).items() if k not in given}
        if auto:
            fields[key] = {**auto, **given}
            taken |= auto
    new_in, new_out = (
        _renamed(ins, fields.get("rename_inputs") or {}),
        _renamed(outs, fields.get("rename_outputs") or {}),
    )
    changes = spec_differences(previous.inputs, previous.outputs, new_in, new_out)
    if changes and not breaking:
        raise RegistryError(
            f"{name} {version} changes the signature of {name} {latest} ({'; '.join(changes)}): "
            "its clients would break; register it with --breaking if that is intended"
        )
    if golden is not None and taken:  # golden samples named after the model's own tensors follow the renames
        with input_errors():
            samples = load_golden(golden) if isinstance(golden, (str, Path)) else dict(golden)
        golden = {_golden_key(k, taken): v for k, v in samples.items()}
    return registry.register(tflite, name, version, golden=golden, **fields), taken, changes


def _golden_key(key: str, names: Mapping[str, str]) -> str:
    side, _, tensor = key.partition(":")
    return f"{side}:{names.get(tensor, tensor)}"
