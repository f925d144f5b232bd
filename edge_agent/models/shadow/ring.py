"""Copies of requests in memory the shadow child maps too: nothing packed or sent per copy.

The request path copies a sampled request's values into preallocated arrays stacked per tensor
name (the signature checked, one small copy per tensor under an uncontended lock); a copy of
``k`` rows takes ``k`` consecutive slots, the first marked with ``k`` (``rows``), the others 0,
and a copy that would straddle the end of the arrays starts again at slot 0, the slots it skipped
marked -1 (padding the child steps over), so that every copy is contiguous. Those arrays live in
an anonymous shared file (``memfd``) whose descriptor the child gets once
(``Ring.layout()``, then ``multiprocessing.reduction.send_handle``); the child maps it read-only
(``RingView``). The agent's shipping thread then only *publishes* what was filled since its
last wake-up, as a few bytes (``{"slots": [start, n]}``), and frees those slots when the child
answers ``{"freed": n}``. Both hand-overs go through the socket, whose kernel locks order the
copies' writes before the child's reads (and its reads before their slots are reused), on any CPU.
Packing and sending each wake-up's copies (and the child receiving them) was the part of the
shadow that raised the primary's p99 most (docs/benchmarks.md, shadow): with the child doing no
work at all the p99 still rose 35–47%. A ring holds copies of one signature (the first copy
offered whose tensors share one batch size); any other copy, and one of more than ``max_rows``
rows, goes the general way (``blob.pack``). Its slots are bounded by bytes as well as by count
(``RING_BYTES``): a large image model's ring holds a few dozen rows.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from edge_agent.fsutil import shared_memory
from edge_agent.models.shadow.blob import Block, Tensors, signature

SLOTS = 4096  # rows a ring holds: a wake-up's worth (runner.BATCH_EVERY_S) at ~8,000 sampled requests/s ...
RING_BYTES = 8 << 20  # ... in at most this much memory (at least MIN_SLOTS rows)
MIN_SLOTS = 8
ROWS_SHARE = 4  # a copy of at most size // ROWS_SHARE rows goes into the ring (a larger one the general way)
PAD = -1  # ``rows`` of a slot skipped so that the next copy does not straddle the end of the arrays

Spec = list[list[Any]]  # per tensor [side, name, dtype, row shape]


def copy_rows(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> int:
    """The batch size every tensor of a copy shares; 0 when they do not share one (or have none)."""
    rows = -1
    for side in (inputs, outputs):
        for a in side.values():
            shape = a.shape
            if not shape or (shape[0] != rows and rows >= 0):
                return 0
            rows = shape[0]
    return max(rows, 0)


def fits(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> bool:
    """Whether a copy can go into a ring: its tensors share a batch dimension."""
    return copy_rows(inputs, outputs) > 0


def _layout(size: int, spec: Spec) -> tuple[list[tuple[str, str, np.dtype[Any], list[int], int, int]], int]:
    """Each tensor's place for ``size`` rows: (side, name, dtype, row shape, byte offset, values), in
    ``spec``'s order, each 64-byte aligned; and where the seconds start (they come last)."""
    parts, offset = [], 0
    for side, name, dtype, shape in spec:
        dt = np.dtype(dtype)
        count = size * int(np.prod(shape, dtype=np.int64))
        parts.append((side, name, dt, shape, offset, count))
        offset = _aligned(offset + count * dt.itemsize)
    return parts, offset


def _views(buf: Any, size: int, spec: Spec) -> tuple[Tensors, Tensors, np.ndarray, np.ndarray]:
    """The ring's arrays over ``buf`` (``_layout``), then per slot its copy's seconds and ``rows``."""
    sides: dict[str, Tensors] = {"in": {}, "out": {}}
    parts, seconds_at = _layout(size, spec)
    for side, name, dt, shape, offset, count in parts:
        sides[side][name] = np.frombuffer(buf, dt, count, offset).reshape(size, *shape)
    seconds = np.frombuffer(buf, np.float64, size, seconds_at)
    return sides["in"], sides["out"], seconds, np.frombuffer(buf, np.int32, size, seconds_at + size * 8)


def _nbytes(size: int, spec: Spec) -> int:
    return _layout(size, spec)[1] + size * (8 + 4)


def _aligned(n: int) -> int:
    return -(-n // 64) * 64


class Ring:
    """Up to ``size`` rows of copies of one signature, in shared arrays stacked per tensor name.

    Raises OSError when no shared memory can be had (the runner then ships copies the general way).
    """

    def __init__(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], size: int = SLOTS) -> None:
        self.spec: Spec = [["in", n, a.dtype.str, list(a.shape[1:])] for n, a in inputs.items()]
        self.spec += [["out", n, a.dtype.str, list(a.shape[1:])] for n, a in outputs.items()]
        row = _nbytes(1, self.spec)
        self.size = max(1, min(size, max(MIN_SLOTS, RING_BYTES // row)))
        self.max_rows = max(1, self.size // ROWS_SHARE)
        nbytes = _nbytes(self.size, self.spec)
        self.fd = shared_memory(nbytes, "edgefleet-shadow-ring")
        weakref.finalize(self, os.close, self.fd)  # the mapping goes with the arrays; the child has its own
        self._map = mmap.mmap(self.fd, nbytes)
        self.inputs, self.outputs, self.seconds, self.rows = _views(self._map, self.size, self.spec)
        self.key = signature(inputs, outputs)
        self._start = self._count = self._published = 0  # slots [start, start+published) are the child's
        self._lock = threading.Lock()

    def layout(self) -> dict[str, Any]:
        """What the child needs besides the descriptor to map the same arrays (``RingView``)."""
        return {"size": self.size, "spec": self.spec}

    def matches(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> bool:
        """Whether a copy of at most ``max_rows`` rows stacks with this ring's (``blob.signature``: names,
        dtypes, row shapes)."""
        return 0 < copy_rows(inputs, outputs) <= self.max_rows and signature(inputs, outputs) == self.key

    def put(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], seconds: float) -> bool:
        """Copy one matching copy in (contiguous: see the module docstring); False when the ring is full
        (the copy is dropped)."""
        k = next(iter(inputs.values())).shape[0]
        with self._lock:
            i = (self._start + self._count) % self.size
            if i + k > self.size:  # the copy starts again at slot 0, the slots to the end skipped
                skip = self.size - i
                if self._count + skip + k > self.size:
                    return False
                self.rows[i:] = PAD
                self._count += skip
                i = 0
            elif self._count + k > self.size:
                return False
            j = i + k
            for n, a in inputs.items():
                self.inputs[n][i:j] = a
            for n, a in outputs.items():
                self.outputs[n][i:j] = a
            self.seconds[i] = seconds
            self.rows[i] = k
            if k > 1:
                self.rows[i + 1 : j] = 0
            self._count += k
        return True

    def __len__(self) -> int:
        return self._count

    def publish(self) -> tuple[int, int] | None:
        """The slots filled since the last call, as ``(start, n)`` (they may wrap); None when there are none."""
        with self._lock:
            n = self._count - self._published
            start = (self._start + self._published) % self.size
            self._published = self._count
        return (start, n) if n else None

    def free(self, n: int) -> None:
        """The child is done with the ``n`` oldest published slots: they take new copies."""
        with self._lock:
            n = max(0, min(n, self._published))
            self._start = (self._start + n) % self.size
            self._count -= n
            self._published -= n


class RingView:
    """The child's read-only mapping of a ``Ring`` (``layout`` and the descriptor the agent sent)."""

    def __init__(self, layout: Mapping[str, Any], fd: int) -> None:
        self.size, spec = int(layout["size"]), layout["spec"]
        try:
            self._map = mmap.mmap(fd, _nbytes(self.size, spec), prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.inputs, self.outputs, self.seconds, self.rows = _views(self._map, self.size, spec)

    def blocks(self, start: int, n: int) -> list[Block]:
        """Published slots ``start``… (``n`` of them, wrapping) as blocks of views: nothing is copied.
        A span ends at a copy's end (copies never straddle the wrap); padding is only ever its tail."""
        spans = [(start, min(start + n, self.size))]
        if start + n > self.size:
            spans.append((0, start + n - self.size))
        out = []
        for lo, span_hi in spans:
            marks = self.rows[lo:span_hi]
            hi = lo + int(np.count_nonzero(marks != PAD))
            firsts = np.flatnonzero(marks[: hi - lo] > 0)
            if not len(firsts):
                continue
            out.append(
                Block(
                    marks[firsts].tolist(),
                    self.seconds[lo:hi][firsts].tolist(),
                    {k: v[lo:hi] for k, v in self.inputs.items()},
                    {k: v[lo:hi] for k, v in self.outputs.items()},
                )
            )
        return out
