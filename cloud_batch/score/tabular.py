"""Parquet/CSV inputs: a file or a directory of them, one row per prediction.

Each model input is filled from columns, in this order of precedence:

1. ``--map INPUT=COL1,COL2,...``;
2. the columns the manifest names for it (``feature_names``, e.g. the maintenance model's ``live``);
3. for a joined input (``feature_joins``): the join's feature columns when the table carries all of
   them (the client wins, as on the device), else the rows of ``--features SET[@VERSION]`` from the
   registry, looked up by the entity key.

Everything is checked before scoring: missing columns (all named), non-numeric columns, NaN
(row and column), empty input, entities missing from the feature set.

The files are streamed: headers and schemas first (columns, widths, the feature set), then a
block of rows at a time (``rows_per_block``: ~8 MB as float64), only the columns needed. Each block is
checked, converted to the model's float32 rows and appended to a scratch file per input
(``RowSink``) that the workers map. The driver holds one block and the entity keys, not the table,
so a table larger than memory can be scored. Row numbers in errors count from 1 within the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cloud_batch.errors import InputError
from cloud_batch.features.build import FeatureRegistry
from cloud_batch.features.tables import PROGRESS_MIN_BYTES, bytes_bar, table_blocks, table_columns
from cloud_batch.score.inputs import (
    TABLE_SUFFIXES,
    InputOptions,
    InputRows,
    RowNumbers,
    RowSink,
    as_input,
    check_finite,
    files_in,
    fingerprint_soon,
    row_width,
    rows_per_block,
    shown,
    stored_rows,
)
from edge_agent.wire.bundle import Bundle
from edge_agent.wire.model.manifest import FeatureJoin, Manifest, TensorSpec

Block = dict[str, np.ndarray]  # a block of rows: column name -> its values


class TableReader:
    """Parquet/CSV files (or a directory of them, read in name order as one table), streamed a block at a time."""

    kind = "table"

    def matches(self, path: Path) -> bool:
        return bool(files_in(path, TABLE_SUFFIXES)) if path.is_dir() else path.suffix.lower() in TABLE_SUFFIXES

    def read(self, path: Path, manifest: Manifest, options: InputOptions) -> InputRows:
        files = files_in(path, TABLE_SUFFIXES)
        fp = fingerprint_soon(files, path)
        plan = Plan.make(path, files, manifest, options)
        sink = RowSink(options.scratch)
        size = sum(f.stat().st_size for f in files)
        try:
            with bytes_bar(path.name, size, options.progress and size >= PROGRESS_MIN_BYTES) as advance:
                n, keys = plan.stream(sink, advance)
            stored = sink.close(n)
        except BaseException:
            sink.discard()
            raise
        key_name, row_keys = (plan.key, np.concatenate(keys)) if plan.key is not None else ("row", RowNumbers(0, n))
        return stored_rows(self.kind, key_name, row_keys, fp(), stored, identity=plan.identity, scratch=sink.dir)


@dataclass
class Plan:
    """What to read from which files, checked against their headers before any row is read."""

    path: Path
    files: list[Path]
    manifest: Manifest
    key: str | None  # --entity-key
    columns: dict[str, list[str]]  # input -> its columns
    joined: list[FeatureJoin]
    bundle: Bundle | None = None  # --features, for the joined inputs
    entity_col: str | None = None  # the column the joins look up
    join_cols: dict[str, list[int]] = field(default_factory=dict)  # joined input -> its columns in the bundle
    identity: dict[str, object] = field(default_factory=dict)

    @classmethod
    def make(cls, path: Path, files: list[Path], manifest: Manifest, options: InputOptions) -> Plan:
        where = str(path)
        unknown = [k for k in options.mapping if manifest.input(k) is None]
        if unknown:
            raise InputError(f"--map names unknown inputs {shown(unknown)}; {manifest.name} takes {_names(manifest)}")
        heads = {f: table_columns(f) for f in files}
        names = list(dict.fromkeys(c for cols in heads.values() for c in cols))
        key = options.entity_key
        if key is not None and key not in names:
            raise InputError(f"{where} has no entity column {key!r} (columns: {shown(names)})")
        plan = cls(path, files, manifest, key, *_plan_columns(names, manifest, options))
        for name, cols in plan.columns.items():
            _check_width(plan._spec(name), cols)
        if plan.joined:
            plan.bundle, plan.identity["features"] = _feature_bundle(options)
            plan.entity_col = key or plan.bundle.info.entity_key
            plan.join_cols = {join.input: _join_columns(plan.bundle, join) for join in plan.joined}
            if plan.entity_col not in names:
                raise InputError(
                    f"{where} has no entity column {plan.entity_col!r} to look up {plan.bundle.info.set} "
                    "(give --entity-key COL)"
                )
        wanted = [c for cols in plan.columns.values() for c in cols]
        for f, have in heads.items():
            missing = sorted(set(wanted) - set(have))
            if missing:
                raise InputError(
                    f"{_named(f, path)} is missing column{'s' if len(missing) > 1 else ''} {shown(missing)}"
                )
        return plan

    @property
    def columns_read(self) -> list[str]:
        """The columns read: the keys first, then every input's."""
        firsts = [c for c in (self.key, self.entity_col) if c is not None]
        return list(dict.fromkeys([*firsts, *(c for cols in self.columns.values() for c in cols)]))

    def stream(self, sink: RowSink, advance: Callable[[int], None]) -> tuple[int, list[np.ndarray]]:
        """Read, check and convert every block into ``sink``, with ``advance(bytes read)``; (rows, the entity
        keys of each block)."""
        read, text = self.columns_read, (self.key,) if self.key else ()
        n, keys, lost, behind = 0, [], Lost(), 0  # behind: the bytes of the files already read

        def on_bytes(done: int) -> None:
            advance(behind + done)

        for f in self.files:
            first = 0
            for block in table_blocks(
                f, read, text_columns=text, rows=rows_per_block(8 * len(read)), on_bytes=on_bytes
            ):
                size = len(block[read[0]])
                if not size:
                    continue  # a header without rows
                at = Where(_named(f, self.path), first)
                if self.key is not None:
                    keys.append(_keys(block, self.key, at))
                for name, cols in self.columns.items():
                    sink.write(name, _column_block(block, self._spec(name), cols, at))
                if self.joined:
                    entities = block[self.entity_col].astype(str)  # type: ignore[index]
                for join in self.joined:
                    values = _lookup(self.bundle, join, self.join_cols[join.input], entities, lost, at)  # type: ignore[arg-type]
                    sink.write(join.input, as_input(self._spec(join.input), values, join.input))
                first += size
            n += first
            behind += f.stat().st_size
        if n == 0:
            raise InputError(f"{self.path} is empty: no rows to score")
        lost.check(self.bundle)
        return n, keys

    def _spec(self, name: str) -> TensorSpec:
        spec = self.manifest.input(name)
        assert spec is not None  # planned from the manifest's inputs
        return spec


@dataclass(frozen=True)
class Where:
    """Where a block lies, for errors: its file (or the input) and its first row there (0-based)."""

    file: str
    first: int

    def row(self, i: int) -> int:
        """Block row ``i`` as a 1-based row of the file."""
        return self.first + i + 1


class Lost:
    """Entities of joined inputs that the feature set lacks (and whose join has no default), over every block."""

    def __init__(self) -> None:
        self.entities: dict[str, None] = {}
        self.first: tuple[str, int] | None = None

    def add(self, entities: np.ndarray, found: np.ndarray, at: Where) -> None:
        """Note the entities where ``found`` is False."""
        if self.first is None:
            self.first = (at.file, at.row(int(np.argmax(~found))))
        self.entities.update(dict.fromkeys(entities[~found].tolist()))

    def check(self, bundle: Bundle | None) -> None:
        if self.first is None or bundle is None:
            return
        lost, (file, row) = list(self.entities), self.first
        raise InputError(
            f"{file}: {len(lost)} entit{'ies' if len(lost) > 1 else 'y'} not in feature set "
            f"{bundle.info.set} {bundle.info.version}: {shown(lost)} (first in row {row})"
        )


def _named(f: Path, path: Path) -> str:
    """The file to name in an error: the input itself, or the file of a directory input."""
    return str(f) if path.is_dir() else str(path)


def _names(manifest: Manifest) -> list[str]:
    return [s.name for s in manifest.inputs]


def _keys(block: Block, entity_key: str, at: Where) -> np.ndarray:
    col = block[entity_key]
    empty = pd.isna(col)
    if empty.any():
        raise InputError(f"{at.file}: entity column {entity_key!r} is empty in row {at.row(int(np.argmax(empty)))}")
    return col.astype(str)


def _plan_columns(
    names: list[str], manifest: Manifest, options: InputOptions
) -> tuple[dict[str, list[str]], list[FeatureJoin]]:
    """Input name -> its columns, and the joins to fill from ``--features``."""
    declared = manifest.extra.get("feature_names") or {}
    columns: dict[str, list[str]] = {}
    joined: list[FeatureJoin] = []
    for spec in manifest.inputs:
        join = manifest.feature_joins.get(spec.name)
        if spec.name in options.mapping:
            columns[spec.name] = list(options.mapping[spec.name])
        elif join is not None and (options.features is not None or not set(join.features) <= set(names)):
            if options.features is None:
                absent = [f for f in join.features if f not in names]
                raise InputError(
                    f"input {spec.name!r} is joined from feature set {join.set!r}: give --features "
                    f"{join.set}[@VERSION], or columns {shown(absent)}"
                )
            joined.append(join)
        elif join is not None:
            columns[spec.name] = list(join.features)
        elif isinstance(declared, dict) and spec.name in declared:
            columns[spec.name] = [str(c) for c in declared[spec.name]]
        else:
            raise InputError(
                f"{manifest.name}'s manifest names no columns for input {spec.name!r} "
                f"{list(spec.shape)}: give --map {spec.name}=COL1,COL2,..."
            )
    return columns, joined


def _check_width(spec: TensorSpec, cols: list[str]) -> None:
    if len(cols) != row_width(spec):
        raise InputError(
            f"input {spec.name!r} {list(spec.shape)} takes {row_width(spec)} values per row; {len(cols)} columns given"
        )


def _column_block(block: Block, spec: TensorSpec, cols: list[str], at: Where) -> np.ndarray:
    bad = [c for c in cols if block[c].dtype.kind not in "iuf"]
    if bad:
        detail = ", ".join(f"{c!r} ({block[c].dtype})" for c in bad[:5])
        raise InputError(f"{at.file}: column{'s' if len(bad) > 1 else ''} {detail} not numeric (input {spec.name!r})")
    values = np.empty((len(block[cols[0]]), len(cols)), dtype=np.float64)
    for j, c in enumerate(cols):
        values[:, j] = block[c]
    check_finite(values, at.file, cols, first_row=at.first)
    return as_input(spec, values, at.file)


def _feature_bundle(options: InputOptions) -> tuple[Bundle, str]:
    """The snapshot ``--features SET[@VERSION]`` names (the latest version without ``@``)."""
    text = options.features or ""
    set_name, _, version = text.partition("@")
    reg = FeatureRegistry(options.registry_dir)
    if not version:
        versions = reg.versions(set_name)
        if not versions:
            raise InputError(
                f"feature set {set_name!r} is not in the registry {options.registry_dir} (sets: {reg.sets() or 'none'})"
            )
        version = versions[-1]
    bundle = reg.read(set_name, version)
    return bundle, bundle.info.id


def _join_columns(bundle: Bundle, join: FeatureJoin) -> list[int]:
    """Where the join's features lie in the bundle's rows, in the input's order; InputError for one it lacks."""
    have = list(bundle.info.feature_names)
    absent = [f for f in join.features if f not in have]
    if absent:
        raise InputError(f"feature set {bundle.info.set} {bundle.info.version} lacks features {shown(absent)}")
    return [have.index(f) for f in join.features]


def _lookup(
    bundle: Bundle, join: FeatureJoin, cols: list[int], entities: np.ndarray, lost: Lost, at: Where
) -> np.ndarray:
    """The join's features (``cols`` of the bundle) for every entity; missing ones use the default or go to ``lost``."""
    ents, vals = bundle.entities, bundle.values  # a snapshot: sorted entities, no deletes
    pos = np.searchsorted(ents, entities)
    pos = np.minimum(pos, max(len(ents) - 1, 0))
    found = (ents[pos] == entities) if len(ents) else np.zeros(len(entities), bool)
    out = np.empty((len(entities), len(cols)), dtype=np.float32)
    out[found] = vals[pos[found]][:, cols]
    if not found.all():
        if join.default is None:
            lost.add(entities, found, at)
        out[~found] = np.asarray(join.default or 0.0, dtype=np.float32)
    return out
