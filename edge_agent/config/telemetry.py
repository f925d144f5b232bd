"""``[telemetry]`` and ``[drift]``: the outbox, its upload and on-device drift, with per-model overrides.

Every key of ``[telemetry]`` except ``resend_timeout_s`` and ``writer`` may be overridden per model in
``[telemetry.models.<name>]`` (docs/telemetry.md, "Per-model limits"). The outbox and the uploader
stay one per device, so a per-model limit is a share *within* them:

* ``max_rows`` / ``max_bytes``: a quota of the model's rows (every kind) in the shared outbox, shed
  in the same drop order as the device-wide bound, before it;
* ``max_bps``: a token bucket (one second of burst) on the bytes of the model's records as they are
  written; over it, sampled inputs are stripped, then predictions dropped, all counted;
* ``flush_interval_ms``: the model's power-loss window; the writer wakes at the smallest interval
  and commits a model's predictions once its own interval has passed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_agent.errors import ConfigError
from edge_agent.telemetry import drift
from edge_agent.telemetry.bound import Quota
from edge_agent.telemetry.recorder import ModelPolicy

WRITERS = ("process", "thread")  # where rows are built and committed (telemetry.hub)
# key -> type name as ``config._coerce`` reads it
MODEL_KEYS: dict[str, str] = {
    "enabled": "bool",
    "sample_inputs": "float",
    "max_rows": "int | None",
    "max_bytes": "int | None",
    "max_bps": "float | None",
    "flush_interval_ms": "int",
}


@dataclass
class TelemetryConfig:
    """The telemetry outbox and its upload (``[telemetry]``; docs/telemetry.md)."""

    enabled: bool = True
    sample_inputs: float = 0.0  # share of predictions whose inputs are kept (0-1)
    max_rows: int | None = 100_000
    max_bytes: int | None = 64 * 1024 * 1024
    max_bps: float | None = None  # upload bytes/s; None = unlimited
    flush_interval_ms: int = 250  # queued predictions are committed this often: the power-loss window
    resend_timeout_s: float = 30.0  # re-send from the first unacked record when the ack stalls this long
    writer: str = "thread"  # "thread": rows built on the agent's telemetry thread; "process": in a child process
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # [telemetry.models.<name>] overrides

    def policy(self, model: str) -> ModelPolicy:
        """The effective recording policy of ``model`` (its overrides over the device-wide values)."""
        o = self.models.get(model, {})
        interval = o.get("flush_interval_ms")
        return ModelPolicy(
            enabled=bool(o.get("enabled", self.enabled)),
            sample_inputs=float(o.get("sample_inputs", self.sample_inputs)),
            max_bps=o.get("max_bps"),
            flush_interval_s=None if interval is None else interval / 1000.0,
        )

    def quotas(self) -> dict[str, Quota]:
        """Per-model outbox quotas (models that set ``max_rows`` or ``max_bytes``)."""
        return {
            name: Quota(o.get("max_rows"), o.get("max_bytes"))
            for name, o in self.models.items()
            if o.get("max_rows") is not None or o.get("max_bytes") is not None
        }

    def paced(self) -> bool:
        """Whether any model has its own ``max_bps`` or ``flush_interval_ms`` (``telemetry.pacing``)."""
        return any(o.get("max_bps") is not None or "flush_interval_ms" in o for o in self.models.values())

    def min_flush_interval_s(self) -> float:
        """How often the writer wakes: the smallest flush interval, device-wide or per model."""
        per_model = [o["flush_interval_ms"] for o in self.models.values() if "flush_interval_ms" in o]
        return min([self.flush_interval_ms, *per_model]) / 1000.0


@dataclass
class DriftConfig:
    """On-device drift against the manifest's training reference (``[drift]``)."""

    enabled: bool = True
    window: int = drift.WINDOW  # requests per window (1000) ...
    window_s: float = drift.WINDOW_S  # ... or this many seconds (3600), whichever comes first
    watch: float = drift.WATCH  # PSI above this (0.1): watch
    alert: float = drift.ALERT  # PSI above this (0.25): alert
    state_top: int = 3  # features per model in DeviceState


def _check_limits(where: str, o: Mapping[str, Any]) -> None:
    if not 0.0 <= o.get("sample_inputs", 0.0) <= 1.0:
        raise ConfigError(f"{where}sample_inputs must be between 0 and 1")
    if o.get("max_rows") is not None and o["max_rows"] < 1:
        raise ConfigError(f"{where}max_rows must be at least 1")
    if o.get("max_bytes") is not None and o["max_bytes"] < 4096:
        raise ConfigError(f"{where}max_bytes must be at least 4096")
    if o.get("max_bps") is not None and o["max_bps"] <= 0:
        raise ConfigError(f"{where}max_bps must be positive")
    if o.get("flush_interval_ms", 1) < 1:
        raise ConfigError(f"{where}flush_interval_ms must be positive")


def validate_telemetry(t: TelemetryConfig, d: DriftConfig, coerce: Callable[[str, Any, Any], Any]) -> None:
    """Check ``[telemetry]`` and ``[drift]``; per-model tables are converted in place with ``coerce`` (TOML or env text)."""
    for name, raw in t.models.items():
        where = f"telemetry.models.{name}."
        unknown = set(raw) - set(MODEL_KEYS)
        if unknown:
            raise ConfigError(f"{where[:-1]}: unknown keys {sorted(unknown)}; per-model keys are {sorted(MODEL_KEYS)}")
        t.models[name] = {k: coerce(where + k, v, MODEL_KEYS[k]) for k, v in raw.items()}
        _check_limits(where, t.models[name])
    device = {k: getattr(t, k) for k in MODEL_KEYS if k != "enabled"}
    _check_limits("telemetry.", device)
    if t.writer not in WRITERS:
        raise ConfigError(f"telemetry.writer must be one of {', '.join(WRITERS)}, not {t.writer!r}")
    if t.resend_timeout_s <= 0:
        raise ConfigError("telemetry.resend_timeout_s must be positive")
    if d.window < 1 or d.window_s <= 0 or not 0 < d.watch <= d.alert or d.state_top < 1:
        raise ConfigError("drift.window, window_s and state_top must be positive and 0 < drift.watch <= drift.alert")
