"""Queued predictions as outbox rows: prediction packs (``wire.telemetry.pack``), built once per flush.

The writer holds the GIL that serves requests, so what it pays per prediction is taken from the
request path (docs/benchmarks.md, "Telemetry packs"). A pack holds up to MAX_PACK predictions of one
model version and output shape as columns: request ids as one JSON list, timestamps and latencies as
two arrays, each output's top-k (or, when small, the whole output) as arrays, sampled inputs stacked
per (name, shape, dtype); every array travels as its bytes in base64. Per flush, not per prediction,
this module stacks the outputs of a pack and takes their top-k in one numpy pass. One JSON row per
prediction (what agents before packs wrote) cost ~14 µs per prediction to build and commit; a pack ~3 µs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from edge_agent.inference.arrays import concat
from edge_agent.telemetry.outbox import Row
from edge_agent.wire.model.manifest import Manifest
from edge_agent.wire.telemetry.pack import MAX_PACK, PACK_KIND, encode, topk_text, values_text

TOP_K = 3
FULL_OUTPUT_MAX = 16  # an output of at most this many values is sent whole
MAX_SAMPLE_VALUES = 32_768  # a sampled input above this many values is not kept (counted as "inputs")
PACK_INPUT_BYTES = 48 * 1024  # raw sampled input bytes in one pack ...
PACK_BYTES = 48 * 1024  # ... and the rest of its body (record_bytes, base64-sized): with both, below a 128 KiB batch

# A queued prediction: (manifest, request id, latency s, ts, inputs, outputs, entity id, sampled)
Item = tuple[Manifest, str, float, float, dict[str, np.ndarray], dict[str, np.ndarray], Any, bool]


def output_text(stacked: np.ndarray, classifier: bool) -> str:
    """JSON text of one output's column in a pack, from the ``n`` predictions' values stacked (``[n, *shape]``).

    A classifier's output (the manifest has ``labels``) and any output above FULL_OUTPUT_MAX values
    become ``{"top_k": {"index", "score"}}`` (``[n, m, k]``: ``m`` rows per prediction, ``k`` best
    classes); other outputs are sent whole, ``{"values": ...}``.
    """
    n, per = stacked.shape[0], stacked[0]
    if _whole(per.shape, classifier):
        return values_text(stacked)
    flat = stacked.reshape(n, -1, per.shape[-1])
    k = min(TOP_K, flat.shape[-1])
    idx = np.argsort(-flat.astype(np.float64), axis=-1, kind="stable")[..., :k]
    return topk_text(idx, np.take_along_axis(flat, idx, axis=-1))


def _whole(shape: tuple[int, ...], classifier: bool) -> bool:
    """Whether an output of this shape (one prediction's) goes whole rather than as its top-k."""
    return not shape or shape[-1] < 2 or (not classifier and int(np.prod(shape)) <= FULL_OUTPUT_MAX)


def record_bytes(item: Item, with_inputs: bool) -> int:
    """About what ``item`` adds to its pack's body, in bytes: base64-sized, uncompressed.

    The ``max_bps`` bucket's measure (``pacing``) and what bounds a pack (PACK_BYTES).
    """
    classifier = bool(item[0].labels)
    out = sum(
        a.nbytes if _whole(a.shape, classifier) else a.size // a.shape[-1] * min(TOP_K, a.shape[-1]) * 8
        for a in item[5].values()
    )
    inputs = sum(a.nbytes for a in item[4].values()) if with_inputs else 0
    return 24 + len(item[1]) + (12 + out + inputs) * 4 // 3


def _kept_sample(item: Item) -> bool:
    return sum(a.size for a in item[4].values()) <= MAX_SAMPLE_VALUES


def _input_bytes(items: list[Item], idxs: list[int]) -> int:
    return sum(a.nbytes for i in idxs if items[i][7] for a in items[i][4].values())


def _packs(items: list[Item]) -> Iterator[list[int]]:
    """Indices of the items of each pack: one model version, MAX_PACK and PACK_INPUT_BYTES at most, in queue order."""
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        group = groups.get(id(item[0]))
        if group is None:
            groups[id(item[0])] = [i]
        else:
            group.append(i)
    for group in groups.values():
        for start in range(0, len(group), MAX_PACK):
            chunk = group[start : start + MAX_PACK]
            if _input_bytes(items, chunk) <= PACK_INPUT_BYTES:
                yield chunk
                continue
            pack: list[int] = []  # many sampled inputs: cut where the bytes run out
            size = 0
            for i in chunk:
                extra = _input_bytes(items, [i])
                if pack and size + extra > PACK_INPUT_BYTES:
                    yield pack
                    pack, size = [], 0
                pack.append(i)
                size += extra
            yield pack


def _inputs(items: list[Item], pack: list[int], sampled: list[int]) -> list[tuple[str, list[int], np.ndarray]]:
    """The pack's sampled inputs: ``(name, positions, stacked rows)`` per (name, shape, dtype)."""
    groups: dict[tuple[str, tuple[int, ...], str], list[int]] = {}
    for row in sampled:
        for name, arr in items[pack[row]][4].items():
            groups.setdefault((name, arr.shape, arr.dtype.str), []).append(row)
    return [
        (name, rows, concat([items[pack[r]][4][name] for r in rows], stack=True))
        for (name, _, _), rows in groups.items()
    ]


def _row(items: list[Item], pack: list[int], sampled: list[int]) -> Row:
    """The pack of ``items[pack]`` (their outputs of one shape); ``sampled``: positions in it whose inputs go along."""
    manifest = items[pack[0]][0]
    ts = np.fromiter((items[i][3] for i in pack), np.float64, len(pack))
    latency = np.fromiter((items[i][2] for i in pack), np.float64, len(pack)) * 1000.0
    classifier = bool(manifest.labels)
    outputs = {
        name: output_text(concat([items[i][5][name] for i in pack], stack=True), classifier)
        for name in items[pack[0]][5]
    }
    entities = [items[i][6] for i in pack]
    body, ids = encode(
        manifest.name, manifest.version, [items[i][1] for i in pack], ts, latency, outputs,
        entities if any(e is not None for e in entities) else None, _inputs(items, pack, sampled) if sampled else (),
    )  # fmt: skip
    return Row(PACK_KIND, float(ts[0]), body, manifest.name, ids, len(sampled), len(pack))


def _rows(items: list[Item], pack: list[int], out: list[Row]) -> int:
    """Append the pack(s) of ``items[pack]`` to ``out``; returns how many sampled inputs were left out (too large).

    Outputs of different shapes (batches of different sizes) cannot share a pack: such a chunk is split by shape;
    one whose outputs are large (``record_bytes``) is split to PACK_BYTES.
    """
    per = record_bytes(items[pack[0]], False)
    if len(pack) > 1 and len(pack) * per > PACK_BYTES:  # large outputs: fewer predictions per pack
        step = max(1, PACK_BYTES // per)
        return sum(_rows(items, pack[i : i + step], out) for i in range(0, len(pack), step))
    sampled = [r for r, i in enumerate(pack) if items[i][7]]
    kept = [r for r in sampled if _kept_sample(items[pack[r]])]
    try:
        out.append(_row(items, pack, kept))
    except ValueError:  # concat: shapes differ within the chunk
        by_shape: dict[tuple[Any, ...], list[int]] = {}
        for i in pack:
            by_shape.setdefault(tuple(a.shape for a in items[i][5].values()), []).append(i)
        if len(by_shape) == 1:
            raise
        return sum(_rows(items, part, out) for part in by_shape.values())
    return len(sampled) - len(kept)


def prediction_rows(items: list[Item]) -> tuple[list[Row], int]:
    """The outbox rows of ``items`` (packs, in queue order within each) and how many sampled inputs were left out."""
    rows: list[Row] = []
    left_out = sum(_rows(items, pack, rows) for pack in _packs(items))
    return rows, left_out
