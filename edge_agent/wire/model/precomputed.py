"""``manifest.precomputed``: a model whose answers a batch job has already computed per entity.

A model manifest may declare that its outputs for an entity are published as a feature set
(``cloud-batch score ... --publish-features SET``), so the agent answers from the feature cache
instead of running the interpreter (``features/precomputed.py``)::

    "precomputed": {"set": "maintenance_scores",
                    "outputs": {"failure_prob": ["failure_prob"]},   # output -> the set's columns
                    "max_age_s": 86400}

``outputs`` names every output of the model, each with one column per value of one row of that
output (``len(columns) == prod(shape[1:])``, in the output's row-major order), so a precomputed
answer has exactly the shape and names a live one has. ``max_age_s`` is how old a row may be and
still be served (on top of the set's own ``ttl_s``, when it has one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from edge_agent.errors import ManifestError
from edge_agent.wire.names import is_name

KEY = "precomputed"
_FIELDS = {"set", "outputs", "max_age_s"}


class TensorSpec(Protocol):
    """What the declaration is checked against: ``manifest.TensorSpec`` (not imported: manifest imports this)."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class Precomputed:
    """Where a model's precomputed answers live: the set, each output's columns, the age limit."""

    set: str
    outputs: dict[str, tuple[str, ...]]  # output name -> the set's columns, one per value of a row
    max_age_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"set": self.set, "outputs": {k: list(v) for k, v in self.outputs.items()}, "max_age_s": self.max_age_s}


def parse_precomputed(raw: Any, outputs: Sequence[TensorSpec]) -> Precomputed | None:
    """Validate ``manifest.precomputed`` against the model's outputs (None: not declared); ManifestError names the field."""
    if raw is None:
        return None
    where = f"manifest.{KEY}"
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected an object {{set, outputs, max_age_s}}")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise ManifestError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(_FIELDS)})")
    missing = _FIELDS - set(raw)
    if missing:
        raise ManifestError(f"{where}: missing {sorted(missing)}")
    if not is_name(raw["set"]):
        raise ManifestError(f"{where}.set: expected a feature set name (1-64 letters, digits, '_', '.' or '-')")
    age = raw["max_age_s"]
    if isinstance(age, bool) or not isinstance(age, (int, float)) or not math.isfinite(age) or age <= 0:
        raise ManifestError(f"{where}.max_age_s: expected a positive number of seconds, got {age!r}")
    return Precomputed(raw["set"], _columns(raw["outputs"], outputs, f"{where}.outputs"), float(age))


def _columns(raw: Any, outputs: Sequence[TensorSpec], where: str) -> dict[str, tuple[str, ...]]:
    """``{output: [column, ...]}`` covering every output, each with one column per value of a row."""
    specs = {s.name: s for s in outputs}
    if not isinstance(raw, dict) or not raw:
        raise ManifestError(f"{where}: expected an object {{output name: [column, ...]}}")
    unknown, absent = sorted(set(raw) - set(specs)), sorted(set(specs) - set(raw))
    if unknown or absent:
        raise ManifestError(
            f"{where}: the model has no output {unknown[0]!r} (outputs: {sorted(specs)})"
            if unknown
            else f"{where}: output {absent[0]!r} has no columns (a precomputed answer has every output)"
        )
    out: dict[str, tuple[str, ...]] = {}
    seen: set[str] = set()
    for name, cols in raw.items():
        spec = specs[name]
        if not isinstance(cols, list) or not cols or not all(isinstance(c, str) and c for c in cols):
            raise ManifestError(f"{where}[{name!r}]: expected a non-empty list of column names")
        if len(set(cols)) != len(cols) or seen & set(cols):
            raise ManifestError(f"{where}[{name!r}]: a column is named twice")
        seen.update(cols)
        row = spec.shape[1:]
        if any(d < 1 for d in row):
            raise ManifestError(
                f"{where}[{name!r}]: output {name!r} has shape {list(spec.shape)}; a precomputed output "
                "needs a fixed row shape (only the batch dimension may be -1)"
            )
        width = math.prod(row)
        if len(cols) != width:
            raise ManifestError(
                f"{where}[{name!r}]: {len(cols)} columns for output {name!r} of shape {list(spec.shape)} "
                f"({width} value{'s' if width != 1 else ''} per row)"
            )
        out[name] = tuple(cols)
    return out
