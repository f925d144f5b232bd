"""``cloud-batch data labeled``: sampled inputs joined with their feedback labels, as training rows.

A prediction record with ``inputs`` (the sampled fraction) is joined with the feedback records of
the same device, model and request id. When a label was replaced (``"replace": true`` on the
device), the latest one wins (by ``ts``, then ``seq``). One output row per labeled prediction::

    device_id, request_id, version, ts, entity_id, label, <input> (list<double>, flattened), <input>_shape

``label`` keeps the type the devices sent (class index, class name or value); mixed types across
rows are written as their JSON text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cloud_batch.errors import InputError
from cloud_batch.ingest.read import bodies, read_kind
from edge_agent.fsutil import atomic_write_bytes
from edge_agent.wire.telemetry import sample_array


def _sample(tensor: dict[str, Any]) -> np.ndarray | None:
    """A sampled input (``b64`` or ``data``, ``wire.telemetry.sample_array``); None when it is malformed."""
    try:
        return sample_array(tensor)
    except (ValueError, TypeError):
        return None


def latest_labels(store: str | Path, model: str) -> dict[tuple[str, str], Any]:
    """``(device_id, request_id) -> label`` for ``model``, the latest label winning."""
    table = read_kind(store, "feedback")
    best: dict[tuple[str, str], tuple[float, int, Any]] = {}
    for device, seq, ts, body in zip(
        table.column("device_id").to_pylist(),
        table.column("seq").to_pylist(),
        table.column("ts").to_pylist(),
        bodies(table),
        strict=True,
    ):
        if body.get("model") != model or "label" not in body:
            continue
        key = (device, str(body.get("request_id")))
        if key not in best or (ts, seq) >= best[key][:2]:
            best[key] = (ts, seq, body["label"])
    return {k: v[2] for k, v in best.items()}


def labeled_rows(store: str | Path, model: str) -> pa.Table:
    """The training rows of ``model`` (see the module docstring); InputError when there are none."""
    labels = latest_labels(store, model)
    preds = read_kind(store, "prediction")
    cols: dict[str, list[Any]] = {k: [] for k in ("device_id", "request_id", "version", "ts", "entity_id", "label")}
    inputs: dict[str, list[Any]] = {}
    for device, ts, body in zip(
        preds.column("device_id").to_pylist(), preds.column("ts").to_pylist(), bodies(preds), strict=True
    ):
        key = (device, str(body.get("request_id")))
        sampled = body.get("inputs")
        if body.get("model") != model or key not in labels or not isinstance(sampled, dict):
            continue
        n = len(cols["device_id"])
        for name in sampled:
            if name not in inputs:
                inputs[name] = [None] * n
                inputs[f"{name}_shape"] = [None] * n
        for name in [k for k in inputs if not k.endswith("_shape")]:
            t = sampled.get(name) if isinstance(sampled.get(name), dict) else None
            arr = _sample(t) if t else None
            inputs[name].append(None if arr is None else arr.astype(np.float64).ravel().tolist())
            inputs[f"{name}_shape"].append(None if arr is None else list(arr.shape))
        for k, v in zip(
            cols, (device, key[1], body.get("version"), ts, body.get("entity_id"), labels[key]), strict=True
        ):
            cols[k].append(v)
    if not cols["device_id"]:
        raise InputError(f"no labeled predictions with sampled inputs for model {model!r} in {store}")
    if len({type(v) for v in cols["label"]}) > 1:
        cols["label"] = [json.dumps(v) for v in cols["label"]]
    data: dict[str, Any] = {**cols}
    for name, values in inputs.items():
        data[name] = pa.array(values, pa.list_(pa.int64() if name.endswith("_shape") else pa.float64()))
    return pa.table(data)


def write_labeled(store: str | Path, model: str, out: str | Path) -> int:
    """Write ``labeled_rows`` to ``out`` (Parquet, atomically); returns the number of rows."""
    table = labeled_rows(store, model)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(os.fspath(out), sink.getvalue().to_pybytes())
    return table.num_rows
