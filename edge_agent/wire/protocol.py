"""The edgefleet MQTT protocol, shared by the device agent and the cloud tools.

Everything on the wire is defined here: topic names, the JSON documents (each with a
``schema_version``), artifact packing and chunking, and rollout cohorts. ``docs/protocol.md``
describes the same contract for people writing a compatible device or release tool.

Topics (``ROOT = "edgefleet/v1"``)::

    ROOT/fleets/{fleet}/releases/{name}           retained  signed Release (JSON)
    ROOT/fleets/{fleet}/rollouts/{name}           retained  Rollout control (JSON, unsigned)
    ROOT/fleets/{fleet}/devices/{id}/state        retained  DeviceState (JSON)
    ROOT/fleets/{fleet}/devices/{id}/presence     retained  "online" / "offline" (LWT)
    ROOT/fleets/{fleet}/features/{set}/{by}/{key} retained  signed Release of kind "features"
                                                            (by/key: all/all, device/{id}, group/{g})
    ROOT/artifacts/{sha256}/{index}               retained  raw chunk bytes
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import ManifestError

PROTOCOL_SCHEMA = 1
ROOT = "edgefleet/v1"
DEFAULT_CHUNK_SIZE = 128 * 1024  # AWS IoT Core's message size limit
ARTIFACT_KINDS = ("model", "features", "agent")

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def check_segment(value: str, what: str) -> str:
    """A topic segment (fleet, device id, model name): no wildcards, slashes or empties."""
    if not isinstance(value, str) or not _SEGMENT.match(value):
        raise ManifestError(f"invalid {what} {value!r}: use 1-64 letters, digits, '_', '.' or '-'")
    return value


# -- topics -------------------------------------------------------------------------
def release_topic(fleet: str, name: str) -> str:
    return f"{ROOT}/fleets/{check_segment(fleet, 'fleet')}/releases/{check_segment(name, 'name')}"


def rollout_topic(fleet: str, name: str) -> str:
    return f"{ROOT}/fleets/{check_segment(fleet, 'fleet')}/rollouts/{check_segment(name, 'name')}"


PARTITION_KINDS = ("all", "device", "group")


def features_topic(fleet: str, feature_set: str, by: str = "all", key: str = "all") -> str:
    """Where a feature bundle release for one partition (everyone, one device, one group) is retained."""
    if by not in PARTITION_KINDS or (by == "all") != (key == "all"):
        raise ManifestError(f"invalid partition {by}/{key}: use all/all, device/<id> or group/<name>")
    return (
        f"{ROOT}/fleets/{check_segment(fleet, 'fleet')}/features/{check_segment(feature_set, 'feature set')}"
        f"/{by}/{check_segment(key, 'partition key')}"
    )


def features_filters(fleet: str, device_id: str, groups: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The subscriptions through which a device receives every feature release meant for it."""
    base = f"{ROOT}/fleets/{check_segment(fleet, 'fleet')}/features/+"
    return [
        f"{base}/all/all",
        f"{base}/device/{check_segment(device_id, 'device id')}",
        *(f"{base}/group/{check_segment(g, 'group')}" for g in groups),
    ]


def device_state_topic(fleet: str, device_id: str) -> str:
    return f"{ROOT}/fleets/{check_segment(fleet, 'fleet')}/devices/{check_segment(device_id, 'device id')}/state"


def presence_topic(fleet: str, device_id: str) -> str:
    return f"{ROOT}/fleets/{check_segment(fleet, 'fleet')}/devices/{check_segment(device_id, 'device id')}/presence"


def chunk_topic(sha256: str, index: int) -> str:
    return f"{ROOT}/artifacts/{sha256}/{index}"


def parse_chunk_topic(topic: str) -> tuple[str, int] | None:
    parts = topic.split("/")
    if len(parts) == 5 and f"{parts[0]}/{parts[1]}" == ROOT and parts[2] == "artifacts" and parts[4].isdigit():
        return parts[3], int(parts[4])
    return None


# -- artifacts ----------------------------------------------------------------------
def pack_dir(path: str | Path) -> bytes:
    """Pack the plain files of a directory into a deterministic, uncompressed tar (sorted, zero mtimes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for f in sorted(p for p in Path(path).iterdir() if p.is_file() and not p.name.startswith(".")):
            info = tarfile.TarInfo(f.name)
            data = f.read_bytes()
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def unpack_to(blob_path: str | Path, out_dir: str | Path, max_files: int = 64) -> list[str]:
    """Unpack an artifact tar into ``out_dir``, refusing anything but plain files with plain names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    try:
        with tarfile.open(blob_path, mode="r:") as tar:
            members = tar.getmembers()
            if len(members) > max_files:
                raise ManifestError(f"artifact has {len(members)} files (max {max_files})")
            for m in members:
                if not m.isfile() or "/" in m.name or m.name.startswith(".") or not m.name:
                    raise ManifestError(f"artifact member {m.name!r} is not a plain file")
                src = tar.extractfile(m)
                assert src is not None  # isfile() guarantees a file object
                (out / m.name).write_bytes(src.read())
                names.append(m.name)
    except tarfile.TarError as exc:
        raise ManifestError(f"artifact is not a valid tar: {exc}") from exc
    return names


def chunk_hashes(blob: bytes, chunk_size: int) -> list[str]:
    return [hashlib.sha256(blob[i : i + chunk_size]).hexdigest() for i in range(0, len(blob), chunk_size)] or [
        hashlib.sha256(b"").hexdigest()
    ]


def iter_chunks(blob: bytes, chunk_size: int) -> Iterator[tuple[int, bytes]]:
    for i, off in enumerate(range(0, max(len(blob), 1), chunk_size)):
        yield i, blob[off : off + chunk_size]


# -- documents --------------------------------------------------------------------
@dataclass
class Artifact:
    """What to download: the packed bytes, their hash, and how they are chunked."""

    sha256: str
    size: int
    chunk_size: int
    chunks: list[str]  # sha256 of each chunk, in order
    format: str = "tar"
    url: str | None = None  # optional second transport (HTTP(S)); same bytes

    @classmethod
    def from_blob(cls, blob: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE, url: str | None = None) -> Artifact:
        return cls(hashlib.sha256(blob).hexdigest(), len(blob), chunk_size, chunk_hashes(blob, chunk_size), url=url)


@dataclass
class Policy:
    """How a device may apply a release."""

    max_latency_ms: float | None = None  # per-device validation budget (p50 of the candidate)
    max_failure_rate: float = 0.1  # rollout halts above this among devices that tried
    window: str | None = None  # "HH:MM-HH:MM" local maintenance window for activation
    urgent: bool = False  # ignore the window
    health_window_s: float = 30.0  # error-rate watch after activation
    max_error_rate: float = 0.05  # within the health window; above → automatic rollback
    stages: list[int] = field(default_factory=lambda: [100])  # rollout percentages


@dataclass
class Release:
    """A signed instruction: fleet F should run artifact A as ``name`` ``version``."""

    release_id: str
    fleet: str
    name: str
    version: str
    artifact: Artifact
    kind: str = "model"
    rollback: bool = False  # an explicit, signed rollback may carry a lower version
    policy: Policy = field(default_factory=Policy)
    # Feature bundles: which devices the release is for, and for a delta the full snapshot of the
    # same version that a device whose base does not match applies instead.
    partition: dict[str, str] = field(default_factory=lambda: {"by": "all", "key": "all"})
    fallback: Artifact | None = None
    created_at: float = field(default_factory=time.time)
    schema_version: int = PROTOCOL_SCHEMA
    signature: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["type"] = "release"
        if self.signature is None:
            out.pop("signature")
        if self.fallback is None:
            out.pop("fallback")
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> Release:
        """Parse and validate; every problem is a ManifestError naming the field."""
        if not isinstance(raw, Mapping):
            raise ManifestError("release: expected a JSON object")
        if raw.get("schema_version") != PROTOCOL_SCHEMA:
            raise ManifestError(f"release: unsupported schema_version {raw.get('schema_version')!r}")
        if raw.get("type") != "release":
            raise ManifestError("release: type must be 'release'")
        try:
            art = raw["artifact"]
            pol = raw.get("policy") or {}
            if not isinstance(art, Mapping) or not isinstance(pol, Mapping):
                raise ManifestError("release: artifact and policy must be objects")
            artifact = _artifact(art)
            fb = raw.get("fallback")
            fallback = _artifact(fb) if fb is not None else None
            part = raw.get("partition") or {"by": "all", "key": "all"}
            if not isinstance(part, Mapping):
                raise ManifestError("release: partition must be an object")
            partition = {"by": str(part.get("by")), "key": str(part.get("key"))}
            policy = Policy(**{k: v for k, v in pol.items() if k in Policy.__dataclass_fields__})
            rel = cls(
                release_id=str(raw["release_id"]),
                fleet=check_segment(raw["fleet"], "fleet"),
                name=check_segment(raw["name"], "name"),
                version=str(raw["version"]),
                artifact=artifact,
                kind=str(raw.get("kind", "model")),
                rollback=bool(raw.get("rollback", False)),
                policy=policy,
                created_at=float(raw.get("created_at", 0)),
                signature=raw.get("signature"),
                partition=partition,
                fallback=fallback,
            )
        except KeyError as exc:
            raise ManifestError(f"release: missing field {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"release: malformed field: {exc}") from exc
        from edge_agent.wire.manifest import parse_version

        parse_version(rel.version)
        if rel.kind not in ARTIFACT_KINDS:
            raise ManifestError(f"release: unknown kind {rel.kind!r}")
        for where, a in (("artifact", rel.artifact), ("fallback", rel.fallback)):
            if a is None:
                continue
            if not _SHA.match(a.sha256) or not all(_SHA.match(c) for c in a.chunks):
                raise ManifestError(f"release.{where}: sha256 values must be 64 lowercase hex digits")
            if a.size < 0 or a.chunk_size <= 0 or len(a.chunks) != max(1, -(-a.size // a.chunk_size)):
                raise ManifestError(f"release.{where}: size, chunk_size and the chunk list disagree")
            if a.format != "tar":
                raise ManifestError(f"release.{where}: unsupported format {a.format!r}")
        features_topic(rel.fleet, rel.name, rel.partition["by"], rel.partition["key"])  # validates the partition
        if not 0 <= rel.policy.max_failure_rate <= 1 or not 0 <= rel.policy.max_error_rate <= 1:
            raise ManifestError("release.policy: rates must be between 0 and 1")
        if rel.policy.window is not None:
            parse_window(rel.policy.window)
        return rel


def _artifact(art: Any) -> Artifact:
    if not isinstance(art, Mapping):
        raise ManifestError("release: artifact must be an object")
    return Artifact(
        sha256=str(art["sha256"]),
        size=int(art["size"]),
        chunk_size=int(art["chunk_size"]),
        chunks=[str(c) for c in art["chunks"]],
        format=str(art.get("format", "tar")),
        url=art.get("url"),
    )


@dataclass
class Rollout:
    """Retained rollout control: which share of the fleet may apply ``release_id`` now."""

    release_id: str
    percent: int
    stage: int = 0
    status: str = "active"  # active | halted | aborted | complete
    updated_at: float = field(default_factory=time.time)
    schema_version: int = PROTOCOL_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "type": "rollout"}

    @classmethod
    def from_dict(cls, raw: Any) -> Rollout:
        if not isinstance(raw, Mapping) or raw.get("type") != "rollout" or raw.get("schema_version") != PROTOCOL_SCHEMA:
            raise ManifestError("rollout: not a rollout document of a known schema")
        try:
            r = cls(
                str(raw["release_id"]),
                int(raw["percent"]),
                int(raw.get("stage", 0)),
                str(raw.get("status", "active")),
                float(raw.get("updated_at", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"rollout: malformed: {exc}") from exc
        if r.status not in ("active", "halted", "aborted", "complete") or not 0 <= r.percent <= 100:
            raise ManifestError("rollout: bad status or percent")
        return r


def in_cohort(device_id: str, name: str, percent: int) -> bool:
    """Deterministic phased-rollout membership: the same device stays in as the percentage grows."""
    bucket = int(hashlib.sha256(f"{device_id}/{name}".encode()).hexdigest()[:8], 16) % 100
    return bucket < percent


def parse_window(window: str) -> tuple[int, int]:
    """``"HH:MM-HH:MM"`` → (start minute, end minute) of the day; may wrap past midnight."""
    m = re.fullmatch(r"(\d{2}):(\d{2})-(\d{2}):(\d{2})", window or "")
    if not m:
        raise ManifestError(f"window {window!r} is not HH:MM-HH:MM")
    h1, m1, h2, m2 = (int(x) for x in m.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        raise ManifestError(f"window {window!r} has an invalid time")
    return h1 * 60 + m1, h2 * 60 + m2


def in_window(window: str | None, now: time.struct_time | None = None) -> bool:
    """True when there is no window or the local time is inside it."""
    if window is None:
        return True
    start, end = parse_window(window)
    t = now or time.localtime()
    minute = t.tm_hour * 60 + t.tm_min
    return start <= minute < end if start <= end else (minute >= start or minute < end)


def encode(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def decode(payload: bytes, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{what}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ManifestError(f"{what}: expected a JSON object")
    return raw


# Results an update reports (RAUC: a rejected bundle is not a failed install).
RESULT_SUCCESS, RESULT_FAILED, RESULT_REJECTED, RESULT_ROLLED_BACK = "success", "failed", "rejected", "rolled-back"


@dataclass
class UpdateReport:
    """The last update attempt of one model on one device."""

    release_id: str
    name: str
    version: str
    state: str  # an update.State value
    result: str | None = None  # None while in progress; else one of the RESULT_* values
    reason: str | None = None
    at: float = field(default_factory=time.time)


@dataclass
class DeviceState:
    """Retained on ``devices/{id}/state``: what the device runs and how its last updates went."""

    device_id: str
    fleet: str
    models: dict[str, str] = field(default_factory=dict)  # name → active version
    updates: dict[str, UpdateReport] = field(default_factory=dict)  # name → last attempt
    agent_version: str = ""
    last_seen: float = field(default_factory=time.time)
    schema_version: int = PROTOCOL_SCHEMA
    # Feature sets (absent from documents of older agents): set -> cached version, set -> last attempt.
    features: dict[str, str] = field(default_factory=dict)
    feature_updates: dict[str, UpdateReport] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "type": "device_state"}

    @classmethod
    def from_dict(cls, raw: Any) -> DeviceState:
        if not isinstance(raw, Mapping) or raw.get("type") != "device_state":
            raise ManifestError("device state: not a device_state document")
        try:
            updates = {k: UpdateReport(**v) for k, v in (raw.get("updates") or {}).items()}
            feature_updates = {k: UpdateReport(**v) for k, v in (raw.get("feature_updates") or {}).items()}
            return cls(
                str(raw["device_id"]),
                str(raw["fleet"]),
                dict(raw.get("models") or {}),
                updates,
                str(raw.get("agent_version", "")),
                float(raw.get("last_seen", 0)),
                int(raw.get("schema_version", PROTOCOL_SCHEMA)),
                dict(raw.get("features") or {}),
                feature_updates,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"device state: malformed: {exc}") from exc


PRESENCE_ONLINE, PRESENCE_OFFLINE = b"online", b"offline"
