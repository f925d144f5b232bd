"""Model manifests: what a model version is, as JSON beside its ``.tflite`` file.

A manifest carries a ``schema_version``; unknown top-level keys are preserved so an
older agent can round-trip a newer manifest without losing fields.

``feature_joins`` (optional) declares inputs the agent fills from the on-device feature cache
when a request names an entity instead of sending them (``join.py``)::

    "feature_joins": {"asset_features": {"set": "asset_features",
                                         "features": ["temperature_mean_24h", ...],   # input column order
                                         "default": null}}                            # or one number per column

The input must exist and be ``[-1, F]`` with ``F == len(features)``; ``default``, when given, is
the row used for an entity the cached set does not hold (the response flags it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import ManifestError
from edge_agent.jsonlimits import loads_limited
from edge_agent.wire.model.precomputed import Precomputed, parse_precomputed
from edge_agent.wire.model.reference import parse_reference
from edge_agent.wire.model.vision import check_vision
from edge_agent.wire.names import check_name, is_name, is_sha256, parse_version

SCHEMA_VERSION = 1
MODEL_FILE = "model.tflite"
MANIFEST_FILE = "manifest.json"
GOLDEN_FILE = "golden.npz"
MAX_JSON_DEPTH = 32  # a manifest is ~4 levels deep; free-form metrics/preprocessing get the rest

# V2 (Open Inference Protocol) datatype <-> numpy dtype.
V2_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NUMPY_TO_V2: dict[str, str] = {dt.name: v2 for v2, dt in V2_TO_NUMPY.items()}


def list_versions(base: Path) -> list[str]:
    """Version directories (with a manifest) under ``base``, oldest first; other entries are ignored."""
    if not base.is_dir():
        return []
    found = []
    for p in base.iterdir():
        if p.name.startswith(".") or not (p / MANIFEST_FILE).is_file():
            continue
        try:
            parse_version(p.name)
        except ManifestError:
            continue  # e.g. "3.eval" report dirs
        found.append(p.name)
    return sorted(found, key=parse_version)


@dataclass(frozen=True)
class Quantization:
    """Per-tensor affine quantization: ``real = scale * (q - zero_point)``."""

    scale: float
    zero_point: int

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "zero_point": self.zero_point}


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the API exposes it, and how it maps onto the TFLite tensor."""

    name: str
    dtype: str  # the TFLite tensor's numpy dtype name, e.g. "int8", "float32"
    shape: tuple[int, ...]  # -1 marks a dynamic dimension (usually the batch)
    quantization: Quantization | None = None
    tensor: str | None = None  # the TFLite tensor name, when it differs from ``name``

    @property
    def datatype(self) -> str:
        """The V2 datatype clients use by default: FP32 for quantized tensors (real values)."""
        if self.quantization is not None:
            return "FP32"
        return NUMPY_TO_V2.get(self.dtype, "BYTES")

    @property
    def native_datatype(self) -> str:
        """The V2 datatype of the raw TFLite tensor (INT8/UINT8 for quantized ones)."""
        return NUMPY_TO_V2.get(self.dtype, "BYTES")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "datatype": self.datatype,
            "shape": list(self.shape),
            "quantization": self.quantization.to_dict() if self.quantization else None,
        }
        if self.tensor is not None:
            out["tensor"] = self.tensor
        return out

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> TensorSpec:
        if not isinstance(raw, dict):
            raise ManifestError(f"{where}: expected an object, got {type(raw).__name__}")
        try:
            name = raw["name"]
            dtype = raw["dtype"]
            shape = raw["shape"]
        except KeyError as exc:
            raise ManifestError(f"{where}: missing field {exc.args[0]!r}") from exc
        if not isinstance(name, str) or not name:
            raise ManifestError(f"{where}.name: expected a non-empty string")
        if dtype not in NUMPY_TO_V2:
            raise ManifestError(f"{where}.dtype: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= -1 for d in shape):
            raise ManifestError(f"{where}.shape: expected a list of integers (-1 for dynamic)")
        q = raw.get("quantization")
        quant = None
        if q is not None:
            if (
                not isinstance(q, dict)
                or not isinstance(q.get("scale"), (int, float))
                or not isinstance(q.get("zero_point"), int)
            ):
                raise ManifestError(f"{where}.quantization: expected {{'scale': float, 'zero_point': int}}")
            if not q["scale"] > 0:
                raise ManifestError(f"{where}.quantization.scale must be positive")
            quant = Quantization(float(q["scale"]), int(q["zero_point"]))
        tensor = raw.get("tensor")
        if tensor is not None and not isinstance(tensor, str):
            raise ManifestError(f"{where}.tensor: expected a string")
        return cls(name=name, dtype=dtype, shape=tuple(shape), quantization=quant, tensor=tensor)


@dataclass(frozen=True)
class FeatureJoin:
    """One model input filled from a cached feature set: ``features`` in the input's column order."""

    input: str
    set: str
    features: tuple[str, ...]
    default: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "set": self.set,
            "features": list(self.features),
            "default": None if self.default is None else list(self.default),
        }


def parse_feature_joins(raw: Any, inputs: list[TensorSpec]) -> dict[str, FeatureJoin]:
    """Validate ``manifest.feature_joins`` against the model's inputs; ManifestError names the field."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ManifestError("manifest.feature_joins: expected an object {input name: {set, features, default}}")
    specs = {s.name: s for s in inputs}
    out: dict[str, FeatureJoin] = {}
    for name, j in raw.items():
        where = f"manifest.feature_joins[{name!r}]"
        spec = specs.get(name)
        if spec is None:
            raise ManifestError(f"{where}: the model has no input {name!r} (inputs: {sorted(specs)})")
        if not isinstance(j, dict):
            raise ManifestError(f"{where}: expected an object {{set, features, default}}")
        unknown = set(j) - {"set", "features", "default"}
        if unknown:
            raise ManifestError(f"{where}: unknown keys {sorted(unknown)}")
        feature_set = j.get("set")
        if not is_name(feature_set):
            raise ManifestError(f"{where}.set: expected a feature set name (1-64 letters, digits, '_', '.' or '-')")
        features = j.get("features")
        if not isinstance(features, list) or not features or not all(isinstance(f, str) and f for f in features):
            raise ManifestError(f"{where}.features: expected a non-empty list of feature names in input column order")
        if len(set(features)) != len(features):
            raise ManifestError(f"{where}.features: duplicate feature names")
        if len(spec.shape) != 2 or spec.shape[1] < 1:
            raise ManifestError(
                f"{where}: input {name!r} has shape {list(spec.shape)}; a joined input must be "
                "[batch, F] with a fixed F (one row of features per entity)"
            )
        if spec.shape[1] != len(features):
            raise ManifestError(
                f"{where}.features: {len(features)} names for input {name!r} of width "
                f"{spec.shape[1]} (shape {list(spec.shape)})"
            )
        if spec.datatype not in ("FP32", "FP64", "FP16", "INT64", "INT32"):
            raise ManifestError(
                f"{where}: input {name!r} has datatype {spec.datatype}; joined features are numbers "
                "(FP16/FP32/FP64/INT32/INT64)"
            )
        default = j.get("default")
        if default is not None:
            if (
                not isinstance(default, list)
                or len(default) != len(features)
                or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in default
                )
            ):
                raise ManifestError(f"{where}.default: expected null or {len(features)} finite numbers")
            default = tuple(float(v) for v in default)
        out[name] = FeatureJoin(name, feature_set, tuple(features), default)
    return out


def _tensors(raw: dict[str, Any], key: str) -> list[TensorSpec]:
    """``manifest.inputs`` or ``.outputs``: a non-empty list of tensor specs with distinct names."""
    if not isinstance(raw[key], list) or not raw[key]:
        raise ManifestError(f"manifest.{key}: expected a non-empty list")
    specs = [TensorSpec.from_dict(t, f"manifest.{key}[{i}]") for i, t in enumerate(raw[key])]
    names = [t.name for t in specs]
    if len(set(names)) != len(names):
        raise ManifestError(f"manifest.{key}: duplicate tensor names {names}")
    return specs


# The top-level keys parsed into fields; every other key stays in ``Manifest.extra`` (and round-trips).
# Fields written as they are held; the others (tensors, joins, max_batch, reference) have their own form.
_PLAIN_KEYS: tuple[str, ...] = ("name", "version", "file", "sha256", "size", "labels", "preprocessing", "metrics")
_PLAIN_KEYS += ("created_at", "golden", "validation")
_KNOWN_KEYS = {"schema_version", "inputs", "outputs", "feature_joins", "max_batch", "reference", *_PLAIN_KEYS}


@dataclass
class Manifest:
    """Everything the agent needs to know about one model version."""

    name: str
    version: str
    sha256: str
    size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    file: str = MODEL_FILE
    labels: list[str] | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    golden: str | None = GOLDEN_FILE
    # Tolerances used when checking golden samples on the device.
    validation: dict[str, Any] = field(default_factory=lambda: {"atol": 0.0, "rtol": 0.0, "quant_steps": 1})
    extra: dict[str, Any] = field(default_factory=dict)
    # Inputs filled from the feature cache (input name -> join); empty for most models.
    feature_joins: dict[str, FeatureJoin] = field(default_factory=dict)
    max_batch: int | None = None  # the largest batch one request may carry (None: the agent's runtime.max_batch)
    reference: dict[str, Any] | None = None  # drift reference (wire/model/reference.py); None: no drift

    def __post_init__(self) -> None:
        # A writer may pass the raw JSON form through ``extra`` (cloud_batch does): validate it here.
        self.precomputed: Precomputed | None = parse_precomputed(self.extra.get("precomputed"), self.outputs)
        if "feature_joins" in self.extra:
            raw = self.extra["feature_joins"]
            self.extra = {k: v for k, v in self.extra.items() if k != "feature_joins"}  # the caller's dict stays
            if not self.feature_joins:
                self.feature_joins = parse_feature_joins(raw, self.inputs)
        if "reference" in self.extra:
            raw_ref = self.extra["reference"]
            self.extra = {k: v for k, v in self.extra.items() if k != "reference"}
            names = [t.name for t in self.inputs], [t.name for t in self.outputs]
            self.reference = self.reference or parse_reference(raw_ref, *names)

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update({key: getattr(self, key) for key in _PLAIN_KEYS}, schema_version=SCHEMA_VERSION)
        out.update(inputs=[t.to_dict() for t in self.inputs], outputs=[t.to_dict() for t in self.outputs])
        if self.max_batch is not None:
            out["max_batch"] = self.max_batch
        if self.feature_joins:
            out["feature_joins"] = {k: j.to_dict() for k, j in self.feature_joins.items()}
        if self.reference is not None:
            out["reference"] = self.reference
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, raw: Any) -> Manifest:
        """Validate and build a manifest; every problem is a ManifestError naming the field."""
        if not isinstance(raw, dict):
            raise ManifestError("manifest: expected a JSON object")
        schema = raw.get("schema_version")
        if schema != SCHEMA_VERSION:
            raise ManifestError(f"manifest: unsupported schema_version {schema!r} (this agent reads {SCHEMA_VERSION})")
        for key in ("name", "version", "sha256", "size", "inputs", "outputs"):
            if key not in raw:
                raise ManifestError(f"manifest: missing field {key!r}")
        name = check_name(raw["name"])
        version = raw["version"]
        parse_version(version)
        sha = raw["sha256"]
        if not is_sha256(sha):
            raise ManifestError("manifest.sha256: expected 64 lowercase hex digits")
        size = raw["size"]
        if not isinstance(size, int) or size <= 0:
            raise ManifestError("manifest.size: expected a positive integer")
        inputs, outputs = _tensors(raw, "inputs"), _tensors(raw, "outputs")
        labels = raw.get("labels")
        if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
            raise ManifestError("manifest.labels: expected a list of strings")
        file = raw.get("file", MODEL_FILE)
        if not isinstance(file, str) or "/" in file or file.startswith("."):
            raise ManifestError("manifest.file: expected a plain file name")
        golden = raw.get("golden", GOLDEN_FILE)
        if golden is not None and (not isinstance(golden, str) or "/" in golden or golden.startswith(".")):
            raise ManifestError("manifest.golden: expected a plain file name or null")
        max_batch = raw.get("max_batch")
        if max_batch is not None and (type(max_batch) is not int or max_batch < 1):
            raise ManifestError("manifest.max_batch: expected a positive integer or null")
        for key in ("preprocessing", "metrics", "validation"):
            if key in raw and not isinstance(raw[key], dict):
                raise ManifestError(f"manifest.{key}: expected an object")
        check_vision(raw, inputs, [t.name for t in outputs])
        m = cls(
            *(name, version, sha, size, inputs, outputs),
            file=file,
            labels=labels,
            preprocessing=dict(raw.get("preprocessing") or {}),
            metrics=dict(raw.get("metrics") or {}),
            created_at=str(raw.get("created_at") or ""),
            golden=golden,
            extra={k: v for k, v in raw.items() if k not in _KNOWN_KEYS},
            feature_joins=parse_feature_joins(raw.get("feature_joins"), inputs),
            max_batch=max_batch,
            reference=parse_reference(raw.get("reference"), [t.name for t in inputs], [t.name for t in outputs]),
        )
        if "validation" in raw:
            m.validation = dict(raw["validation"])
        return m

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Read and validate a manifest file."""
        try:
            text = Path(path).read_bytes()
        except FileNotFoundError as exc:
            raise ManifestError(f"manifest not found: {path}") from exc
        except OSError as exc:
            raise ManifestError(f"manifest {path} is not readable: {exc}") from exc
        return cls.from_dict(
            loads_limited(text, max_depth=MAX_JSON_DEPTH, what=f"manifest {path}", error=ManifestError)
        )
