"""``--manifest FILE.json``: fields a user attaches to a model that was not trained here (docs/vision.md).

``edge-agent models install`` and ``cloud-batch register`` read the file with :func:`load_fields`
and merge it into the manifest they generate from the ``.tflite``. The merge is generic over
manifest fields: a field replaces the generated one (``preprocessing``, ``postprocessing``,
``labels``, ``metrics``, ``validation``, ``precomputed``, ``max_batch``, ...), except

- ``inputs`` / ``outputs``: ``{"tensor name in the model": "API name"}`` renames (the TFLite
  name is kept as the spec's ``tensor``); dtypes, shapes and quantization always come from the model;
- the identity of the artifact, which the file may not set: :data:`PROTECTED`.

The result is validated by the manifest parser (``Manifest.from_dict``), so a bad field is a
ManifestError that names it, before anything is installed or registered.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_agent.errors import ManifestError
from edge_agent.jsonlimits import loads_limited
from edge_agent.wire.model.manifest import MAX_JSON_DEPTH, Manifest

PROTECTED = frozenset({"schema_version", "name", "version", "file", "sha256", "size", "golden", "created_at"})
RENAMES = ("inputs", "outputs")
MAX_FIELDS_BYTES = 1024 * 1024


def check_fields(fields: Any, where: str = "--manifest") -> dict[str, Any]:
    """The fields as a dict; ManifestError for a protected key or a malformed rename."""
    if not isinstance(fields, Mapping):
        raise ManifestError(f"{where}: expected a JSON object of manifest fields")
    bad = sorted(PROTECTED & set(fields))
    if bad:
        raise ManifestError(f"{where}: {bad} describe the model file itself and cannot be set")
    for key in RENAMES:
        value = fields.get(key)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ManifestError(f"{where}.{key}: expected {{'tensor name': 'new name'}}")
        if not all(isinstance(v, str) and v for v in value.values()):
            raise ManifestError(f"{where}.{key}: new names must be non-empty strings")
    return dict(fields)


def load_fields(path: str | Path) -> dict[str, Any]:
    """Read and check a ``--manifest`` file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ManifestError(f"--manifest {p}: {exc.strerror or exc}") from exc
    if len(data) > MAX_FIELDS_BYTES:
        raise ManifestError(f"--manifest {p}: larger than {MAX_FIELDS_BYTES} bytes")
    raw = loads_limited(data, max_depth=MAX_JSON_DEPTH, what=f"--manifest {p}", error=ManifestError)
    return check_fields(raw, f"--manifest {p.name}")


def _rename(specs: list[dict[str, Any]], renames: Mapping[str, str], key: str) -> list[dict[str, Any]]:
    by = {s.get("tensor") or s["name"]: s for s in specs} | {s["name"]: s for s in specs}
    unknown = sorted(set(renames) - set(by))
    if unknown:
        raise ManifestError(f"--manifest.{key}: the model has no tensor {unknown} (it has {sorted(by)})")
    out = []
    for s in specs:
        new = renames.get(s["name"], renames.get(s.get("tensor") or s["name"]))
        out.append(s if new is None else {**s, "name": new, "tensor": s.get("tensor") or s["name"]})
    return out


def merge_manifest(generated: Manifest, fields: Mapping[str, Any]) -> tuple[Manifest, dict[str, dict[str, str]]]:
    """``generated`` with ``fields`` merged in and validated; also the renames applied, per side (old → new)."""
    fields = check_fields(fields)
    raw = generated.to_dict()
    renamed: dict[str, dict[str, str]] = {}
    for key, value in fields.items():
        if key in RENAMES:
            before = [s["name"] for s in raw[key]]
            raw[key] = _rename(raw[key], value, key)
            renamed[key] = {a: s["name"] for a, s in zip(before, raw[key], strict=True) if a != s["name"]}
        else:
            raw[key] = value
    return Manifest.from_dict(raw), renamed


def build_kwargs(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The same fields as keyword arguments of ``build_version_dir`` / ``Registry.register`` (the cloud side)."""
    fields = check_fields(fields)
    named = {"labels": "labels", "preprocessing": "preprocessing", "metrics": "metrics", "validation": "validation"}
    named |= {"inputs": "rename_inputs", "outputs": "rename_outputs"}
    out: dict[str, Any] = {named[k]: v for k, v in fields.items() if k in named}
    extra = {k: v for k, v in fields.items() if k not in named}
    if extra:
        out["extra"] = extra
    return out
