"""Copies of one-row requests, copied into preallocated arrays on the request path (the shadow's usual case).

Holding each sampled request's arrays until the shipping thread packed them, then freeing them
in bursts, is part of what raises the primary's p99 under a shadow: with the shadow process doing
no work at all, the p99 still rose 35–47%. A ``Ring`` takes the copies' values instead (the
signature checked, one small copy per tensor under an uncontended lock: ~3.7 µs per sampled digits
request, against 0.1 µs for appending its arrays) into arrays stacked per name, so the shipping
thread sends slices of them: no per-copy objects to stack or to free. In three A/B pairs the p99
rise fell from +43–67% to +35–53% (docs/benchmarks.md, shadow): smaller, not gone. A ring holds
copies of one signature (the first one-row copy offered); any other copy goes the general way
(``blob.pack``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from edge_agent.models.shadow.blob import Tensors, pack_stacked, signature


def fits(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> bool:
    """Whether a copy can go into a ring: every tensor has a batch dimension of one row."""
    return all(a.ndim and a.shape[0] == 1 for side in (inputs, outputs) for a in side.values())


class Ring:
    """Up to ``size`` one-row copies of one signature, in arrays stacked per tensor name."""

    def __init__(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], size: int) -> None:
        self.size = size
        self.inputs: Tensors = {n: np.empty((size, *a.shape[1:]), a.dtype) for n, a in inputs.items()}
        self.outputs: Tensors = {n: np.empty((size, *a.shape[1:]), a.dtype) for n, a in outputs.items()}
        self.seconds = np.empty(size, np.float64)
        self.key = signature(inputs, outputs)
        self._start = self._count = 0
        self._lock = threading.Lock()

    def matches(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> bool:
        """Whether a one-row copy stacks with this ring's (``blob.signature``: names, dtypes, row shapes)."""
        return fits(inputs, outputs) and signature(inputs, outputs) == self.key

    def put(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], seconds: float) -> bool:
        """Copy one matching copy in; False when the ring is full (the copy is dropped)."""
        with self._lock:
            if self._count >= self.size:
                return False
            i = (self._start + self._count) % self.size
            for n, a in inputs.items():
                self.inputs[n][i] = a[0]
            for n, a in outputs.items():
                self.outputs[n][i] = a[0]
            self.seconds[i] = seconds
            self._count += 1
        return True

    def __len__(self) -> int:
        return self._count

    def take(self, limit: int) -> bytes | None:
        """Up to ``limit`` of the oldest copies as one ``blob`` message (their slots freed); None when empty."""
        with self._lock:
            start, n = self._start, min(self._count, limit)
        if n == 0:
            return None
        idx = np.arange(start, start + n) % self.size if start + n > self.size else slice(start, start + n)
        # Only this (the shipping) thread frees slots, so the n taken stay as they are until freed below.
        blob = pack_stacked(
            self.seconds[idx], {k: v[idx] for k, v in self.inputs.items()}, {k: v[idx] for k, v in self.outputs.items()}
        )
        with self._lock:
            self._start = (start + n) % self.size
            self._count -= n
        return blob
