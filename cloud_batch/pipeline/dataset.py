"""The ``dataset`` step: base training data plus the fleet's labeled field rows, split by time, checked.

* **field rows**: ``ingest.labeled.labeled_rows`` (sampled inputs joined with feedback labels),
  reshaped to the model's input shapes;
* **holdout**: the base data's holdout (maintenance: its latest snapshots; digits: the job's
  seeded split) plus the latest ``holdout_fraction`` of the field rows by time; the field part is
  also kept alone as the **field slice** (``field`` flag);
* **checks** (each a line in ``checks.json``; any failure stops the run, naming it): minimum
  labeled rows, schema (inputs present, right size, labels valid), NaN/inf, label balance, and a
  field slice that can be scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from cloud_batch.errors import InputError
from cloud_batch.pipeline.config import PipelineConfig
from cloud_batch.pipeline.models import ModelSpec, Rows, time_split


@dataclass
class Check:
    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "detail": self.detail}


def field_rows(store: Path, spec: ModelSpec) -> tuple[Rows | None, list[Check]]:
    """The labeled field rows of ``spec`` as Rows, and the schema check (None when unusable)."""
    from cloud_batch.ingest.labeled import labeled_rows

    try:
        table = labeled_rows(store, spec.name)
    except InputError as exc:  # no store or nothing labeled: an empty field set, judged by the checks
        return Rows(
            {k: np.zeros((0, *s), np.float32) for k, s in spec.inputs.items()}, np.zeros(0, np.int64), np.zeros(0)
        ), [Check("schema", True, f"no labeled rows ({exc})")]
    missing = [k for k in spec.inputs if k not in table.column_names]
    if missing:
        return None, [Check("schema", False, f"field rows lack input column(s) {missing}")]
    inputs: dict[str, np.ndarray] = {}
    for name, shape in spec.inputs.items():
        column, size = table.column(name), int(np.prod(shape))
        lengths = pc.fill_null(pc.list_value_length(column), -1).to_numpy()
        bad = int((lengths != size).sum())
        if bad:
            return None, [Check("schema", False, f"{bad} field row(s) have no {name!r} or not {size} values")]
        flat = pc.list_flatten(column).to_numpy()  # Arrow → NumPy without a Python object per value
        inputs[name] = flat.astype(np.float32).reshape(len(lengths), *shape)
    try:
        y = spec.label_values(table.column("label").to_pylist())
    except InputError as exc:
        return None, [Check("schema", False, str(exc))]
    ts = np.asarray(table.column("ts").to_pylist(), np.float64)
    rows = Rows(inputs, y, ts, np.ones(len(y), bool))
    return rows, [Check("schema", True, f"{len(y)} rows with inputs {list(spec.inputs)} and valid labels")]


def nan_check(rows: Rows) -> Check:
    """No NaN/inf in any input. The wire's strict JSON cannot carry them, so this mostly guards the base data."""
    bad = {k: int((~np.isfinite(v.reshape(len(v), -1))).any(axis=1).sum()) for k, v in rows.inputs.items()}
    bad = {k: n for k, n in bad.items() if n}
    return Check("nan", not bad, f"rows with NaN/inf: {bad}" if bad else "no NaN or inf in any input")


def _balance(field: Rows, spec: ModelSpec, minimum: float) -> Check:
    """Binary: the minority class's share ≥ ``minimum``; multiclass: the rarest class's ≥ ``minimum / classes``."""
    if len(field) == 0:
        return Check("label_balance", False, "no field labels")
    share = np.bincount(field.y, minlength=spec.n_classes) / len(field)
    floor = minimum if spec.n_classes == 2 else minimum / spec.n_classes
    rarest = int(share.argmin())
    ok = bool(share.min() >= floor)
    return Check(
        "label_balance", ok, f"rarest class {rarest} is {share.min():.3f} of the field rows (floor {floor:.3f})"
    )


def build(config: PipelineConfig, spec: ModelSpec) -> tuple[Rows, Rows, list[Check]]:
    """(train, holdout, checks); the holdout's ``field`` flag marks the field slice."""
    ds = config.dataset
    base_train, base_hold = spec.base_split(config.train, ds.holdout_fraction)
    field, checks = field_rows(config.store, spec)
    if field is None:
        return base_train, base_hold, checks
    n = len(field)
    checks.insert(
        0,
        Check("min_labeled_rows", n >= ds.min_labeled_rows, f"{n} labeled field rows (minimum {ds.min_labeled_rows})"),
    )
    checks.append(nan_check(Rows.concat(base_train, field) if n else base_train))
    checks.append(_balance(field, spec, ds.min_minority_fraction))
    field_train, field_hold = time_split(field, ds.holdout_fraction)
    scorable = len(field_hold) > 0 and (spec.metric != "auc" or len(np.unique(field_hold.y)) == 2)
    checks.append(
        Check(
            "field_slice",
            scorable,
            f"{len(field_hold)} field rows held out (the latest by time)"
            + ("" if scorable else "; the slice needs both classes to be scored"),
        )
    )
    return Rows.concat(base_train, field_train), Rows.concat(base_hold, field_hold), checks


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if not c.passed]
