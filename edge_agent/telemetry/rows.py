"""Prediction records as outbox rows, built once per flush on the writer thread.

The writer holds the GIL that serves requests, so what it pays per record is taken from the
request path (docs/benchmarks.md, "Telemetry"). Per flush, not per record, this module:

* stacks the outputs of all queued predictions that share (model, output, shape, dtype) and takes
  their top-k in one numpy pass, then renders every row's ``{"top_k": ...}`` with a single C-level
  ``json`` call split at the row boundaries (numbers only, so the split is exact);
* keeps sampled inputs as their exact bytes, base64 (``{"shape", "datatype", "b64"}``): formatting
  64 floats as decimal text cost ~15 µs per sampled record, base64 ~0.5 µs, and it is lossless;
* renders each body from a per-model prefix and an f-string (no dict, no encoder per record).

Non-finite output values become ``null`` (the record stays valid JSON).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from edge_agent.inference.arrays import concat
from edge_agent.telemetry.outbox import Row
from edge_agent.wire.model.manifest import NUMPY_TO_V2, Manifest

TOP_K = 3
FULL_OUTPUT_MAX = 16  # an output of at most this many values is sent whole
MAX_SAMPLE_VALUES = 32_768  # a sampled input above this many values is not kept (counted as "inputs")
_encode = json.JSONEncoder(separators=(",", ":"), check_circular=False, allow_nan=False).encode
_text = json.encoder.encode_basestring_ascii

# A queued prediction: (manifest, request id, latency s, ts, inputs, outputs, entity id, sampled)
Item = tuple[Manifest, str, float, float, dict[str, np.ndarray], dict[str, np.ndarray], Any, bool]


def _json_values(arr: np.ndarray) -> Any:
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


def _split_rows(values: Any, n: int, depth: int) -> list[str]:
    """JSON text of each of the ``n`` rows of ``values`` (nested lists of numbers, ``depth`` levels per row)."""
    if n == 1:
        return [_encode(values[0])]
    text = _encode(values)
    close, open_ = "]" * depth, "[" * depth
    parts = text[1 + depth : -1 - depth].split(f"{close},{open_}")
    return [f"{open_}{p}{close}" for p in parts]


def output_texts(stacked: np.ndarray, classifier: bool) -> list[str]:
    """JSON text of one output's summary for each of the ``n`` predictions in ``stacked`` (``[n, *shape]``).

    A classifier's output (the manifest has ``labels``) and any output above FULL_OUTPUT_MAX values
    become ``{"top_k": [[class, score], ...]}`` (a list of those per row for a batch); other
    outputs are sent whole.
    """
    n, per = stacked.shape[0], stacked[0]
    if per.ndim == 0 or per.shape[-1] < 2 or (not classifier and per.size <= FULL_OUTPUT_MAX):
        return _split_rows(_json_values(stacked), n, max(0, stacked.ndim - 1))
    flat = stacked.reshape(n, -1, per.shape[-1])
    k = min(TOP_K, flat.shape[-1])
    idx = np.argsort(-flat.astype(np.float64), axis=-1, kind="stable")[..., :k]
    scores = np.take_along_axis(flat, idx, axis=-1).astype(np.float64)
    if flat.shape[1] == 1 and np.isfinite(scores).all():  # the usual request: one C-level format call per group
        pairs = np.empty((n, k, 2), np.float64)
        pairs[..., 0], pairs[..., 1] = idx[:, 0], scores[:, 0]
        row = '{"top_k":[' + ",".join(["[%d,%.6g]"] * k) + "]}"
        return ("\n".join([row] * n) % tuple(pairs.ravel().tolist())).split("\n")
    pairs = np.empty((*idx.shape, 2), dtype=object)
    pairs[..., 0] = idx
    pairs[..., 1] = np.round(scores, 6)
    pairs[..., 1][~np.isfinite(scores)] = None
    if flat.shape[1] == 1:
        return [f'{{"top_k":{t}}}' for t in _split_rows(pairs[:, 0].tolist(), n, 2)]
    return [f'{{"top_k":{t}}}' for t in _split_rows(pairs.tolist(), n, 3)]


def stacks(items: list[Item], idxs: Iterable[int], outputs: bool) -> Iterator[tuple[str, list[int], np.ndarray]]:
    """``(tensor name, item indices, stacked array)`` per (model, name, shape, dtype) of the items' outputs or inputs."""
    groups: dict[tuple[int, str, tuple[int, ...], np.dtype[Any]], list[int]] = {}
    for i in idxs:
        item = items[i]
        tensors = item[5] if outputs else item[4]
        for name, arr in tensors.items():
            key = (id(item[0]), name, arr.shape, arr.dtype)
            group = groups.get(key)
            if group is None:
                groups[key] = [i]
            else:
                group.append(i)
    for (_, name, _, _), group in groups.items():
        yield name, group, concat([(items[i][5] if outputs else items[i][4])[name] for i in group], stack=True)


def _outputs(items: list[Item]) -> list[str]:
    """The members of each queued prediction's ``outputs`` object, as JSON text."""
    out = [""] * len(items)
    for name, idxs, stacked in stacks(items, range(len(items)), outputs=True):
        key = _text(name) + ":"
        for i, text in zip(idxs, output_texts(stacked, bool(items[idxs[0]][0].labels)), strict=True):
            out[i] = f"{out[i]},{key}{text}" if out[i] else key + text
    return out


def _samples(items: list[Item], idxs: list[int]) -> dict[int, str]:
    """``"inputs"`` JSON text of the sampled ``items[i]``: ``{name: {"shape", "datatype", "b64"}}``.

    The bytes are the tensor's, little-endian. An item whose inputs hold more than
    MAX_SAMPLE_VALUES values is left out (the caller counts it).
    """
    kept = [i for i in idxs if sum(a.size for a in items[i][4].values()) <= MAX_SAMPLE_VALUES]
    out = dict.fromkeys(kept, "")
    for name, group, stacked in stacks(items, kept, outputs=False):
        le = stacked.astype(stacked.dtype.newbyteorder("<"), copy=False)
        head = f'{_text(name)}:{{"shape":{_encode(list(stacked.shape[1:]))},"datatype":"{NUMPY_TO_V2.get(stacked.dtype.name, "FP32")}","b64":"'
        for i, row in zip(group, le, strict=True):
            text = head + base64.b64encode(row.tobytes()).decode("ascii") + '"}'
            out[i] = f"{out[i]},{text}" if out[i] else text
    return out


def prediction_rows(items: list[Item]) -> tuple[list[Row], int]:
    """The outbox rows of ``items`` (one per prediction, in order) and how many sampled inputs were left out."""
    sampled = [i for i, item in enumerate(items) if item[7]]
    samples = _samples(items, sampled) if sampled else {}
    outputs = _outputs(items)
    latency = np.round(np.fromiter((it[2] for it in items), np.float64, len(items)) * 1000.0, 3).tolist()
    prefixes: dict[int, str] = {}
    rows: list[Row] = []
    for i, (item, outs, lat) in enumerate(zip(items, outputs, latency, strict=True)):
        manifest, rid, _, ts, _, _, entity, _ = item
        prefix = prefixes.get(id(manifest))
        if prefix is None:
            prefix = prefixes[id(manifest)] = f'{{"model":{_text(manifest.name)},"version":{_text(manifest.version)}'
        body = f'{prefix},"request_id":{_text(rid)},"latency_ms":{lat!r},"outputs":{{{outs}}}'
        if entity is not None:
            body += f',"entity_id":{_encode(entity)}'
        sample = samples.get(i)
        if sample is not None:
            body += f',"inputs":{{{sample}}}'
        rows.append(Row("prediction", ts, body + "}", manifest.name, rid, sample is not None))
    return rows, len(sampled) - len(samples)
