"""Parquet/CSV inputs: a file or a directory of them, one row per prediction.

Each model input is filled from columns, in this order of precedence:

1. ``--map INPUT=COL1,COL2,...``;
2. the columns the manifest names for it (``feature_names``, e.g. the maintenance model's ``live``);
3. for a joined input (``feature_joins``): the join's feature columns when the table carries all of
   them (the client wins, as on the device), else the rows of ``--features SET[@VERSION]`` from the
   registry, looked up by the entity key.

Everything is checked before scoring: missing columns (all named), non-numeric columns, NaN
(row and column), empty input, entities missing from the feature set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype

from cloud_batch.errors import InputError
from cloud_batch.features.build import FeatureRegistry
from cloud_batch.features.tables import read_table
from cloud_batch.score.inputs import (
    TABLE_SUFFIXES,
    InputOptions,
    InputRows,
    Keys,
    RowNumbers,
    array_rows,
    as_input,
    check_finite,
    files_in,
    fingerprint_soon,
    row_width,
    shown,
)
from edge_agent.wire.bundle import Bundle
from edge_agent.wire.model.manifest import FeatureJoin, Manifest, TensorSpec


class TableReader:
    """Parquet/CSV files (or a directory of them, read in name order as one table)."""

    kind = "table"

    def matches(self, path: Path) -> bool:
        return bool(files_in(path, TABLE_SUFFIXES)) if path.is_dir() else path.suffix.lower() in TABLE_SUFFIXES

    def read(self, path: Path, manifest: Manifest, options: InputOptions) -> InputRows:
        files = files_in(path, TABLE_SUFFIXES)
        fp = fingerprint_soon(files, path)
        text = (options.entity_key,) if options.entity_key else ()
        frames = [read_table(f, text_columns=text, progress=False) for f in files]
        df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        where = str(path)
        if df.empty:
            raise InputError(f"{where} is empty: no rows to score")
        unknown = [k for k in options.mapping if manifest.input(k) is None]
        if unknown:
            raise InputError(f"--map names unknown inputs {shown(unknown)}; {manifest.name} takes {_names(manifest)}")
        key_name, keys = _keys(df, options.entity_key, where)
        columns, joined = _plan_columns(df, manifest, options)
        missing = sorted({c for cols in columns.values() for c in cols if c not in df.columns})
        if missing:
            raise InputError(f"{where} is missing column{'s' if len(missing) > 1 else ''} {shown(missing)}")
        arrays: dict[str, np.ndarray] = {}
        for name, cols in columns.items():
            arrays[name] = _column_block(df, manifest.input(name), cols, where)  # type: ignore[arg-type]
        identity: dict[str, object] = {}
        if joined:
            bundle, set_version = _feature_bundle(options)
            identity["features"] = set_version
            entity_col = options.entity_key or bundle.info.entity_key
            if entity_col not in df.columns:
                raise InputError(
                    f"{where} has no entity column {entity_col!r} to look up {bundle.info.set} (give --entity-key COL)"
                )
            entities = df[entity_col].astype(str).to_numpy()
            for join in joined:
                spec = manifest.input(join.input)
                arrays[join.input] = as_input(spec, _lookup(bundle, join, entities, where), join.input)  # type: ignore[arg-type]
        return array_rows(self.kind, arrays, key_name, keys, fp(), identity=identity)


def _names(manifest: Manifest) -> list[str]:
    return [s.name for s in manifest.inputs]


def _keys(df: pd.DataFrame, entity_key: str | None, where: str) -> tuple[str, Keys]:
    if entity_key is None:
        return "row", RowNumbers(0, len(df))
    if entity_key not in df.columns:
        raise InputError(f"{where} has no entity column {entity_key!r} (columns: {shown(list(df.columns))})")
    col = df[entity_key]
    if col.isna().any():
        raise InputError(f"{where}: entity column {entity_key!r} is empty in row {int(np.argmax(col.isna())) + 1}")
    return entity_key, col.astype(str).to_numpy().astype(str)


def _plan_columns(
    df: pd.DataFrame, manifest: Manifest, options: InputOptions
) -> tuple[dict[str, list[str]], list[FeatureJoin]]:
    """Input name -> its columns, and the joins to fill from ``--features``."""
    declared = manifest.extra.get("feature_names") or {}
    columns: dict[str, list[str]] = {}
    joined: list[FeatureJoin] = []
    for spec in manifest.inputs:
        join = manifest.feature_joins.get(spec.name)
        if spec.name in options.mapping:
            columns[spec.name] = list(options.mapping[spec.name])
        elif join is not None and (options.features is not None or not set(join.features) <= set(df.columns)):
            if options.features is None:
                absent = [f for f in join.features if f not in df.columns]
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


def _column_block(df: pd.DataFrame, spec: TensorSpec, cols: list[str], where: str) -> np.ndarray:
    if len(cols) != row_width(spec):
        raise InputError(
            f"input {spec.name!r} {list(spec.shape)} takes {row_width(spec)} values per row; {len(cols)} columns given"
        )
    bad = [c for c in cols if not is_numeric_dtype(df[c]) or is_bool_dtype(df[c])]
    if bad:
        detail = ", ".join(f"{c!r} ({df[c].dtype})" for c in bad[:5])
        raise InputError(f"{where}: column{'s' if len(bad) > 1 else ''} {detail} not numeric (input {spec.name!r})")
    block = df[cols].to_numpy(dtype=np.float64)
    check_finite(block, where, cols)
    return as_input(spec, block, where)


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


def _lookup(bundle: Bundle, join: FeatureJoin, entities: np.ndarray, where: str) -> np.ndarray:
    """The join's features for every entity, in the input's column order; missing ones use the default or fail."""
    have = list(bundle.info.feature_names)
    absent = [f for f in join.features if f not in have]
    if absent:
        raise InputError(f"feature set {bundle.info.set} {bundle.info.version} lacks features {shown(absent)}")
    cols = [have.index(f) for f in join.features]
    ents, vals = bundle.entities, bundle.values  # a snapshot: sorted entities, no deletes
    pos = np.searchsorted(ents, entities)
    pos = np.minimum(pos, max(len(ents) - 1, 0))
    found = (ents[pos] == entities) if len(ents) else np.zeros(len(entities), bool)
    out = np.empty((len(entities), len(cols)), dtype=np.float32)
    out[found] = vals[pos[found]][:, cols]
    if not found.all():
        if join.default is None:
            lost = list(dict.fromkeys(entities[~found].tolist()))
            raise InputError(
                f"{where}: {len(lost)} entit{'ies' if len(lost) > 1 else 'y'} not in feature set "
                f"{bundle.info.set} {bundle.info.version}: {shown(lost)} (first in row {int(np.argmax(~found)) + 1})"
            )
        out[~found] = np.asarray(join.default, dtype=np.float32)
    return out
