"""Model version directories: build one from a ``.tflite`` file, and verify one before install.

A version directory holds ``model.tflite``, ``manifest.json`` and ``golden.npz``. The
cloud registry, the shipped ``models/`` folder, OTA downloads and the device store all
use this one layout.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import ManifestError, RejectedError
from edge_agent.fsutil import atomic_write_bytes, fsync_tree, sha256_file
from edge_agent.inference.golden import IN, OUT, check_golden, golden_bytes, load_golden, make_golden
from edge_agent.inference.runtime import LoadedModel, ModelSource, RuntimeOptions, inspect_model
from edge_agent.wire.model.manifest import GOLDEN_FILE, MANIFEST_FILE, MODEL_FILE, Manifest, TensorSpec
from edge_agent.wire.names import check_name, parse_version


def _renamed(specs: list[TensorSpec], names: Mapping[str, str] | None) -> list[TensorSpec]:
    if not names:
        return specs
    unknown = set(names) - {s.name for s in specs}
    if unknown:
        raise ManifestError(f"cannot rename unknown tensors {sorted(unknown)}; the model has {[s.name for s in specs]}")
    return [
        TensorSpec(names.get(s.name, s.name), s.dtype, s.shape, s.quantization, s.tensor or s.name)
        if s.name in names
        else s
        for s in specs
    ]


def build_version_dir(
    tflite: str | Path,
    out_dir: str | Path,
    *,
    name: str,
    version: str,
    golden_inputs: Mapping[str, np.ndarray] | None = None,
    golden: Mapping[str, np.ndarray] | None = None,
    labels: list[str] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    rename_inputs: Mapping[str, str] | None = None,
    rename_outputs: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Manifest:
    """Write a complete version directory for ``tflite`` into ``out_dir`` and return its manifest.

    The input/output specs are read from the model. Golden samples are ``golden`` when
    given (checked against the model), else produced by running ``golden_inputs`` or
    random spec-conforming inputs.
    """
    check_name(name)
    parse_version(version)
    src = Path(tflite)
    if not src.is_file():
        raise ManifestError(f"model file not found: {src}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out / MODEL_FILE)
    ins, outs = inspect_model(out / MODEL_FILE)
    manifest = Manifest(
        name=name,
        version=version,
        sha256=sha256_file(out / MODEL_FILE),
        size=(out / MODEL_FILE).stat().st_size,
        inputs=_renamed(ins, rename_inputs),
        outputs=_renamed(outs, rename_outputs),
        labels=list(labels) if labels else None,
        preprocessing=dict(preprocessing or {}),
        metrics=dict(metrics or {}),
        extra=dict(extra or {}),
    )
    model = LoadedModel(out / MODEL_FILE, manifest, RuntimeOptions(num_threads=1, pool_size=1))
    if golden is not None:
        samples = dict(golden)
        check_golden(model, samples)
    else:
        samples = make_golden(model, golden_inputs)
    atomic_write_bytes(out / GOLDEN_FILE, golden_bytes(samples))
    atomic_write_bytes(out / MANIFEST_FILE, manifest.to_json().encode())
    return manifest


# (version dir, its verified manifest) -> what to load: the file, or bytes (a sealed model opened in memory)
Opener = Callable[[Path, Manifest], ModelSource]


def verify_version_dir(
    path: str | Path, *, run_golden: bool = True, options: RuntimeOptions | None = None, opener: Opener | None = None
) -> Manifest:
    """Check a version directory: manifest valid, sha256 and size match, golden samples reproduce.

    sha256 and size are those of the file on disk (the ciphertext of a sealed model); ``opener``
    says what to load for the golden check (default: the file itself).
    """
    d = Path(path)
    manifest = Manifest.load(d / MANIFEST_FILE)
    model_file = d / manifest.file
    if not model_file.is_file():
        raise ManifestError(f"{d}: model file {manifest.file} missing")
    size = model_file.stat().st_size
    if size != manifest.size:
        raise RejectedError(f"{manifest.name} {manifest.version}: size {size} != manifest size {manifest.size}")
    digest = sha256_file(model_file)
    if digest != manifest.sha256:
        raise RejectedError(
            f"{manifest.name} {manifest.version}: sha256 mismatch ({digest[:12]}… != {manifest.sha256[:12]}…)"
        )
    if run_golden:
        source = opener(d, manifest) if opener is not None else model_file
        check_specs(manifest, *inspect_model(source))
        if manifest.golden:
            model = LoadedModel(source, manifest, options or RuntimeOptions(num_threads=1, pool_size=1))
            check_golden(model, load_golden(d / manifest.golden))
    return manifest


def check_specs(manifest: Manifest, model_ins: list[TensorSpec], model_outs: list[TensorSpec]) -> None:
    """Raise ManifestError when the manifest's tensors disagree with the model file's own (dtype, shape, quantization)."""
    where = f"{manifest.name} {manifest.version}"
    for side, declared, actual in (("input", manifest.inputs, model_ins), ("output", manifest.outputs, model_outs)):
        if len(declared) != len(actual):
            raise ManifestError(f"{where}: manifest lists {len(declared)} {side}s, the model has {len(actual)}")
        by_tensor = {a.tensor or a.name: a for a in actual}
        by_name = {a.name: a for a in actual}
        for spec in declared:
            a = by_tensor.get(spec.tensor or spec.name) or by_name.get(spec.name)
            if a is None:
                raise ManifestError(f"{where}: {side} {spec.name!r} is not in the model (it has {sorted(by_name)})")
            q, mq = spec.quantization, a.quantization
            if q is None or mq is None:
                same_q = q is mq
            else:
                same_q = abs(q.scale - mq.scale) <= 1e-6 * mq.scale and q.zero_point == mq.zero_point
            if spec.dtype != a.dtype or tuple(spec.shape) != tuple(a.shape) or not same_q:
                raise ManifestError(
                    f"{where}: manifest {side} {spec.name!r} is {spec.dtype} {list(spec.shape)} quantization "
                    f"{q.to_dict() if q else None}, but the model's tensor is {a.dtype} {list(a.shape)} "
                    f"quantization {mq.to_dict() if mq else None}"
                )


def apply_manifest_fields(version_dir: str | Path, fields: Mapping[str, Any]) -> Manifest:
    """Merge ``--manifest`` fields (``wire/model/merge.py``) into a built version directory, in place.

    Only JSON is touched (the model is never loaded here): the manifest is merged and validated,
    and golden samples follow any tensor renames.
    """
    from edge_agent.wire.model.merge import merge_manifest

    d = Path(version_dir)
    manifest, renamed = merge_manifest(Manifest.load(d / MANIFEST_FILE), fields)
    if any(renamed.values()) and manifest.golden:
        prefix = {"inputs": IN, "outputs": OUT}
        samples = load_golden(d / manifest.golden)
        for side, names in renamed.items():
            for old, new in names.items():
                samples[prefix[side] + new] = samples.pop(prefix[side] + old)
        atomic_write_bytes(d / manifest.golden, golden_bytes(samples))
    atomic_write_bytes(d / MANIFEST_FILE, manifest.to_json().encode())
    return manifest


def copy_version_dir(src: str | Path, parent: str | Path) -> Path:
    """Copy ``src`` into a fresh hidden temp dir under ``parent``, fsynced, and return it."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    for item in Path(src).iterdir():
        if item.is_file() and not item.name.startswith("."):
            shutil.copyfile(item, tmp / item.name)
    fsync_tree(tmp)
    return tmp
