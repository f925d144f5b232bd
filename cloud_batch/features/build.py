"""The feature registry and its snapshot versions (``cloud-batch features build``).

A batch job turns long histories (or a precomputed table) into one row of numbers per entity;
``build`` writes that as a feature bundle (``edge_agent.wire.bundle``); ``push`` (``features.push``)
publishes it as a signed Release of kind ``features``, retained on the feature topics devices
subscribe to.

Registry layout, beside the models in the same registry directory::

    DIR/features/.lock                                       flock held while a bundle is written
    DIR/features/SET/V/                                      snapshot of SET version V (immutable)
    DIR/features/SET/V.delta-from-V0/                        delta V0 -> V for everyone
    DIR/features/SET/V.partitions/<by>-<key>/                one partition's snapshot of V
    DIR/features/SET/V.partitions/<by>-<key>.delta-from-V0/  that partition's delta V0 -> V

Every directory holds ``bundle.json`` + ``data.npz`` and is built in a hidden temp dir, then
renamed into place. A snapshot version is immutable: building it again is a no-op when the
content is the same and an error when it differs. Deltas and partition bundles are derived from
the snapshots and kept so that pushing a version again publishes the *same bytes*: ``data.npz``
embeds its write time, and a device refuses a second, different bundle of a version it holds.
A derived bundle is rewritten only when what it is derived from changed (a new partition map).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from cloud_batch.errors import InputError, RegistryError, input_errors
from cloud_batch.features.recipes import RECIPES
from cloud_batch.features.tables import FeatureTable, read_table, table_from_frame
from cloud_batch.progress import Reporter
from cloud_batch.registry.models import _publishable
from edge_agent.errors import BundleRejected, EdgeError
from edge_agent.fsutil import fsync_dir, fsync_tree, locked
from edge_agent.wire.bundle import DTYPES, STALE_POLICIES, Bundle, BundleInfo, read_bundle, read_info, write_bundle
from edge_agent.wire.names import check_segment, parse_version

log = logging.getLogger(__name__)

FEATURES_DIR = "features"
DELTA_MARK = ".delta-from-"
PARTITIONS_SUFFIX = ".partitions"
PROGRESS_MIN_ROWS = 200_000  # tables from this many rows get status lines while they are checked


class FeatureRegistry:
    """Feature-set versions under ``DIR/features`` (see the module docstring for the layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.base = self.root / FEATURES_DIR

    def sets(self) -> list[str]:
        if not self.base.is_dir():
            return []
        return sorted(
            p.name for p in self.base.iterdir() if p.is_dir() and not p.name.startswith(".") and self.versions(p.name)
        )

    def versions(self, set_name: str) -> list[str]:
        """Snapshot versions of ``set_name``, oldest first (numeric order)."""
        d = self.base / set_name
        if not d.is_dir():
            return []
        found = []
        for p in d.iterdir():
            if p.name.startswith(".") or not (p / "bundle.json").is_file():
                continue
            try:
                found.append((parse_version(p.name), p.name))
            except EdgeError:
                continue  # derived bundles (V.delta-from-V0) and partition folders
        return [name for _, name in sorted(found)]

    def snapshot_path(self, set_name: str, version: str) -> Path:
        return self.base / set_name / version

    def delta_path(self, set_name: str, version: str, base_version: str) -> Path:
        return self.base / set_name / f"{version}{DELTA_MARK}{base_version}"

    def partition_path(
        self, set_name: str, version: str, partition: tuple[str, str], base_version: str | None = None
    ) -> Path:
        name = f"{partition[0]}-{partition[1]}" + (f"{DELTA_MARK}{base_version}" if base_version else "")
        return self.base / set_name / f"{version}{PARTITIONS_SUFFIX}" / name

    def read(self, set_name: str, version: str) -> Bundle:
        """The snapshot of ``set_name`` ``version``, fully validated; RegistryError if absent or broken."""
        path = self.snapshot_path(set_name, version)
        if not (path / "bundle.json").is_file():
            if not self.versions(set_name):
                raise RegistryError(
                    f"feature set {set_name!r} is not in the registry {self.root} "
                    f"(sets: {self.sets() or 'none'}); build it with `cloud-batch features build`"
                )
            raise RegistryError(
                f"feature set {set_name!r} has no version {version!r} in {self.root} "
                f"(versions: {self.versions(set_name)})"
            )
        try:
            bundle = read_bundle(path)
        except BundleRejected as exc:
            raise RegistryError(f"{path} is not a valid feature bundle: {exc}") from exc
        info = bundle.info
        if (info.set, info.version, info.kind) != (set_name, version, "snapshot"):
            raise RegistryError(
                f"{path}: its bundle.json says {info.set} {info.version} ({info.kind}), "
                f"not the snapshot {set_name} {version}"
            )
        return bundle

    def locked(self) -> AbstractContextManager[None]:
        """An exclusive lock on the feature registry (one writer publishes a directory at a time)."""
        return locked(self.base / ".lock")


@dataclass
class BuildResult:
    """What ``build`` did: ``created`` is False when the same content was already registered."""

    set: str
    version: str
    path: Path
    info: BundleInfo
    created: bool
    source: str = ""

    def summary(self) -> str:
        what = "built" if self.created else "already built (same content, nothing written)"
        return (
            f"{what}: feature set {self.set} version {self.version} -> {self.path}\n"
            f"  {self.info.rows:,} entities ({self.info.entity_key}) x {len(self.info.features)} features "
            f"({self.info.features[0].dtype}), bundle {self.info.id}"
            + (f"\n  from {self.source}" if self.source else "")
        )


def check_version(version: str, what: str = "version") -> str:
    try:
        parse_version(version)
    except EdgeError as exc:
        raise InputError(f"{what}: {exc}") from exc
    return version


def check_set(set_name: str) -> str:
    with input_errors():
        return check_segment(set_name, "feature set name")


def _check_build_options(ttl_s: float | None, stale_policy: str, dtype: str) -> None:
    if ttl_s is not None and (
        isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not math.isfinite(ttl_s) or ttl_s <= 0
    ):
        raise InputError(f"ttl {ttl_s!r} s must be a positive number of seconds")
    if stale_policy not in STALE_POLICIES:
        raise InputError(f"stale policy {stale_policy!r} is not one of {list(STALE_POLICIES)}")
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {list(DTYPES)}")


def build(
    registry_dir: str | Path,
    set_name: str,
    version: str,
    *,
    source: str | Path | None = None,
    entity_key: str | None = None,
    recipe: str | None = None,
    history: str | Path | None = None,
    as_of: str | None = None,
    seed: int = 0,
    n_assets: int = 200,
    days: int = 60,
    ttl_s: float | None = None,
    stale_policy: str = "reject",
    event_ts_col: str | None = None,
    dtype: str = "float32",
    progress: bool = True,
    now: float | None = None,
) -> BuildResult:
    """Build snapshot ``version`` of ``set_name`` from a file (``source`` + ``entity_key``) or a ``recipe``.

    Raises InputError for bad inputs and RegistryError when the version exists with other content;
    nothing is written in either case.
    """
    check_set(set_name)
    check_version(version)
    _check_build_options(ttl_s, stale_policy, dtype)
    if (source is None) == (recipe is None):
        raise InputError("give exactly one of --from FILE (with --entity-key) or --recipe NAME")
    reporter = Reporter(enabled=progress)
    if source is not None:
        if not entity_key:
            raise InputError("--from needs --entity-key COL (the column that names each entity)")
        if history is not None or as_of is not None:
            raise InputError("--history and --as-of are options of --recipe, not of --from")
        frame = read_table(source, text_columns=(entity_key,), progress=progress)
        if len(frame) >= PROGRESS_MIN_ROWS:
            reporter.status(f"checking {len(frame):,} rows x {frame.shape[1]} columns of {source}")
        table = table_from_frame(frame, entity_key, event_ts_col=event_ts_col, dtype=dtype, now=now, source=str(source))
    else:
        if recipe not in RECIPES:
            raise InputError(f"unknown recipe {recipe!r}; recipes: {', '.join(sorted(RECIPES))}")
        if entity_key is not None or event_ts_col is not None:
            raise InputError(f"--entity-key and --event-ts-col are options of --from; recipe {recipe} defines its own")
        if dtype != "float32":
            raise InputError(f"recipe {recipe} produces float32 features (the model's input); drop --dtype")
        options = {"history": history, "as_of": as_of, "seed": seed, "n_assets": n_assets, "days": days}
        table = RECIPES[recipe](registry_dir=registry_dir, reporter=reporter, **options)
    reporter.status(f"writing {len(table.entities):,} entities x {len(table.features)} features")
    return write_snapshot(registry_dir, set_name, version, table, ttl_s=ttl_s, stale_policy=stale_policy)


def write_snapshot(
    registry_dir: str | Path,
    set_name: str,
    version: str,
    table: FeatureTable,
    *,
    ttl_s: float | None = None,
    stale_policy: str = "reject",
) -> BuildResult:
    """Write ``table`` as snapshot ``version`` (temp dir, then rename); a no-op if the same content is there.

    Without explicit event times (``table.explicit_ts`` False) the timestamps are not compared:
    rebuilding the same values is a no-op and the registered version keeps its times.
    """
    check_set(set_name)
    check_version(version)
    _check_build_options(ttl_s, stale_policy, table.dtype)
    reg = FeatureRegistry(registry_dir)
    target = reg.snapshot_path(set_name, version)

    write = partial(
        write_bundle, set=set_name, version=version, kind="snapshot", entities=table.entities,
        event_ts=table.event_ts, values=table.values, features=table.features, ttl_s=ttl_s,
        stale_policy=stale_policy, entity_key=table.entity_key, dtype=table.dtype,
    )  # fmt: skip
    source = table.source or "the input"
    with staged_bundle(reg, target, write, lambda exc: InputError(f"{source}: {exc}")) as (work, staged):
        if target.exists():
            try:
                old = read_bundle(target)
            except BundleRejected as exc:
                raise RegistryError(
                    f"{set_name} version {version} exists at {target} but is unreadable: {exc}"
                ) from exc
            diffs = bundle_differences(old, staged, event_ts=table.explicit_ts)
            if diffs:
                raise RegistryError(
                    f"feature set {set_name} version {version} already exists in {reg.root} with different content "
                    f"({'; '.join(diffs)}); versions are immutable, build a new version "
                    f"(next free: {_next_version(reg.versions(set_name))})"
                )
            return BuildResult(set_name, version, target, old.info, False, table.source)
        os.rename(work, target)
        fsync_dir(target.parent)
    log.info("features %s: built %s %s (%d rows)", staged.info.id, set_name, version, staged.info.rows)
    return BuildResult(set_name, version, target, read_info(target), True, table.source)


@contextmanager
def staged_bundle(
    reg: FeatureRegistry, target: Path, write: Callable[[Path], object], rejected: Callable[[BundleRejected], Exception]
) -> Iterator[tuple[Path, Bundle]]:
    """Write a bundle into a hidden temp dir beside ``target`` and check it as a device would.

    Yields (temp dir, bundle) with the registry lock held, so the caller decides and renames it
    into place atomically; the temp dir is removed afterwards whatever happened. A bundle the
    reader refuses raises ``rejected(exc)``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        try:
            write(work)
            staged = read_bundle(work)
        except BundleRejected as exc:
            raise rejected(exc) from exc
        _publishable(work)
        fsync_tree(work)
        with reg.locked():
            yield work, staged
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _next_version(versions: list[str]) -> str:
    return str(parse_version(versions[-1])[0] + 1) if versions else "1"


def bundle_differences(a: Bundle, b: Bundle, *, event_ts: bool = True) -> list[str]:
    """What differs between two bundles' content (``created_at`` and the npz bytes aside); [] if nothing."""
    ia, ib = a.info, b.info
    out = [
        f"{k} {getattr(ia, k)!r} != {getattr(ib, k)!r}"
        for k in ("set", "version", "kind", "base_version", "entity_key", "ttl_s", "stale_policy")
        if getattr(ia, k) != getattr(ib, k)
    ]
    if ia.features != ib.features:
        out.append("features/dtype")
    if dict(ia.partition) != dict(ib.partition):
        out.append(f"partition {dict(ia.partition)} != {dict(ib.partition)}")
    if not np.array_equal(a.entities, b.entities):
        out.append(f"entities ({len(a.entities)} vs {len(b.entities)})")
    elif ia.features == ib.features and not np.array_equal(a.values, b.values):
        out.append(f"values of {int((a.values != b.values).any(axis=1).sum())} entities")
    elif event_ts and not np.array_equal(a.event_ts, b.event_ts):
        out.append("event timestamps")
    if not np.array_equal(a.deleted, b.deleted):
        out.append("deleted entities")
    return out
