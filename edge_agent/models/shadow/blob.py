"""The agent's messages to its shadow child: one wake-up's copies, stacked (``pack``; the child ``read``s), or control.

Pickling every copy's small arrays would cost the agent's GIL per copy, so the copies are
shipped as blocks: consecutive copies whose tensors stack (same names, dtypes and shapes apart
from the batch) become one array per input and per active output (their rows concatenated),
with each copy's rows and the active version's seconds for it (usually all of a wake-up's
copies are one block). A tensor without a batch dimension (0-d) is never stacked: its copy is a
block of its own. The message is the header's length (4 bytes, little-endian), the header
(JSON: per block the number of copies and each tensor's name, dtype and shape) and the raw
buffers in that order (per block: rows as int64, seconds as float64, inputs, outputs). A ``control``
message is the same length and a JSON object instead (``ring``: copies in shared memory).
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np

from edge_agent.inference.arrays import concat

Sample = tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], float]  # inputs, active outputs, active seconds
Tensors = dict[str, np.ndarray]
_INPUTS, _OUTPUTS, _SECONDS = itemgetter(0), itemgetter(1), itemgetter(2)


@dataclass
class Block:
    """Copies whose tensors are stacked: ``rows[i]`` rows and ``seconds[i]`` of the active version each."""

    rows: list[int]
    seconds: list[float]
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


def pack(items: Sequence[Sample]) -> bytes:
    """``items`` as one message (see the module docstring)."""
    blocks = []
    for group, (inputs, rows), (outputs, _) in _stacked(items):
        seconds = np.fromiter(map(_SECONDS, group), np.float64, len(group))
        blocks.append((np.asarray(rows, np.int64), seconds, inputs, outputs))
    return _message(blocks)


def control(message: Mapping[str, Any]) -> bytes:
    """A control message (``ring``): its header is a JSON object where a ``pack``ed one has a list of blocks."""
    head = json.dumps(message).encode()
    return len(head).to_bytes(4, "little") + head


def _message(blocks: Sequence[tuple[np.ndarray, np.ndarray, Tensors, Tensors]]) -> bytes:
    header: list[dict[str, Any]] = []
    buffers: list[np.ndarray] = []
    for rows, seconds, inputs, outputs in blocks:
        buffers += [rows, seconds, *inputs.values(), *outputs.values()]
        header.append({"copies": len(seconds), "in": _specs(inputs), "out": _specs(outputs)})
    head = json.dumps(header).encode()
    return b"".join([len(head).to_bytes(4, "little"), head, *(np.ascontiguousarray(a).data for a in buffers)])


def _specs(tensors: Mapping[str, np.ndarray]) -> list[list[Any]]:
    return [[n, a.dtype.str, list(a.shape)] for n, a in tensors.items()]


def unpack(blob: bytes) -> list[Block]:
    """The blocks of a ``pack``ed message (arrays are read-only views of ``blob``)."""
    out = read(blob)
    if not isinstance(out, list):
        raise ValueError("a control message, not copies")
    return out


def read(blob: bytes) -> list[Block] | dict[str, Any]:
    """A ``pack``ed message's blocks, or a ``control`` message's object."""
    size = int.from_bytes(blob[:4], "little")
    offset = 4 + size
    header = json.loads(blob[4:offset])
    if isinstance(header, dict):
        return header

    def take(dtype: str, shape: list[int]) -> np.ndarray:
        nonlocal offset
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        a = np.frombuffer(blob, dt, count, offset).reshape(shape)
        offset += count * dt.itemsize
        return a

    out = []
    for raw in header:
        n = int(raw["copies"])
        rows, seconds = take("<i8", [n]).tolist(), take("<f8", [n]).tolist()
        inputs = {name: take(dtype, shape) for name, dtype, shape in raw["in"]}
        outputs = {name: take(dtype, shape) for name, dtype, shape in raw["out"]}
        out.append(Block(rows, seconds, inputs, outputs))
    return out


def _stack(copies: Sequence[Mapping[str, np.ndarray]]) -> tuple[Tensors, list[int]] | None:
    """The copies' tensors concatenated per name and each copy's rows; None when they do not stack.

    Only C-level iteration per copy (``map``, ``inference.arrays.concat`` refusing another dtype,
    rank or shape, and never releasing the GIL per copy), so a wake-up's copies cost little of the agent's GIL. The
    first copy's names are taken: a copy without one of them does not stack (KeyError).
    """
    out: Tensors = {}
    rows: list[int] = []
    try:
        for name in copies[0]:
            parts = list(map(itemgetter(name), copies))
            out[name] = concat(parts)
            rows = rows or list(map(len, parts))
    except (KeyError, ValueError, TypeError):
        return None
    return out, rows or [1] * len(copies)


Stacked = tuple[Tensors, list[int]]


def _stacked(items: Sequence[Sample]) -> list[tuple[Sequence[Sample], Stacked, Stacked]]:
    """Blocks and their stacked inputs and outputs: all ``items`` at once when they stack (the usual case)."""
    whole = _both(items)
    if whole is not None:
        return [(items, *whole)]
    out: list[tuple[Sequence[Sample], Stacked, Stacked]] = []
    for group in _blocks(items):
        both = _both(group)
        if both is None:  # a lone copy with a 0-d tensor: sent as it is
            both = (_as_is(group[0][0]), [1]), (_as_is(group[0][1]), [1])
        out.append((group, *both))
    return out


def _as_is(tensors: Mapping[str, np.ndarray]) -> Tensors:
    return {n: np.asarray(a, order="C") for n, a in tensors.items()}


def _both(items: Sequence[Sample]) -> tuple[Stacked, Stacked] | None:
    inputs = _stack(list(map(_INPUTS, items)))
    outputs = None if inputs is None else _stack(list(map(_OUTPUTS, items)))
    return None if inputs is None or outputs is None else (inputs, outputs)


def signature(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> Hashable | None:
    """What must match for two copies to stack; None for a copy with a 0-d tensor (never stacked)."""
    parts = []
    for side in (inputs, outputs):
        for name, a in side.items():
            if not a.ndim:
                return None
            parts.append((name, a.dtype, a.shape[1:]))
    return tuple(parts)


def _blocks(items: Sequence[Sample]) -> list[list[Sample]]:
    out: list[list[Sample]] = []
    last: Hashable | None = None
    for item in items:
        key = signature(item[0], item[1])
        if out and key is not None and key == last:
            out[-1].append(item)
        else:
            out.append([item])
        last = key
    return out
