"""The edgefleet MQTT protocol, shared by the device agent and the cloud tools.

The documents on the wire are defined here: the JSON documents (each with a
``schema_version``), artifact packing and chunking, and rollout cohorts. ``docs/protocol.md``
describes the same contract for people writing a compatible device or release tool.

Topic names live in ``wire.topics``.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import ManifestError
from edge_agent.jsonlimits import loads_limited
from edge_agent.wire.artifact import Artifact, artifact_from_dict, check_artifact
from edge_agent.wire.names import check_segment, parse_version
from edge_agent.wire.policy import Policy
from edge_agent.wire.shadow import check_policy, shadow_report, without_empty_shadow
from edge_agent.wire.telemetry import check_drift_state
from edge_agent.wire.topics import features_topic

PROTOCOL_SCHEMA = 1
ARTIFACT_KINDS = ("model", "features", "agent")
MAX_DOCUMENT_DEPTH = 32  # releases, rollouts and device states nest 4 deep


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


# -- documents --------------------------------------------------------------------
@dataclass
class Release:
    """A signed instruction: fleet F should run artifact A as ``name`` ``version``."""

    release_id: str
    fleet: str
    name: str
    version: str
    artifact: Artifact
    kind: str = "model"
    rollback: bool = False  # an explicit, signed rollback may carry a lower version (needs ``expires_at``)
    seq: int = 0  # issued by the registry per (fleet, kind, name); devices accept only a higher one
    expires_at: float | None = None  # after this (Unix time) devices refuse the document
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
        out["artifact"] = self.artifact.to_dict()
        if self.signature is None:
            out.pop("signature")
        if self.fallback is None:
            out.pop("fallback")
        else:
            out["fallback"] = self.fallback.to_dict()
        if self.expires_at is None:
            out.pop("expires_at")
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
            artifact = artifact_from_dict(art)
            fb = raw.get("fallback")
            fallback = artifact_from_dict(fb) if fb is not None else None
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
                seq=_seq(raw.get("seq", 0), "release"),
                expires_at=_expiry(raw.get("expires_at"), "release"),
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
        parse_version(rel.version)
        if rel.kind not in ARTIFACT_KINDS:
            raise ManifestError(f"release: unknown kind {rel.kind!r}")
        if rel.rollback and rel.expires_at is None:
            raise ManifestError("release: a rollback release must carry expires_at")
        for where, a in (("artifact", rel.artifact), ("fallback", rel.fallback)):
            if a is None:
                continue
            check_artifact(a, f"release.{where}")
            if a.format != "tar":
                raise ManifestError(f"release.{where}: unsupported format {a.format!r}")
        features_topic(rel.fleet, rel.name, rel.partition["by"], rel.partition["key"])  # validates the partition
        if not 0 <= rel.policy.max_failure_rate <= 1 or not 0 <= rel.policy.max_error_rate <= 1:
            raise ManifestError("release.policy: rates must be between 0 and 1")
        check_policy(rel.policy)  # the window, shadow, signature and health fields
        return rel


@dataclass
class Rollout:
    """Signed, retained rollout control: which share of the fleet may apply ``release_id`` now.

    Signed with the release keys and numbered (``seq``, its own counter per fleet and model)
    like a release, so a forged, replayed or deleted copy changes nothing on a device.
    """

    release_id: str
    percent: int
    stage: int = 0
    status: str = "active"  # active | halted | aborted | complete
    updated_at: float = field(default_factory=time.time)
    schema_version: int = PROTOCOL_SCHEMA
    seq: int = 0
    fleet: str = ""
    name: str = ""
    signature: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "type": "rollout"}
        if self.signature is None:
            out.pop("signature")
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> Rollout:
        if not isinstance(raw, Mapping) or raw.get("type") != "rollout" or raw.get("schema_version") != PROTOCOL_SCHEMA:
            raise ManifestError("rollout: not a rollout document of a known schema")
        try:
            r = cls(
                str(raw["release_id"]),
                _int(raw["percent"], "rollout.percent"),
                _int(raw.get("stage", 0), "rollout.stage"),
                str(raw.get("status", "active")),
                float(raw.get("updated_at", 0)),
                seq=_seq(raw.get("seq", 0), "rollout"),
                fleet=str(raw.get("fleet", "")),
                name=str(raw.get("name", "")),
                signature=raw.get("signature"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"rollout: malformed: {exc}") from exc
        if r.status not in ROLLOUT_STATUSES or not 0 <= r.percent <= 100:
            raise ManifestError("rollout: bad status or percent")
        return r


ROLLOUT_STATUSES = ("active", "halted", "aborted", "complete")


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(f"{what}: expected a whole number, got {value!r}")
    return value


def _seq(value: Any, what: str) -> int:
    if (seq := _int(value, f"{what}.seq")) < 0:
        raise ManifestError(f"{what}.seq: must be >= 0")
    return seq


def _expiry(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ManifestError(f"{what}.expires_at: expected a Unix time, got {value!r}")
    return float(value)


def encode(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def decode(payload: bytes, what: str) -> dict[str, Any]:
    """A JSON object from the wire, nested at most ``MAX_DOCUMENT_DEPTH`` deep; ManifestError otherwise."""
    raw = loads_limited(payload, max_depth=MAX_DOCUMENT_DEPTH, what=what, error=ManifestError)
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
    shadow: dict[str, Any] | None = None  # shadow releases: the live figures (wire.shadow.ShadowFigures)


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
    drift: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> newest drift window (wire.telemetry)
    agent_slot: str = ""  # the A/B slot the agent runs from ("a", "b"; "" when not installed in slots)

    def to_dict(self) -> dict[str, Any]:
        return without_empty_shadow({**asdict(self), "type": "device_state"})  # older readers: no "shadow": null

    @classmethod
    def from_dict(cls, raw: Any) -> DeviceState:
        """Validate against the schema (types, sizes); ManifestError naming the field, never a crash later."""
        if not isinstance(raw, Mapping) or raw.get("type") != "device_state":
            raise ManifestError("device state: not a device_state document")
        try:
            return cls(
                _str(raw["device_id"], "device_id"),
                _str(raw["fleet"], "fleet"),
                _str_map(raw.get("models"), "models"),
                _reports(raw.get("updates"), "updates"),
                _str(raw.get("agent_version", ""), "agent_version"),
                _num(raw.get("last_seen", 0), "last_seen"),
                _int(raw.get("schema_version", PROTOCOL_SCHEMA), "schema_version"),
                _str_map(raw.get("features"), "features"),
                _reports(raw.get("feature_updates"), "feature_updates"),
                check_drift_state(raw.get("drift")),
                _str(raw.get("agent_slot", ""), "agent_slot", limit=16),
            )
        except KeyError as exc:
            raise ManifestError(f"device state: missing field {exc.args[0]!r}") from exc


MAX_STATE_ENTRIES = 256  # models, feature sets or reports in one device state
_REPORT_FIELDS = {"release_id", "name", "version", "state", "result", "reason", "at", "shadow"}


def _str(value: Any, what: str, *, optional: bool = False, limit: int = 1000) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise ManifestError(f"device state: {what} must be a string of at most {limit} characters")
    return value


def _num(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ManifestError(f"device state: {what} must be a number, got {type(value).__name__}")
    return float(value)


def _str_map(value: Any, what: str) -> dict[str, str]:
    value = value or {}
    if not isinstance(value, Mapping) or len(value) > MAX_STATE_ENTRIES:
        raise ManifestError(f"device state: {what} must be an object of at most {MAX_STATE_ENTRIES} entries")
    return {_str(k, what, limit=64): _str(v, f"{what}.{k}", limit=64) for k, v in value.items()}


def _reports(value: Any, what: str) -> dict[str, UpdateReport]:
    value = value or {}
    if not isinstance(value, Mapping) or len(value) > MAX_STATE_ENTRIES:
        raise ManifestError(f"device state: {what} must be an object of at most {MAX_STATE_ENTRIES} entries")
    out = {}
    for key, r in value.items():
        where = f"{what}.{key}"
        if not isinstance(r, Mapping) or not set(r) <= _REPORT_FIELDS:
            raise ManifestError(f"device state: {where} must be an update report object")
        out[_str(key, what, limit=64)] = UpdateReport(
            _str(r.get("release_id"), f"{where}.release_id", limit=200),
            _str(r.get("name"), f"{where}.name", limit=64),
            _str(r.get("version"), f"{where}.version", limit=64),
            _str(r.get("state"), f"{where}.state", limit=64),
            _str(r.get("result"), f"{where}.result", optional=True, limit=64),
            _str(r.get("reason"), f"{where}.reason", optional=True, limit=2000),
            _num(r.get("at", 0), f"{where}.at"),
            shadow_report(r.get("shadow")),
        )
    return out
