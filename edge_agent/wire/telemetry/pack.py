"""Prediction packs: many prediction records in one outbox row and one wire record (kind ``predictions``).

The agent's telemetry writer commits each flush's predictions as packs: one per model version and
output shape, at most :data:`MAX_PACK` predictions. A pack keeps its columns as numbers (base64 of the
little-endian bytes), so building and committing one costs the agent ~3 µs per prediction, where one
JSON row per prediction cost ~14 µs of the GIL that serves requests (docs/benchmarks.md, "Telemetry packs").
The pack's body, JSON::

    {"model": "digits", "version": "2", "n": 3,
     "ids": ["a1b2c3d4-7", ...],                     # request ids, in seq order
     "ts": T, "latency_ms": T,                        # T: a tensor, below; FP64 and FP32 [n]
     "outputs": {"probs": {"top_k": {"index": T, "score": T}}},   # INT32 / FP32 [n, m, k] (classifiers,
                                                                  #   outputs over 16 values), or
                {"y": {"values": T}}},                            # [n, *shape] (small outputs, whole)
     "entity_ids": [...],                            # optional: one per prediction, null where none
     "inputs": [{"name": "pixels", "rows": [0, 2], "shape": [1, 8, 8, 1], "datatype": "FP32", "b64": ...}],
     "inputs_dropped": [1]}                          # optional: rows whose sampled inputs were stripped

A tensor ``T`` is ``{"shape", "datatype", "b64"}``, the same object a sampled input is (:func:`sample_array`).
A ``predictions`` wire record's ``seq`` is its pack's *last*; its predictions have seqs ``seq - n + 1 .. seq``
in row order. :func:`expand` turns a pack back into the ``prediction`` record bodies an agent without
packs sends, so ingest and the store see one shape.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge_agent.wire.model.manifest import NUMPY_TO_V2, V2_TO_NUMPY

PACK_KIND = "predictions"
MAX_PACK = 256  # predictions per pack as the agent builds them
MAX_PACK_DECODE = 4096  # the most a decoder accepts in one pack
_encode = json.JSONEncoder(separators=(",", ":"), check_circular=False, allow_nan=False).encode
_text = json.encoder.encode_basestring_ascii


def tensor_text(arr: np.ndarray) -> str:
    """JSON text of ``arr`` as a tensor object: its shape, V2 datatype and little-endian bytes in base64."""
    le = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    b64 = base64.b64encode(le.tobytes()).decode("ascii")
    return (
        f'{{"shape":{_encode(list(arr.shape))},"datatype":"{NUMPY_TO_V2.get(arr.dtype.name, "FP32")}","b64":"{b64}"}}'
    )


def topk_text(index: np.ndarray, score: np.ndarray) -> str:
    """An output's column of top-k classes: ``index`` and ``score``, both ``[n, m, k]``."""
    return (
        f'{{"top_k":{{"index":{tensor_text(index.astype(np.int32))},"score":{tensor_text(score.astype(np.float32))}}}}}'
    )


def values_text(values: np.ndarray) -> str:
    """An output's column of whole values, ``[n, *shape]``."""
    return f'{{"values":{tensor_text(values)}}}'


def encode(
    model: str,
    version: str,
    ids: Sequence[str],
    ts: np.ndarray,
    latency_ms: np.ndarray,
    outputs: Mapping[str, str],
    entity_ids: Sequence[Any] | None = None,
    inputs: Sequence[tuple[str, Sequence[int], np.ndarray]] = (),
) -> tuple[str, str]:
    """A pack's body and its ids as JSON text (the outbox searches the latter).

    ``outputs``: each output's column (:func:`topk_text` or :func:`values_text`); ``entity_ids``: one per
    prediction, or None when none has one; ``inputs``: ``(name, positions, stacked rows)`` per group of
    sampled inputs.
    """
    ids_text = _encode(list(ids))
    columns = ",".join(f"{_text(name)}:{text}" for name, text in outputs.items())
    body = (
        f'{{"model":{_text(model)},"version":{_text(version)},"n":{len(ids)},"ids":{ids_text},'
        f'"ts":{tensor_text(ts.astype(np.float64))},"latency_ms":{tensor_text(latency_ms.astype(np.float32))},'
        f'"outputs":{{{columns}}}'
    )
    if entity_ids is not None:
        body += f',"entity_ids":{_encode(list(entity_ids))}'
    if inputs:
        groups = ",".join(
            f'{{"name":{_text(name)},"rows":{_encode(list(rows))},{tensor_text(stacked)[1:]}'
            for name, rows, stacked in inputs
        )
        body += f',"inputs":[{groups}]'
    return body + "}", ids_text


def sample_array(tensor: dict[str, Any]) -> np.ndarray:
    """A tensor object (or, from older agents, a sampled input's ``data``) as an array; ValueError when malformed."""
    if not isinstance(tensor, dict):
        raise ValueError("a tensor must be an object")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"tensor shape {shape!r} is not a list of sizes")
    if "b64" in tensor:
        dtype = V2_TO_NUMPY.get(str(tensor.get("datatype")))
        if dtype is None:
            raise ValueError(f"tensor datatype {tensor.get('datatype')!r} is not numeric")
        try:
            raw = base64.b64decode(str(tensor["b64"]), validate=True)
        except ValueError as exc:
            raise ValueError(f"tensor b64 is not base64: {exc}") from None
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)
    return np.asarray(tensor.get("data", []), dtype=np.float64).reshape(shape)


def json_values(arr: np.ndarray) -> Any:
    """``arr`` as nested lists for JSON: floats rounded to 6 decimals, non-finite values as None."""
    if arr.dtype.kind != "f":
        return arr.tolist()
    out = np.round(arr.astype(np.float64), 6)
    finite = np.isfinite(out)
    if finite.all():
        return out.tolist()
    obj = out.astype(object)
    obj[~finite] = None
    return obj.tolist()


def strip_inputs(body: str) -> str:
    """A prediction or pack body without its sampled inputs, marked ``inputs_dropped`` (True, or the pack's rows)."""
    doc = json.loads(body)
    groups = doc.pop("inputs", None)
    if "n" in doc and isinstance(groups, list):
        rows = {r for g in groups for r in g.get("rows", ())} | set(doc.get("inputs_dropped", ()))
        doc["inputs_dropped"] = sorted(rows)
    else:
        doc["inputs_dropped"] = True
    return json.dumps(doc, separators=(",", ":"))


def _tail(tensor: dict[str, Any], k: int) -> str:
    return tensor_text(sample_array(tensor)[k:])


def trim(body: str, k: int) -> tuple[str, str, int]:
    """A pack without its oldest ``k`` predictions: ``(body, ids as JSON, sampled inputs left)``.

    The outbox's bound sheds that way when a whole pack is more than it must drop; the pack's ``seq``
    (its last) stays, so the dropped seqs are a gap, counted like any other drop.
    """
    doc = json.loads(body)
    n = doc["n"] - k
    doc["n"], doc["ids"] = n, doc["ids"][k:]
    for key in ("ts", "latency_ms"):
        doc[key] = json.loads(_tail(doc[key], k))
    for spec in doc["outputs"].values():
        tensors = spec.get("top_k", spec)
        for key, tensor in tensors.items():
            tensors[key] = json.loads(_tail(tensor, k))
    if "entity_ids" in doc:
        doc["entity_ids"] = doc["entity_ids"][k:]
    groups = []
    for group in doc.pop("inputs", []):
        rows = [r - k for r in group["rows"] if r >= k]
        if rows:
            stacked = sample_array(group)[len(group["rows"]) - len(rows) :]
            groups.append({"name": group["name"], "rows": rows, **json.loads(tensor_text(stacked))})
    sampled = len({r for g in groups for r in g["rows"]})
    if groups:
        doc["inputs"] = groups
    if "inputs_dropped" in doc:
        doc["inputs_dropped"] = [r - k for r in doc["inputs_dropped"] if r >= k]
    return json.dumps(doc, separators=(",", ":")), _encode(doc["ids"]), sampled


# -- the cloud's side: a pack back into prediction records ------------------------------------
def _ids(doc: dict[str, Any], key: str, n: int, of: type | None) -> list[Any]:
    value = doc.get(key)
    if not isinstance(value, list) or len(value) != n or (of is not None and not all(isinstance(v, of) for v in value)):
        raise ValueError(f"pack {key} must be a list of {n}" + (f" {of.__name__}" if of else ""))
    return value


def _column(doc: dict[str, Any], key: str, n: int) -> list[float]:
    arr = sample_array(doc.get(key))  # type: ignore[arg-type]
    if arr.shape != (n,) or arr.dtype.kind != "f" or not np.isfinite(arr).all():
        raise ValueError(f"pack {key} must be {n} finite numbers")
    return arr.astype(np.float64).tolist()


def significant6(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to 6 significant digits, as ``float(f"{v:.6g}")`` gives (float64; non-finite values kept)."""
    x = x.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        digits = 5 - np.floor(np.log10(np.abs(x)))
        digits = np.where(np.isfinite(digits), digits, 0)
        scale = 10.0**digits
        out = np.where(digits >= 0, np.round(x * scale) / scale, np.round(x / 10.0**-digits) * 10.0**-digits)
    out = np.where(np.isfinite(x), out, x)
    for i in np.flatnonzero(np.abs(digits) > 22):  # powers of ten beyond 1e22 are inexact: format those few
        out.flat[i] = float(f"{x.flat[i]:.6g}")
    return out


def _output(spec: Any, name: str, n: int) -> list[Any]:
    """The per-prediction JSON values of one output of the pack."""
    if isinstance(spec, dict) and isinstance(spec.get("top_k"), dict):
        index, score = sample_array(spec["top_k"].get("index")), sample_array(spec["top_k"].get("score"))
        if index.ndim != 3 or index.shape != score.shape or index.shape[0] != n or index.dtype.kind not in "iu":
            raise ValueError(f"pack output {name!r} top_k index and score must both be [{n}, m, k] (integer index)")
        scores = significant6(score)
        pairs = np.empty((*index.shape, 2), dtype=object)
        pairs[..., 0] = index
        pairs[..., 1] = scores
        pairs[..., 1][~np.isfinite(scores)] = None
        rows = pairs.tolist()
        return [{"top_k": r[0]} for r in rows] if index.shape[1] == 1 else [{"top_k": r} for r in rows]
    if isinstance(spec, dict) and "values" in spec:
        values = sample_array(spec["values"])
        if values.ndim < 1 or values.shape[0] != n:
            raise ValueError(f"pack output {name!r} values must have {n} rows")
        return list(json_values(values))
    raise ValueError(f"pack output {name!r} must hold top_k or values")


def expand(seq: int, body: dict[str, Any]) -> list[tuple[int, float, dict[str, Any]]]:
    """``(seq, ts, body)`` of each prediction in a pack whose wire seq is ``seq``; ValueError names what is wrong."""
    n = body.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= min(MAX_PACK_DECODE, seq):
        raise ValueError(f"pack n {n!r} is not 1..{min(MAX_PACK_DECODE, seq)}")
    model, version = body.get("model"), body.get("version")
    if not isinstance(model, str) or not isinstance(version, str):
        raise ValueError("pack model and version must be strings")
    ids = _ids(body, "ids", n, str)
    ts, latency = _column(body, "ts", n), _column(body, "latency_ms", n)
    outputs = body.get("outputs")
    if not isinstance(outputs, dict):
        raise ValueError("pack outputs must be an object")
    columns = {name: _output(spec, name, n) for name, spec in outputs.items()}
    entities = _ids(body, "entity_ids", n, None) if "entity_ids" in body else [None] * n
    samples: list[dict[str, Any]] = [{} for _ in range(n)]
    for group in body.get("inputs", []) if isinstance(body.get("inputs", []), list) else [None]:
        if not isinstance(group, dict) or not isinstance(group.get("name"), str) or "b64" not in group:
            raise ValueError("pack inputs must be a list of {name, rows, shape, datatype, b64}")
        rows = group.get("rows")
        stacked = sample_array(group)
        if not isinstance(rows, list) or not all(isinstance(r, int) and 0 <= r < n for r in rows):
            raise ValueError(f"pack inputs {group['name']!r} rows must be positions below {n}")
        if stacked.ndim < 1 or stacked.shape[0] != len(rows):
            raise ValueError(f"pack inputs {group['name']!r} must have one row per position")
        head = {"shape": list(stacked.shape[1:]), "datatype": group["datatype"]}
        for r, arr in zip(rows, stacked, strict=True):
            samples[r][group["name"]] = {**head, "b64": base64.b64encode(arr.tobytes()).decode("ascii")}
    dropped = set(body.get("inputs_dropped", []) or [])
    out = []
    for i in range(n):
        rec: dict[str, Any] = {"model": model, "version": version, "request_id": ids[i],
                               "latency_ms": round(latency[i], 3),
                               "outputs": {name: col[i] for name, col in columns.items()}}  # fmt: skip
        if entities[i] is not None:
            rec["entity_id"] = entities[i]
        if samples[i]:
            rec["inputs"] = samples[i]
        if i in dropped:
            rec["inputs_dropped"] = True
        out.append((seq - n + 1 + i, ts[i], rec))
    return out
