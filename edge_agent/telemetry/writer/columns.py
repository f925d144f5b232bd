"""Queued predictions as columns, for the trip from the agent to its telemetry writer process.

Pickling a flush's items one by one (a tuple, two dicts and a few small arrays each) costs the
agent's GIL several µs per prediction. :func:`pack` instead groups them by (model version, output
names) and sends each group as a handful of objects: request ids as one list, latencies and
timestamps as two float arrays, the sample flags as one bool array, each output stacked into one
``[n, *shape]`` array, and inputs only where the writer needs them (sampled rows, or every row of
a model with a drift reference; the recorder keeps no others). A tensor whose rows differ in shape
or dtype (batches of different sizes) goes as a list of arrays. Groups carry their rows' positions
when a flush has several, so :func:`unpack` rebuilds the items in queue order (views into the
stacked arrays) in the writer process, and seqs follow the order requests were served.

Manifests travel once per writer process: ``Packed.manifests`` carries those the writer has not
seen, keyed by ``(name, version)``."""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import numpy as np

from edge_agent.inference.arrays import concat
from edge_agent.telemetry.rows import Item
from edge_agent.wire.model.manifest import Manifest

Key = tuple[str, str]  # (model, version)
Tensors = dict[str, "np.ndarray | list[np.ndarray]"]


@dataclass
class Group:
    """The predictions of one model version that share output and input names."""

    key: Key
    ids: list[str]
    latency: np.ndarray
    ts: np.ndarray
    sampled: np.ndarray
    outputs: Tensors
    input_rows: np.ndarray  # positions (in this group) whose inputs are in ``inputs``
    inputs: Tensors | list[dict[str, np.ndarray]]  # per name, or one dict per input row
    entities: list[Any] | None = None
    positions: list[int] | None = None  # where its items were in the flush (None: the flush is this group)


@dataclass
class Packed:
    groups: list[Group] = field(default_factory=list)
    manifests: dict[Key, Manifest] = field(default_factory=dict)


def _stack(arrays: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """``arrays`` as one ``[n, *shape]`` array when they share shape and dtype, else the list itself."""
    try:
        return concat(arrays, stack=True)
    except ValueError:
        return arrays


def pack(items: list[Item], known: set[Key], drift: bool) -> Packed:
    """``items`` as columns; adds the manifests it ships to ``known``. ``drift``: the writer observes drift.

    Written with C-level passes (``zip(*items)``, ``map``): this runs on the agent's GIL, once per
    queued prediction, in a cache the request path has just used for something else.
    """
    out = Packed()
    if not items:
        return out
    columns = list(zip(*items, strict=True))
    keys = list(zip(map(id, columns[0]), map(tuple, columns[5]), strict=True))
    if len(set(keys)) == 1:
        out.groups.append(_group(columns, out, known, drift))
        return out
    by: dict[tuple[int, tuple[str, ...]], list[int]] = {}
    for i, key in enumerate(keys):
        by.setdefault(key, []).append(i)
    for positions in by.values():
        group = _group(list(zip(*[items[i] for i in positions], strict=True)), out, known, drift)
        group.positions = positions
        out.groups.append(group)
    return out


def _group(columns: list[tuple[Any, ...]], out: Packed, known: set[Key], drift: bool) -> Group:
    """One group from its columns (manifest, id, latency, ts, inputs, outputs, entity, sampled)."""
    manifests, ids, latency, ts, inputs, outputs, entities, sampled = columns
    manifest = manifests[0]
    key = (manifest.name, manifest.version)
    if key not in known:
        out.manifests[key] = manifest
        known.add(key)
    flags = np.array(sampled, bool)
    rows = np.arange(len(ids)) if drift and manifest.reference is not None else np.flatnonzero(flags)
    kept = [inputs[i] for i in rows.tolist()]
    return Group(
        key=key,
        ids=list(ids),
        latency=np.array(latency, np.float64),
        ts=np.array(ts, np.float64),
        sampled=flags,
        outputs={name: _stack(list(map(itemgetter(name), outputs))) for name in outputs[0]},
        input_rows=rows,
        inputs=_inputs(kept),
        entities=list(entities) if entities.count(None) != len(entities) else None,
    )


def _inputs(kept: list[dict[str, np.ndarray]]) -> Tensors | list[dict[str, np.ndarray]]:
    """The kept rows' inputs, stacked per name; the dicts themselves when their names differ."""
    if not kept:
        return {}
    if len(set(map(tuple, kept))) != 1:
        return kept
    return {name: _stack(list(map(itemgetter(name), kept))) for name in kept[0]}


def unpack(packed: Packed, manifests: dict[Key, Manifest]) -> list[Item]:
    """The items of ``packed``, in the order they were queued; ``manifests`` gains ``packed.manifests``."""
    manifests.update(packed.manifests)
    if len(packed.groups) > 1:
        placed: list[Item | None] = [None] * sum(len(g.ids) for g in packed.groups)
        for g in packed.groups:
            for pos, item in zip(g.positions or (), unpack(Packed([g]), manifests), strict=True):
                placed[pos] = item
        return [item for item in placed if item is not None]
    items: list[Item] = []
    for g in packed.groups:
        manifest = manifests[g.key]
        n = len(g.ids)
        inputs: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
        for pos, i in enumerate(g.input_rows.tolist()):
            inputs[i] = g.inputs[pos] if isinstance(g.inputs, list) else {name: a[pos] for name, a in g.inputs.items()}
        outputs = [{name: arr[i] for name, arr in g.outputs.items()} for i in range(n)]
        entities = g.entities or [None] * n
        items.extend(
            zip(
                [manifest] * n,
                g.ids,
                g.latency.tolist(),
                g.ts.tolist(),
                inputs,
                outputs,
                entities,
                g.sampled.tolist(),
                strict=True,
            )
        )
    return items
