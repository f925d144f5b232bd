"""Agent configuration: an embedded default, a TOML file on top, environment variables on top of that.

Precedence (later wins): defaults < ``--config agent.toml`` < ``EDGEFLEET_*`` env vars < CLI flags.
Environment variables name a key by its TOML path, upper-cased, sections joined with ``__``:
``EDGEFLEET_LISTEN=0.0.0.0:8080``, ``EDGEFLEET_RUNTIME__NUM_THREADS=2``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.config.agentupdate import AgentUpdateConfig, validate_agent_update
from edge_agent.config.batching import BatchPolicy, batching_policies
from edge_agent.config.streams import StreamConfig, parse_streams
from edge_agent.config.telemetry import DriftConfig, TelemetryConfig, validate_telemetry
from edge_agent.errors import ConfigError, EdgeError
from edge_agent.inference.runtime import DelegateSpec, RuntimeOptions
from edge_agent.mqtt.download_defaults import CHUNK_WINDOW, STALL_TIMEOUT_S

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "EDGEFLEET_"
DEFAULT_LISTEN = "127.0.0.1:8080"


def default_data_dir() -> Path:
    """``$XDG_STATE_HOME/edgefleet`` (``~/.local/state/edgefleet``) for a user; ``/var/lib/edgefleet`` as root."""
    if os.geteuid() == 0 and Path("/var/lib").is_dir():
        return Path("/var/lib/edgefleet")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edgefleet"


def default_models_dir() -> Path:
    """The shipped models: ``models/`` beside the package (source checkout) or bundled with it."""
    here = Path(__file__).resolve().parent.parent  # edge_agent/
    for cand in (here.parent / "models", here / "models"):
        if cand.is_dir():
            return cand
    return here.parent / "models"


@dataclass
class RuntimeConfig:
    backend: str = "auto"  # the TFLite runtime: auto, tflite-runtime or ai-edge-litert (inference.interpreter.RUNTIMES)
    num_threads: int | None = None
    pool_size: int = 2
    delegates: list[dict[str, Any]] = field(default_factory=list)
    max_batch: int = 64  # rows per request for models whose manifest sets no max_batch (400 above)
    max_resident_batch: int = 16  # an interpreter that ran a bigger batch is dropped, freeing its arena

    def options(self) -> RuntimeOptions:
        return RuntimeOptions(
            num_threads=self.num_threads,
            pool_size=self.pool_size,
            max_batch=self.max_batch,
            max_resident_batch=self.max_resident_batch,
            delegates=tuple(
                DelegateSpec(str(d["library"]), {str(k): str(v) for k, v in (d.get("options") or {}).items()})
                for d in self.delegates
            ),
        )


@dataclass
class MqttConfig:
    """The broker link. No ``broker`` means offline mode: the agent serves what it has."""

    broker: str | None = None  # mqtt://host:1883 or mqtts://host:8883
    device_id: str | None = None  # default: the host name
    fleet: str = "default"
    groups: list[str] = field(default_factory=list)  # feature partitions this device belongs to
    trust: list[str] = field(default_factory=list)  # public keys (PEM files) that may sign releases
    ca_file: str | None = None  # broker CA for mqtts://
    cert_file: str | None = None  # client certificate (mutual TLS)
    key_file: str | None = None  # client key (mutual TLS)
    keepalive_s: int = 30


@dataclass
class OtaConfig:
    """Limits and pacing of updates on this device: the one place their defaults live.

    ``OtaAgent`` and ``UpdateMachine`` take this object as it is (``[ota]`` in the agent config).
    """

    max_artifact_bytes: int = 256 * 1024 * 1024
    bandwidth_bps: float | None = None  # download limit in bytes/s; None = unlimited
    chunk_window: int = CHUNK_WINDOW  # chunks requested at once (8)
    chunk_sink: bool = True  # a fresh download's chunks are verified and written by a helper process (mqtt.sink)
    stall_timeout_s: float = STALL_TIMEOUT_S  # re-request the window after this long without a chunk (30 s)
    download_timeout_s: float | None = None  # None: wait for the artifact as long as the release stands
    download_attempts: int = 5  # transient download failures before the update fails
    retry_backoff_s: float = 2.0  # first retry delay; doubles per attempt
    validate_timeout_s: float = 120.0  # the child-process validation of a candidate model
    max_loops: int = 30  # loop breaker: state saves + loads per update
    poll_s: float = 0.5  # maintenance window and health window polling
    serve_timeout_s: float = 120.0  # activation: the new version must serve within this
    health_min_calls: int = 5  # fewer calls in the health window cannot breach it
    rollout_settle_s: float = 1.0  # wait this long for a release's rollout document before applying it
    max_document_bytes: int = 256 * 1024  # release/rollout documents above this are dropped unparsed
    max_message_bytes: int = 1024 * 1024  # MQTT maximum packet size announced to the broker (chunks fit)
    fleet_key: Path | None = None  # private X25519 fleet key (mode 0600) that opens encrypted models


@dataclass
class FeaturesConfig:
    """The on-device feature cache (``<data-dir>/features.db``)."""

    max_rows: int | None = None  # a bundle that would exceed the bound is rejected, never half-applied
    max_bytes: int | None = None
    synchronous: str = "FULL"  # SQLite synchronous; FULL: an applied bundle survives power loss


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"expected true or false, got {value!r}")


@dataclass
class HttpConfig:
    """The API's limits against abuse and overload (``[http]``; docs/api.md "Limits")."""

    limit_concurrency: int = 128  # open connections; above, requests get 503 and idle connections are evicted
    read_timeout_s: float = 10.0  # a request's headers and body must arrive within this (408 / closed)
    keep_alive_timeout_s: float = 5.0  # an idle kept-alive connection is closed after this
    max_tensor_elements: int = 4 * 1024 * 1024  # values per request, all inputs together (413 above)
    socket_mode: str = "0660"  # permissions of a unix: listen socket (octal)


@dataclass
class AgentConfig:
    """Everything ``edge-agent run`` needs. Field names are the TOML keys."""

    data_dir: Path = field(default_factory=default_data_dir)
    listen: str = DEFAULT_LISTEN  # "HOST:PORT" or "unix:/path/to.sock"
    models_dir: Path | None = field(default_factory=default_models_dir)  # installed on first start
    max_body_bytes: int = 8 * 1024 * 1024
    keep_versions: int = 3
    watch_interval_s: float = 0.5
    log_level: str = "info"
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    ota: OtaConfig = field(default_factory=OtaConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    agent_update: AgentUpdateConfig = field(default_factory=AgentUpdateConfig)  # config/agentupdate.py
    streams: list[StreamConfig] = field(default_factory=list)  # [[streams]] (config/streams.py)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # [models.NAME.batching]: config/batching.py
    allow_repository_control: bool = False  # /v2/repository/* on a non-loopback listener (docs/api.md)

    def batching(self) -> dict[str, BatchPolicy]:
        """The models with dynamic batching on, and their policies."""
        return batching_policies(self.models)

    def listen_address(self) -> tuple[str, int] | str:
        """``(host, port)`` for TCP, or the socket path for ``unix:/path``."""
        return parse_listen(self.listen)


def parse_listen(value: str) -> tuple[str, int] | str:
    """Parse ``HOST:PORT``, ``[::1]:PORT`` or ``unix:/path``; raise ConfigError with the expected forms."""
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if not path:
            raise ConfigError("listen: 'unix:' needs a socket path, e.g. unix:/run/edgefleet/agent.sock")
        return path
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"listen: {value!r} is not HOST:PORT (e.g. 127.0.0.1:8080) or unix:/path")
    return host.strip("[]"), int(port)


def socket_mode(value: str) -> int:
    """``http.socket_mode`` ("0660") as an int; ConfigError unless it is octal and gives others nothing."""
    try:
        mode = int(value, 8)
    except ValueError:
        raise ConfigError(f"http.socket_mode: {value!r} is not an octal mode such as 0660") from None
    if not 0 <= mode <= 0o777 or mode & 0o007:
        raise ConfigError(f"http.socket_mode: {value!r} must be within 0770 (no access for others)")
    return mode


def _coerce(name: str, value: Any, target: Any) -> Any:
    """Convert a TOML or env value to the field's type, or raise ConfigError naming the key."""
    origin = str(target)
    try:
        if origin.startswith("list"):
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ValueError("expected a list of strings")
            return [i.strip() for i in items if i.strip()]
        if value in (None, "", "none") and "None" in origin:
            return None
        if "Path" in origin:
            return Path(os.path.expanduser(str(value)))
        if origin.startswith("dict"):
            if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
                raise ValueError("expected a table of tables")
            return {str(k): dict(v) for k, v in value.items()}
        if origin == "bool":
            return _bool(value)
        if "float" in origin:
            return float(value)
        if "int" in origin:
            if isinstance(value, bool):
                raise ValueError("boolean")
            return int(value)
        if "str" in origin:
            if not isinstance(value, (str, int, float)):
                raise ValueError(type(value).__name__)
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key {name!r}: cannot use {value!r} ({exc})") from exc
    return value


def _apply(obj: Any, values: Mapping[str, Any], where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {where}{key!r}; known: {sorted(fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {where}{key!r} must be a table")
            _apply(current, value, f"{where}{key}.")
        elif key == "delegates":
            if not isinstance(value, list) or not all(isinstance(d, Mapping) and "library" in d for d in value):
                raise ConfigError("runtime.delegates must be a list of tables with a 'library' key")
            setattr(obj, key, [dict(d) for d in value])
        elif key == "streams":
            setattr(obj, key, parse_streams(value))
        else:
            setattr(obj, key, _coerce(where + key, value, fields[key].type))


def _env_values(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def load_config(
    path: str | Path | None = None, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> AgentConfig:
    """Build the effective config; every problem is a ConfigError that names the key or file."""
    env = os.environ if env is None else env
    cfg = AgentConfig()
    path = path or env.get(ENV_PREFIX + "CONFIG")
    if path:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {p}") from exc
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
        _apply(cfg, raw, "")
    _apply(cfg, _env_values(env), "")
    _apply(cfg, {k: v for k, v in (overrides or {}).items() if v is not None}, "")
    _validate(cfg)
    return cfg


def _validate_limits(cfg: AgentConfig) -> None:
    """The ``[http]`` limits and the runtime's batch bounds."""
    if cfg.runtime.max_batch < 1 or cfg.runtime.max_resident_batch < 1:
        raise ConfigError("runtime.max_batch and runtime.max_resident_batch must be at least 1")
    h = cfg.http
    if h.limit_concurrency < 2 or h.max_tensor_elements < 1:
        raise ConfigError("http.limit_concurrency must be at least 2 and http.max_tensor_elements at least 1")
    if h.read_timeout_s <= 0 or h.keep_alive_timeout_s <= 0:
        raise ConfigError("http.read_timeout_s and http.keep_alive_timeout_s must be positive")
    socket_mode(h.socket_mode)


def _validate(cfg: AgentConfig) -> None:
    parse_listen(cfg.listen)
    if cfg.max_body_bytes < 1024:
        raise ConfigError("max_body_bytes must be at least 1024")
    if cfg.keep_versions < 2:
        raise ConfigError("keep_versions must be at least 2 (the active version and one to roll back to)")
    if cfg.runtime.pool_size < 1:
        raise ConfigError("runtime.pool_size must be at least 1")
    if cfg.runtime.num_threads is not None and cfg.runtime.num_threads < 1:
        raise ConfigError("runtime.num_threads must be at least 1")
    from edge_agent.inference.interpreter import RUNTIME_ENV, selected_runtime

    selected_runtime({RUNTIME_ENV: cfg.runtime.backend})  # unknown or not installed: a ConfigError now
    _validate_limits(cfg)
    if cfg.watch_interval_s <= 0:
        raise ConfigError("watch_interval_s must be positive")
    if cfg.mqtt.broker is not None:
        from edge_agent.mqtt.link import parse_broker_url
        from edge_agent.wire.names import check_segment

        parse_broker_url(cfg.mqtt.broker)
        try:
            check_segment(cfg.mqtt.fleet, "fleet")
            check_segment(cfg.mqtt.device_id or "x", "device id")
        except EdgeError as exc:
            raise ConfigError(str(exc)) from exc
        if not cfg.mqtt.trust:
            raise ConfigError("a broker is configured but no --trust public key: the agent would accept no release")
    if cfg.ota.max_artifact_bytes < 1 or cfg.ota.chunk_window < 1:
        raise ConfigError("ota.max_artifact_bytes and ota.chunk_window must be positive")
    if cfg.ota.bandwidth_bps is not None and cfg.ota.bandwidth_bps <= 0:
        raise ConfigError("ota.bandwidth_bps must be positive")
    if cfg.ota.fleet_key is not None:
        from edge_agent.models.sealed import load_fleet_key

        load_fleet_key(cfg.ota.fleet_key)  # fail at start: missing, not X25519, or readable by others
    if cfg.features.synchronous.upper() not in {"NORMAL", "FULL", "EXTRA"}:
        raise ConfigError("features.synchronous must be NORMAL, FULL or EXTRA")
    validate_telemetry(cfg.telemetry, cfg.drift, _coerce)
    validate_agent_update(cfg.agent_update)
    cfg.batching()
    if cfg.log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise ConfigError("log_level must be one of debug, info, warning, error")
