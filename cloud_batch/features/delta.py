"""Deltas and partition bundles, derived from the registry's snapshots (what ``push`` ships).
embeds its write time, and a device refuses a second, different bundle of a version it holds.
A derived bundle is rewritten only when what it is derived from changed (a new partition map).

Partitions: ``--partition-map`` (CSV ``entity,partition`` with ``device:<id>`` or ``group:<name>``)
splits the entities; each partition gets its own bundle and release on
``features_topic(fleet, SET, by, key)``. Every entity of V must be mapped. For a partition's
delta the base is the partition bundle V0 was pushed as (what those devices hold); when there is
none, V0 split by the current map. Entities removed since V0 that the map does not place are
deleted in every partition's delta (deleting an absent id is a no-op on a device). A partition
whose map entries name no entity of V gets an empty snapshot (its devices drop the set's rows).
Retained releases of the set on topics this push does not touch are left alone and listed.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cloud_batch.errors import InputError, RegistryError
from cloud_batch.features.build import FeatureRegistry, bundle_differences, staged_bundle
from cloud_batch.features.tables import shown
from edge_agent.errors import BundleRejected, EdgeError
from edge_agent.fsutil import fsync_dir
from edge_agent.wire.bundle import Bundle, BundleInfo, read_bundle, write_bundle
from edge_agent.wire.names import check_segment

log = logging.getLogger(__name__)

ALL: tuple[str, str] = ("all", "all")  # the partition of a release for the whole fleet


@dataclass
class Rows:
    """Arrays of one bundle's upserts (sorted by entity) and deletions."""

    entities: np.ndarray
    event_ts: np.ndarray
    values: np.ndarray
    deleted: np.ndarray = field(default_factory=lambda: np.empty(0, dtype="<U1"))

    @classmethod
    def of(cls, bundle: Bundle) -> Rows:
        return cls(bundle.entities, bundle.event_ts, bundle.values, bundle.deleted)

    def take(self, mask: np.ndarray) -> Rows:
        return Rows(self.entities[mask], self.event_ts[mask], self.values[mask])


def compute_delta(base: Rows, new: Rows) -> Rows:
    """Upserts (new entities, or a row whose values or event_ts changed) and deletions (gone since base)."""
    in_base = np.isin(new.entities, base.entities, assume_unique=True)
    changed = ~in_base
    if in_base.any():
        common = new.entities[in_base]
        idx = np.searchsorted(base.entities, common)  # base.entities is sorted (read_bundle)
        diff = (base.values[idx] != new.values[in_base]).any(axis=1) | (base.event_ts[idx] != new.event_ts[in_base])
        changed[np.flatnonzero(in_base)[diff]] = True
    deleted = np.setdiff1d(base.entities, new.entities, assume_unique=True)
    out = new.take(changed)
    out.deleted = deleted if len(deleted) else np.empty(0, dtype="<U1")
    return out


def read_partition_map(path: str | Path) -> dict[str, tuple[str, str]]:
    """``entity,partition`` CSV → {entity: (by, key)} where partition is ``device:<id>`` or ``group:<name>``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"partition map not found: {p}")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as exc:
        raise InputError(f"partition map {p} is empty (expected the header entity,partition)") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise InputError(f"cannot read partition map {p}: {exc}") from exc
    cols = [str(c).strip() for c in df.columns]
    if cols[:2] != ["entity", "partition"] or len(cols) != 2:
        raise InputError(f"partition map {p}: expected the columns entity,partition, got {','.join(cols)}")
    if df.empty:
        raise InputError(f"partition map {p} has no rows")
    out: dict[str, tuple[str, str]] = {}
    for row, (entity, part) in enumerate(zip(df.iloc[:, 0].tolist(), df.iloc[:, 1].tolist(), strict=True), start=2):
        entity, part = entity.strip(), part.strip()
        where = f"partition map {p} line {row}"
        if not entity:
            raise InputError(f"{where}: empty entity")
        by, sep, key = part.partition(":")
        if not sep or by not in ("device", "group"):
            raise InputError(f"{where}: partition {part!r} for entity {entity!r} must be device:<id> or group:<name>")
        try:
            check_segment(key, f"{by} name")
        except EdgeError as exc:
            raise InputError(f"{where}: {exc}") from exc
        if entity in out:
            raise InputError(
                f"{where}: entity {entity!r} is mapped twice ({out[entity][0]}:{out[entity][1]} and {part})"
            )
        out[entity] = (by, key)
    return out


def split_by_partition(
    entities: np.ndarray, mapping: Mapping[str, tuple[str, str]]
) -> dict[tuple[str, str], np.ndarray]:
    """{partition: boolean mask over ``entities``}; entities the map does not place are left out."""
    labels = np.array([f"{b}:{k}" for b, k in (mapping.get(str(e), ("", "")) for e in entities.tolist())], dtype=object)
    parts = sorted(set(mapping.values()))
    return {part: labels == f"{part[0]}:{part[1]}" for part in parts}


def check_delta_compatible(base: BundleInfo, new: BundleInfo) -> None:
    if base.features != new.features or base.entity_key != new.entity_key:
        raise InputError(
            f"cannot compute a delta from {base.set} {base.version} to {new.version}: the feature list, "
            "dtype or entity key changed; push the snapshot (omit --delta-from)"
        )


def plan_bundles(
    reg: FeatureRegistry, snapshot: Bundle, base: Bundle | None, mapping: Mapping[str, tuple[str, str]] | None
) -> list[tuple[tuple[str, str], Path, Path | None]]:
    """(partition, bundle dir, fallback snapshot dir) per release; derived bundles are written here."""
    info = snapshot.info
    snapshot_path = reg.snapshot_path(info.set, info.version)
    if mapping is None:
        if base is None:
            return [(ALL, snapshot_path, None)]
        delta = compute_delta(Rows.of(base), Rows.of(snapshot))
        path = reg.delta_path(info.set, info.version, base.info.version)
        _ensure_derived(reg, path, info, "delta", delta, base_version=base.info.version, partition=None)
        return [(ALL, path, snapshot_path)]

    masks = split_by_partition(snapshot.entities, mapping)
    placed = np.zeros(len(snapshot.entities), dtype=bool)
    for m in masks.values():
        placed |= m
    if not placed.all():
        missing = snapshot.entities[~placed]
        raise InputError(
            f"the partition map does not place {len(missing)} of the {len(placed)} entities of "
            f"{info.set} {info.version}: {shown([str(e) for e in missing])}; add them (every entity "
            "needs a partition)"
        )
    now_rows = Rows.of(snapshot)
    base_rows = Rows.of(base) if base is not None else None
    unplaced_gone = np.empty(0, dtype="<U1")
    base_masks: dict[tuple[str, str], np.ndarray] = {}
    if base is not None:
        base_masks = split_by_partition(base.entities, mapping)
        in_map = np.zeros(len(base.entities), dtype=bool)
        for m in base_masks.values():
            in_map |= m
        unplaced_gone = base.entities[~in_map]  # not in V (every entity of V is placed)
    plans: list[tuple[tuple[str, str], Path, Path | None]] = []
    for part, mask in masks.items():
        pdict = {"by": part[0], "key": part[1]}
        snap_path = reg.partition_path(info.set, info.version, part)
        _ensure_derived(reg, snap_path, info, "snapshot", now_rows.take(mask), base_version=None, partition=pdict)
        if base is None or base_rows is None:
            plans.append((part, snap_path, None))
            continue
        pushed_base = reg.partition_path(info.set, base.info.version, part)
        prev = _read_derived(pushed_base, base.info.version, "snapshot", pdict)
        if prev is not None and prev.info.features == info.features and prev.info.entity_key == info.entity_key:
            delta = compute_delta(Rows.of(prev), now_rows.take(mask))
        else:
            delta = compute_delta(base_rows.take(base_masks[part]), now_rows.take(mask))
            if len(unplaced_gone):
                delta.deleted = np.union1d(delta.deleted, unplaced_gone)
        delta_path = reg.partition_path(info.set, info.version, part, base.info.version)
        _ensure_derived(reg, delta_path, info, "delta", delta, base_version=base.info.version, partition=pdict)
        plans.append((part, delta_path, snap_path))
    return plans


def _read_derived(path: Path, version: str, kind: str, partition: Mapping[str, Any] | None) -> Bundle | None:
    if not (path / "bundle.json").is_file():
        return None
    try:
        b = read_bundle(path)
    except BundleRejected:
        return None
    if (
        b.info.version != version
        or b.info.kind != kind
        or dict(b.info.partition) != dict(partition or {"by": None, "key": None})
    ):
        return None
    return b


def _ensure_derived(
    reg: FeatureRegistry,
    path: Path,
    like: BundleInfo,
    kind: str,
    rows: Rows,
    *,
    base_version: str | None,
    partition: Mapping[str, str] | None,
) -> Bundle:
    """Write a derived bundle at ``path`` unless the same content is already there (then keep its bytes)."""

    def write(work: Path) -> None:
        write_bundle(
            work, like.set, like.version, kind, rows.entities, rows.event_ts, rows.values, like.features,
            ttl_s=like.ttl_s, stale_policy=like.stale_policy, base_version=base_version, deleted=rows.deleted,
            entity_key=like.entity_key, partition=partition,
        )  # fmt: skip

    def rejected(exc: BundleRejected) -> Exception:
        return RegistryError(f"cannot write {path}: {exc}")

    with staged_bundle(reg, path, write, rejected) as (work, staged):
        if path.exists():
            try:
                old = read_bundle(path)
                if not bundle_differences(old, staged):
                    return old
            except BundleRejected:
                pass  # broken: replace it
            retired = path.with_name(f".old-{path.name}-{uuid.uuid4().hex[:8]}")
            os.rename(path, retired)
            os.rename(work, path)
            shutil.rmtree(retired, ignore_errors=True)
            log.info("features %s: rewrote %s (its inputs changed)", staged.info.id, path)
        else:
            os.rename(work, path)
        fsync_dir(path.parent)
    return read_bundle(path)
