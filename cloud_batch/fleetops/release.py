"""Publish a signed model release to a fleet over MQTT (``cloud-batch release``).

Order of work, chosen so that a device never sees a document it cannot act on:

1. check every input locally (registry version, stages, window, rates, key), seal the model for the
   fleet key when asked (``--encrypt``: ``sealed_copy``), sign the release
   and its first rollout with the registry's next ``seq`` each, and record both in the registry
   (``plan_release``, ``signer``): a bad input publishes nothing; the CLI only connects after this;
2. on the open link (``publish_release``); the release it supersedes comes from the registry's
   record of what was signed (``SignedLog``), never from the retained copy, which anyone with
   publish rights could have replaced;
3. publish the artifact's chunks, retained, and wait for every PUBACK (``publish.publish_artifact``);
4. publish the rollout control (stage 0) *before* the release: an agent applies a release
   whose rollout it has not seen after a short settle time, so the rollout must already be
   there when the release arrives;
5. publish the signed release, retained;
6. clear the superseded artifact's retained chunks (unless it is the same artifact).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cloud_batch.errors import BrokerError, InputError, RegistryError, input_errors
from cloud_batch.fleetops.broker import BrokerLink, publish_doc
from cloud_batch.fleetops.keys import describe_fleet_key, load_fleet_public_key, load_signing_key
from cloud_batch.fleetops.model_policy import model_policy
from cloud_batch.fleetops.publish import clear_artifact, publish_artifact
from cloud_batch.fleetops.signer import sign_release, sign_rollout
from cloud_batch.registry.models import Registry
from cloud_batch.registry.signed import SignedLog
from edge_agent.errors import EdgeError
from edge_agent.fsutil import fsync_dir, fsync_tree
from edge_agent.models.sealed import FLEET_PUB_FILE, seal_version_dir
from edge_agent.wire.artifact import DEFAULT_CHUNK_SIZE, Artifact
from edge_agent.wire.model.manifest import MANIFEST_FILE, Manifest
from edge_agent.wire.names import check_segment
from edge_agent.wire.policy import Policy, parse_window
from edge_agent.wire.protocol import Release, Rollout, pack_dir
from edge_agent.wire.topics import release_topic, rollout_topic

log = logging.getLogger(__name__)

SEALED_DIR = ".sealed"  # <record dir>/.sealed/<fleet key id>/<name>/<version>/: sealed once, re-released as is
PROGRESS_MIN_CHUNKS = 8  # smaller artifacts publish in well under a second: no bar
ROLLBACK_EXPIRES_S = 7 * 24 * 3600.0  # a rollback release is refused by devices after a week by default


def parse_stages(text: str | Sequence[int]) -> list[int]:
    """``"5,25,100"`` (or a list) → [5, 25, 100]: strictly increasing whole percentages ending at 100."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        try:
            stages = [int(p) for p in parts]
        except ValueError:
            raise InputError(
                f"rollout stages {text!r}: expected comma-separated whole percentages, e.g. 5,25,100"
            ) from None
    else:
        stages = list(text)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in stages):
            raise InputError(f"rollout stages {stages!r}: expected whole percentages, e.g. [5, 25, 100]")
    if not stages:
        raise InputError("rollout stages: at least one stage is needed (e.g. 100)")
    if any(not 1 <= s <= 100 for s in stages):
        raise InputError(f"rollout stages {stages}: every stage must be between 1 and 100")
    if any(b <= a for a, b in itertools.pairwise(stages)):
        raise InputError(f"rollout stages {stages}: must be strictly increasing")
    if stages[-1] != 100:
        raise InputError(f"rollout stages {stages}: the last stage must be 100 (the whole fleet)")
    return stages


def make_release_id(name: str, version: str, now: float | None = None) -> str:
    """Readable and unique per millisecond: ``digits-2-20250101T120000.123Z``."""
    t = datetime.fromtimestamp(time.time() if now is None else now, tz=timezone.utc)
    return f"{name}-{version}-{t:%Y%m%dT%H%M%S}.{t.microsecond // 1000:03d}Z"


def build_policy(
    *,
    stages: Sequence[int] | str,
    max_failure_rate: float,
    max_latency_ms: float | None,
    window: str | None,
    urgent: bool,
    health_window_s: float,
) -> Policy:
    """A validated Policy; InputError naming the bad value."""
    checked = parse_stages(stages)
    if not (isinstance(max_failure_rate, (int, float)) and 0 <= max_failure_rate <= 1):
        raise InputError(f"max failure rate {max_failure_rate!r} must be between 0 and 1")
    if max_latency_ms is not None and not (max_latency_ms > 0 and math.isfinite(max_latency_ms)):
        raise InputError(f"max latency {max_latency_ms!r} ms must be a positive number")
    if window is not None:
        try:
            parse_window(window)
        except EdgeError as exc:
            raise InputError(f"{exc} (e.g. 02:00-04:00)") from exc
    if not (health_window_s >= 0 and math.isfinite(health_window_s)):
        raise InputError(f"health window {health_window_s!r} s must be >= 0")
    return Policy(
        max_latency_ms=max_latency_ms,
        max_failure_rate=float(max_failure_rate),
        window=window,
        urgent=urgent,
        health_window_s=float(health_window_s),
        stages=checked,
    )


def _version_dir(registry_dir: str | Path, name: str, version: str) -> Path:
    """The registry's version directory, cross-checked against its manifest."""
    registry = Registry(registry_dir)
    if not Path(registry_dir).is_dir():
        raise RegistryError(f"registry {registry_dir} does not exist")
    if not registry.versions(name):
        raise RegistryError(
            f"model {name!r} is not in the registry {registry_dir} (models: {registry.names() or 'none'})"
        )
    path = registry.path(name, version)
    try:
        manifest = Manifest.load(path / MANIFEST_FILE)
    except EdgeError as exc:
        raise RegistryError(f"{path}: {exc}") from exc
    if manifest.name != name or manifest.version != version:
        raise RegistryError(f"{path}: its manifest says {manifest.name} {manifest.version}, not {name} {version}")
    return path


def sealed_copy(version_dir: Path, fleet_pub_path: str | Path, record_dir: str | Path) -> Path:
    """The version sealed for the fleet key (``edge_agent.models.sealed``), made once and kept in ``record_dir``.

    Re-releasing a version (a rollback, a second fleet with the same key) sends the same ciphertext,
    so a device that already holds the version sees the same sha256 and reuses it.
    """
    public = load_fleet_public_key(fleet_pub_path)
    manifest = Manifest.load(version_dir / MANIFEST_FILE)
    out = Path(record_dir) / SEALED_DIR / describe_fleet_key(public) / manifest.name / manifest.version
    if (out / MANIFEST_FILE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        seal_version_dir(version_dir, tmp, public)
        fsync_tree(tmp)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except (OSError, EdgeError) as exc:
        raise RegistryError(f"cannot seal {version_dir} for fleet key {fleet_pub_path}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass
class ReleasePlan:
    """A release checked, packed and signed locally, ready to publish (nothing has touched the broker)."""

    release: Release
    signed: dict[str, Any]
    rollout: Rollout
    blob: bytes
    previous: Release | None = None  # the last release of this name signed before this one


def plan_release(
    registry_dir: str | Path,
    name: str,
    version: str,
    fleet: str,
    key_path: str | Path,
    *,
    stages: Sequence[int] | str = (100,),
    max_failure_rate: float = 0.1,
    max_latency_ms: float | None = None,
    window: str | None = None,
    urgent: bool = False,
    rollback: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    health_window_s: float = 30.0,
    expires_in_s: float | None = None,
    record_dir: str | Path | None = None,
    encrypt: bool = False,
    fleet_pub: str | Path | None = None,
    model: dict[str, Any] | None = None,
    kind: str = "model",
) -> ReleasePlan:
    """Check every input, pack the version, sign and record the release and its rollout; no I/O to the broker.

    ``expires_in_s``: devices refuse the release after this long (a rollback defaults to
    ``ROLLBACK_EXPIRES_S``; other releases do not expire by default). ``record_dir``: where the
    cloud's record of signed documents lives (default: the registry itself; tests release from a
    read-only registry). ``encrypt``: release the version sealed for the fleet key ``fleet_pub``
    (default: ``fleet.pub`` beside ``key_path``). InputError / RegistryError.
    """
    with input_errors():
        check_segment(fleet, "fleet")
        check_segment(name, "name")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise InputError(f"chunk size {chunk_size!r} must be a positive number of bytes")
    if rollback and expires_in_s is None:
        expires_in_s = ROLLBACK_EXPIRES_S
    if expires_in_s is not None and not (expires_in_s > 0 and math.isfinite(expires_in_s)):
        raise InputError(f"expiry {expires_in_s!r} s must be a positive number")
    limits: dict[str, Any] = {
        "max_failure_rate": max_failure_rate,
        "max_latency_ms": max_latency_ms,
        "health_window_s": health_window_s,
    }
    policy = build_policy(stages=stages, window=window, urgent=urgent, **limits)
    policy = replace(policy, **model_policy(**(model or {})))  # shadow, breaking, health signals
    if kind == "agent":  # the agent's own build (registry/agents.py): no manifest, never encrypted
        from cloud_batch.registry.agents import agent_dir, check_agent_release

        check_agent_release(name, encrypt)
        version_dir = agent_dir(registry_dir, version)
    else:
        version_dir = _version_dir(registry_dir, name, version)
    key = load_signing_key(key_path)
    record = record_dir if record_dir is not None else registry_dir
    if fleet_pub is not None and not encrypt:
        raise InputError("--fleet-pub is only used with --encrypt")
    if encrypt:
        version_dir = sealed_copy(version_dir, fleet_pub or Path(key_path).parent / FLEET_PUB_FILE, record)
    try:
        blob = pack_dir(version_dir)
    except OSError as exc:
        raise RegistryError(f"cannot read {version_dir}: {exc}") from exc
    release_id = make_release_id(name, version)
    # The whole signed document is built and checked before connecting: a device refuses a
    # malformed one, and a bad input must publish nothing (not even chunks).
    rel = Release(
        release_id=release_id,
        fleet=fleet,
        name=name,
        version=version,
        artifact=Artifact.from_blob(blob, chunk_size),
        rollback=rollback,
        policy=policy,
        expires_at=time.time() + expires_in_s if expires_in_s is not None else None,
        kind=kind,
    )
    log_ = SignedLog(record)
    before = log_.latest(fleet, kind, name)
    signed = sign_release(rel, key, log_)
    first = Rollout(release_id, policy.stages[0], 0, "active", fleet=fleet, name=name)
    rollout = sign_rollout(first, key, log_)
    return ReleasePlan(rel, signed, rollout, blob, Release.from_dict(before) if before is not None else None)


def publish_release(
    link: BrokerLink, plan: ReleasePlan, *, progress: bool = True, publish_timeout_s: float = 60.0
) -> Release:
    """Publish a planned release on ``link`` (steps 2-6 above); BrokerError if the broker does not acknowledge."""
    rel, artifact = plan.release, plan.release.artifact
    name, fleet = rel.name, rel.fleet
    log.info("release %s: %s %s to fleet %s (%d bytes)", rel.release_id, name, rel.version, fleet, len(plan.blob))
    previous = plan.previous
    # 3. The artifact.
    label = f"{name} {rel.version}"
    published = publish_chunks(link, plan.blob, artifact.chunk_size, publish_timeout_s, progress, label)
    if (published.sha256, published.chunks) != (artifact.sha256, artifact.chunks):
        raise BrokerError(
            f"release {rel.release_id}: the published chunks do not match the signed artifact description"
        )

    # 4-5. Rollout control, then the signed release.
    publish_doc(link, rollout_topic(fleet, name), plan.rollout.to_dict(), wait_s=publish_timeout_s)
    publish_doc(link, release_topic(fleet, name), plan.signed, wait_s=publish_timeout_s)

    # 6. The superseded artifact's chunks would stay on the broker forever.
    if previous is not None and previous.artifact.sha256 != artifact.sha256:
        clear_superseded(link, previous.artifact, rel.release_id, previous.release_id, publish_timeout_s)
    return rel


def release(
    registry_dir: str | Path,
    name: str,
    version: str,
    fleet: str,
    key_path: str | Path,
    link: BrokerLink,
    *,
    progress: bool = True,
    publish_timeout_s: float = 60.0,
    **options: Any,
) -> Release:
    """``plan_release`` then ``publish_release`` on ``link``: the whole release in one call (tests, benches).

    ``options`` are ``plan_release``'s keywords (stages, max_failure_rate, window, chunk_size, ...).
    """
    plan = plan_release(registry_dir, name, version, fleet, key_path, **options)
    return publish_release(link, plan, progress=progress, publish_timeout_s=publish_timeout_s)


def clear_superseded(link: BrokerLink, old: Artifact, release_id: str, superseded_id: str, timeout_s: float) -> None:
    """Delete the retained chunks of ``old`` (the artifact of release ``superseded_id``), now replaced.

    BrokerError, saying that release ``release_id`` itself is out, if the broker does not acknowledge.
    """
    try:
        clear_artifact(link, old, timeout_s=timeout_s)
        log.info("release %s: cleared superseded artifact %s of release %s", release_id, old.sha256[:12], superseded_id)
    except BrokerError as exc:
        raise BrokerError(
            f"release {release_id} is published, but clearing the superseded artifact {old.sha256[:12]} failed: {exc}"
        ) from exc


# -- chunk publishing with progress ------------------------------------------------------------
def publish_chunks(
    link: BrokerLink, blob: bytes, chunk_size: int, timeout_s: float, progress: bool, label: str
) -> Artifact:
    """Publish ``blob`` as retained chunks (a progress bar from 8 chunks up); BrokerError if not acknowledged."""
    total = max(1, -(-len(blob) // chunk_size))
    try:
        if not progress or total < PROGRESS_MIN_CHUNKS:
            return publish_artifact(link, blob, chunk_size, timeout_s=timeout_s)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(
            TextColumn("[bold]publishing {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("chunks"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        ) as bar:
            task = bar.add_task(f"{label} ({len(blob):,} bytes)", total=total)
            return publish_artifact(link, blob, chunk_size, timeout_s=timeout_s, on_acked=lambda: bar.advance(task, 1))
    except BrokerError as exc:  # not connected, PUBACK missing
        raise BrokerError(f"publishing the artifact to {link.host}:{link.port} failed: {exc}") from exc
