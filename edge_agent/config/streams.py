"""``[[streams]]``: camera and video streams the agent runs through a model (docs/vision.md).

One table per stream::

    [[streams]]
    id = "dock-cam"
    source = "rtsp://10.0.0.5/stream1"   # or 0, "/dev/video0", a file path, an http(s) MJPEG URL
    model = "face_detector"
    max_fps = 10                          # processed frames per second at most (0: as fast as the model)
    policy = "latest"                     # latest: drop stale frames | every: process every frame
    roi = [0, 0, 1280, 720]               # optional crop [x, y, w, h] before preprocessing
    loop = true                           # a file source restarts at its end (false: the stream stops)
    source_fps = 0                        # pace a file source: 0 = its own frame rate (latest) / unpaced (every)
    publish = { mqtt = true, min_interval_ms = 200, min_score = 0.5 }
    sample = { rate = 0.01, on_low_confidence = 0.4, max_per_hour = 60, max_bytes = 262144 }

Every mistake is a ConfigError at load that names the stream and the key.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError, EdgeError
from edge_agent.wire.names import check_segment

URL_SCHEMES = ("rtsp", "rtsps", "http", "https")
POLICIES = ("latest", "every")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class PublishConfig:
    """Results over MQTT (QoS 0): at most one per ``min_interval_ms``, only with a score ≥ ``min_score``."""

    mqtt: bool = True
    min_interval_ms: int = 200
    min_score: float = 0.0


@dataclass(frozen=True)
class SampleConfig:
    """JPEG frames into the telemetry outbox: a share of frames plus low-confidence ones, capped."""

    rate: float = 0.0  # share of processed frames sampled at random
    on_low_confidence: float | None = None  # also sample frames whose best score is below this
    max_per_hour: int = 60
    max_bytes: int = 256 * 1024  # a larger JPEG is re-encoded smaller, else not sampled
    jpeg_quality: int = 80


@dataclass(frozen=True)
class StreamConfig:
    id: str
    source: str | int
    model: str
    max_fps: float = 0.0
    policy: str = "latest"
    roi: tuple[int, int, int, int] | None = None
    loop: bool = True
    source_fps: float = 0.0
    reconnect_s: float = 0.5  # first reconnect delay; doubles up to max_reconnect_s
    max_reconnect_s: float = 10.0
    publish: PublishConfig = field(default_factory=PublishConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    @property
    def is_file(self) -> bool:
        return isinstance(self.source, str) and not _SCHEME.match(self.source) and not self.source.startswith("/dev/")


def _number(where: str, value: Any, lo: float, hi: float | None = None, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(f"{where}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ConfigError(f"{where}: must be between {lo} and {hi}" if hi is not None else f"{where}: must be ≥ {lo}")
    return value


def _table(cls: Any, raw: Any, where: str) -> Any:
    """A frozen dataclass from a TOML table, each key type-checked against its default."""
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        default = fields[key].default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{key}: expected true or false, got {value!r}")
        elif value is not None or default is not None:
            _number(f"{where}.{key}", value, 0, integer=isinstance(default, int))
        values[key] = value
    return cls(**values)


def parse_source(raw: Any, where: str) -> str | int:
    """A camera index, a device path, an rtsp/http(s) URL or an existing video file."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return _number(where, raw, 0, integer=True)
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{where}: expected a camera index, a device path, a URL or a file path")
    if raw.isdigit():
        return int(raw)
    m = _SCHEME.match(raw)
    if m:
        if m.group(1).lower() not in URL_SCHEMES:
            raise ConfigError(f"{where}: unsupported URL scheme {m.group(1)!r} (use {', '.join(URL_SCHEMES)})")
        if len(raw) == len(m.group(0)):
            raise ConfigError(f"{where}: {raw!r} has no host")
        return raw
    if not raw.startswith("/dev/") and not Path(raw).expanduser().is_file():
        raise ConfigError(f"{where}: video file not found: {raw}")
    return str(Path(raw).expanduser()) if not raw.startswith("/dev/") else raw


def parse_stream(raw: Any, index: int) -> StreamConfig:
    where = f"streams[{index}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a table ([[streams]])")
    known = {f.name for f in dataclasses.fields(StreamConfig)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    for key in ("id", "source", "model"):
        if key not in raw:
            raise ConfigError(f"{where}: missing key {key!r}")
    try:
        sid = check_segment(raw["id"], "stream id")
        model = check_segment(raw["model"], "model")
    except EdgeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    where = f"streams[{sid!r}]"
    policy = raw.get("policy", "latest")
    if policy not in POLICIES:
        raise ConfigError(f"{where}.policy: expected one of {list(POLICIES)}, got {policy!r}")
    roi = raw.get("roi")
    if roi is not None:
        if not isinstance(roi, list) or len(roi) != 4:
            raise ConfigError(f"{where}.roi: expected [x, y, width, height]")
        roi = tuple(_number(f"{where}.roi", v, 0, integer=True) for v in roi)
        if roi[2] < 1 or roi[3] < 1:
            raise ConfigError(f"{where}.roi: width and height must be at least 1")
    loop = raw.get("loop", True)
    if not isinstance(loop, bool):
        raise ConfigError(f"{where}.loop: expected true or false")
    nums = {k: _number(f"{where}.{k}", raw[k], 0) for k in ("max_fps", "source_fps", "reconnect_s") if k in raw}
    if "max_reconnect_s" in raw:
        nums["max_reconnect_s"] = _number(f"{where}.max_reconnect_s", raw["max_reconnect_s"], 0.01)
    sample = _table(SampleConfig, raw.get("sample"), f"{where}.sample")
    if sample.rate > 1 or (sample.on_low_confidence is not None and sample.on_low_confidence > 1):
        raise ConfigError(f"{where}.sample: rate and on_low_confidence are between 0 and 1")
    if not 1 <= sample.jpeg_quality <= 100 or sample.max_bytes < 1024:
        raise ConfigError(f"{where}.sample: jpeg_quality is 1-100 and max_bytes at least 1024")
    return StreamConfig(
        id=sid,
        source=parse_source(raw["source"], f"{where}.source"),
        model=model,
        policy=policy,
        roi=roi,
        loop=loop,
        publish=_table(PublishConfig, raw.get("publish"), f"{where}.publish"),
        sample=sample,
        **nums,
    )


def parse_streams(raw: Any) -> list[StreamConfig]:
    """``[[streams]]`` → validated stream configs with distinct ids."""
    if not isinstance(raw, list):
        raise ConfigError("streams: expected an array of tables ([[streams]])")
    out = [parse_stream(r, i) for i, r in enumerate(raw)]
    ids = [s.id for s in out]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"streams: duplicate ids {dupes}")
    return out
