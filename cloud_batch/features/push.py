"""Publish a feature set version to a fleet as signed releases (``cloud-batch features push``).

Push order (as ``release.release``): every input is checked and every bundle built and signed
before connecting; then the retained releases of the set are read, every artifact's chunks
published (for a delta also the snapshot it falls back to), then the signed releases, and last
the superseded artifacts' chunks are cleared.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_batch.errors import BrokerError, InputError, RegistryError, input_errors
from cloud_batch.features.build import FeatureRegistry, check_set, check_version
from cloud_batch.features.delta import ALL, check_delta_compatible, plan_bundles, read_partition_map
from cloud_batch.fleetops.broker import BrokerLink, publish_doc
from cloud_batch.fleetops.fleet import FleetView
from cloud_batch.fleetops.keys import load_signing_key
from cloud_batch.fleetops.release import clear_superseded, make_release_id, publish_chunks
from cloud_batch.fleetops.signer import sign_release
from cloud_batch.registry.signed import SignedLog
from edge_agent.errors import EdgeError
from edge_agent.wire.artifact import DEFAULT_CHUNK_SIZE, Artifact
from edge_agent.wire.bundle import BundleInfo, read_info
from edge_agent.wire.names import check_segment, parse_version
from edge_agent.wire.protocol import Release, decode, pack_dir
from edge_agent.wire.topics import features_set_filter, features_topic

log = logging.getLogger(__name__)


@dataclass
class PlannedRelease:
    """One partition's signed release and the bundle directories it ships."""

    partition: tuple[str, str]
    topic: str
    bundle_dir: Path
    info: BundleInfo
    blob: bytes
    release: Release
    signed: dict[str, Any]
    fallback_dir: Path | None = None
    fallback_blob: bytes | None = None


@dataclass
class PushResult:
    """What ``push`` published and cleared."""

    set: str
    version: str
    fleet: str
    releases: list[PlannedRelease]
    cleared: list[str] = field(default_factory=list)  # sha256 of artifacts whose chunks were deleted
    other_topics: list[str] = field(default_factory=list)  # retained releases of this set not touched

    def summary(self) -> str:
        lines = [
            f"pushed feature set {self.set} {self.version} to fleet {self.fleet}: "
            f"{len(self.releases)} release{'s' if len(self.releases) != 1 else ''}"
        ]
        for r in self.releases:
            a, info = r.release.artifact, r.info
            what = (
                f"delta from {info.base_version}: {info.rows:,} upserts, {info.deletes:,} deletions"
                if info.kind == "delta"
                else f"snapshot: {info.rows:,} entities"
            )
            lines.append(f"  {r.topic}  {r.release.release_id}")
            lines.append(
                f"    {what}; artifact {a.sha256[:12]}… {a.size:,} bytes in {len(a.chunks)} chunk(s)"
                + (
                    f"; fallback snapshot {r.release.fallback.sha256[:12]}… {r.release.fallback.size:,} bytes"
                    if r.release.fallback
                    else ""
                )
            )
        if self.cleared:
            lines.append(
                f"  cleared {len(self.cleared)} superseded artifact(s): "
                + ", ".join(s[:12] + "…" for s in self.cleared)
            )
        for t in self.other_topics:
            lines.append(f"  note: {t} still holds an older release of {self.set} (not part of this push)")
        return "\n".join(lines)


@dataclass
class PushPlan:
    """A push checked, built and signed locally (nothing has touched the broker yet)."""

    set: str
    version: str
    fleet: str
    chunk_size: int
    releases: list[PlannedRelease]


def push(
    registry_dir: str | Path,
    set_name: str,
    version: str,
    fleet: str,
    key_path: str | Path,
    link: BrokerLink,
    *,
    delta_from: str | None = None,
    partition_map: str | Path | Mapping[str, tuple[str, str]] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
    publish_timeout_s: float = 60.0,
) -> PushResult:
    """``plan_push`` then ``publish_push`` on ``link`` (open: ``fleetops.broker.open_link``): publish snapshot
    ``version`` of ``set_name`` (or a delta from ``delta_from``) to ``fleet`` in one call (the pipeline, tests).

    Raises InputError / RegistryError for bad inputs (nothing published), BrokerError when the broker
    does not acknowledge a publish.
    """
    plan = plan_push(
        registry_dir,
        set_name,
        version,
        fleet,
        key_path,
        delta_from=delta_from,
        partition_map=partition_map,
        chunk_size=chunk_size,
    )
    return publish_push(link, plan, progress=progress, publish_timeout_s=publish_timeout_s)


def plan_push(
    registry_dir: str | Path,
    set_name: str,
    version: str,
    fleet: str,
    key_path: str | Path,
    *,
    delta_from: str | None = None,
    partition_map: str | Path | Mapping[str, tuple[str, str]] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> PushPlan:
    """Step 1: check every input, write the derived bundles and sign every release; no broker I/O."""
    with input_errors():
        check_segment(fleet, "fleet")
    check_set(set_name)
    check_version(version)
    if delta_from is not None:
        check_version(delta_from, "--delta-from")
        if parse_version(delta_from) >= parse_version(version):
            raise InputError(f"--delta-from {delta_from} is not older than version {version}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise InputError(f"chunk size {chunk_size!r} must be a positive number of bytes")
    reg = FeatureRegistry(registry_dir)
    if not reg.root.is_dir():
        raise RegistryError(f"registry {reg.root} does not exist")
    snapshot = reg.read(set_name, version)
    base = reg.read(set_name, delta_from) if delta_from is not None else None
    if base is not None:
        check_delta_compatible(base.info, snapshot.info)
    if isinstance(partition_map, (str, Path)):
        partition_map = read_partition_map(partition_map)
    mapping = dict(partition_map) if partition_map is not None else None
    key = load_signing_key(key_path)

    now = time.time()
    releases: list[PlannedRelease] = []
    for part, bundle_dir, fallback_dir in plan_bundles(reg, snapshot, base, mapping):
        blob = _pack(bundle_dir)
        fallback_blob = _pack(fallback_dir) if fallback_dir is not None else None
        rel = Release(
            release_id=features_release_id(set_name, version, part, now),
            fleet=fleet,
            name=set_name,
            version=version,
            artifact=Artifact.from_blob(blob, chunk_size),
            kind="features",
            partition={"by": part[0], "key": part[1]},
            fallback=Artifact.from_blob(fallback_blob, chunk_size) if fallback_blob is not None else None,
        )
        signed = sign_release(rel, key, SignedLog(registry_dir))
        topic = features_topic(fleet, set_name, *part)
        info = read_info(bundle_dir)
        releases.append(PlannedRelease(part, topic, bundle_dir, info, blob, rel, signed, fallback_dir, fallback_blob))
        log.info(
            "release %s: feature set %s %s (%s) for %s/%s, %d bytes",
            rel.release_id,
            set_name,
            version,
            info.kind,
            *part,
            len(blob),
        )
    return PushPlan(set_name, version, fleet, chunk_size, releases)


def publish_push(
    link: BrokerLink,
    plan: PushPlan,
    *,
    progress: bool = True,
    publish_timeout_s: float = 60.0,
    sync_timeout_s: float = 5.0,
) -> PushResult:
    """Steps 2-5 on an open link: read what is retained, publish chunks, then releases, then clear."""
    releases = plan.releases
    result = PushResult(plan.set, plan.version, plan.fleet, releases)
    # 2. What this push supersedes: every retained release of the set, on any partition topic.
    previous = _retained_releases(link, plan.fleet, plan.set, timeout_s=sync_timeout_s)

    # 3. Every artifact's chunks (the fallback snapshots too) before any release points at them.
    published: set[str] = set()
    for r in releases:
        shipped = ((r.fallback_blob, r.release.fallback, "fallback"), (r.blob, r.release.artifact, r.info.kind))
        for blob, art, label in shipped:
            if blob is None or art is None or art.sha256 in published:
                continue
            where = f"{plan.set} {plan.version} {r.partition[0]}/{r.partition[1]} {label}"
            got = publish_chunks(link, blob, plan.chunk_size, publish_timeout_s, progress, where)
            if (got.sha256, got.chunks) != (art.sha256, art.chunks):
                raise BrokerError(
                    f"release {r.release.release_id}: the published chunks do not match the signed artifact description"
                )
            published.add(art.sha256)

    # 4. The signed releases, retained.
    for r in releases:
        publish_doc(link, r.topic, r.signed, wait_s=publish_timeout_s)

    # 5. Superseded artifacts: referenced by a replaced release and by no release still retained.
    result.other_topics, result.cleared = _clear_superseded(link, releases, previous, publish_timeout_s)
    return result


def _clear_superseded(
    link: BrokerLink, releases: list[PlannedRelease], previous: Mapping[str, Release], timeout_s: float
) -> tuple[list[str], list[str]]:
    """Clear the artifacts no retained release refers to any more: (untouched topics, cleared sha256s)."""
    new_topics = {r.topic for r in releases}
    keep = {a.sha256 for r in releases for a in (r.release.artifact, r.release.fallback) if a is not None}
    keep |= {
        a.sha256
        for t, rel in previous.items()
        if t not in new_topics
        for a in (rel.artifact, rel.fallback)
        if a is not None
    }
    cleared: list[str] = []
    for r in releases:
        old = previous.get(r.topic)
        if old is None:
            continue
        for art in (old.artifact, old.fallback):
            if art is not None and art.sha256 not in keep:
                clear_superseded(link, art, r.release.release_id, old.release_id, timeout_s)
                keep.add(art.sha256)  # cleared once
                cleared.append(art.sha256)
    return sorted(t for t in previous if t not in new_topics), cleared


def features_release_id(set_name: str, version: str, partition: tuple[str, str], now: float | None = None) -> str:
    """Readable and unique per topic and millisecond: ``asset_features-3-device.cam-7-20250101T120000.123Z``."""
    rid = make_release_id(set_name, version, now)
    if partition == ALL:
        return rid
    prefix = f"{set_name}-{version}-"
    return f"{prefix}{partition[0]}.{partition[1]}-{rid[len(prefix) :]}"


def _pack(path: Path) -> bytes:
    try:
        return pack_dir(path)
    except OSError as exc:
        raise RegistryError(f"cannot read {path}: {exc}") from exc


def _retained_releases(link: BrokerLink, fleet: str, set_name: str, timeout_s: float) -> dict[str, Release]:
    """Topic → the retained, parseable Release on every partition topic of ``set_name``."""
    filt = features_set_filter(fleet, set_name)
    found: dict[str, Release] = {}

    def on_release(topic: str, payload: bytes, retained: bool) -> None:
        if not payload:
            found.pop(topic, None)
            return
        try:
            found[topic] = Release.from_dict(decode(payload, "release"))
        except EdgeError as exc:
            log.warning("%s: ignoring an unreadable retained release: %s", topic, exc)

    link.subscribe(filt, on_release, qos=0)
    try:
        # FleetView's probe comes back after the retained messages of every earlier subscription
        # on the same connection, ours included.
        FleetView(link, fleet, devices=False).sync(timeout_s=timeout_s)
    finally:
        link.unsubscribe(filt)
    return dict(found)
