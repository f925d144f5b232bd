"""Shadow releases and model-aware health: the policy fields' rules, ``--promote-if`` and the verdict.

Pure rules shared by the device (``update.shadow``, ``update.health.signals``) and the release
tools (``cloud-batch release --shadow --promote-if``). A shadow release's candidate is compared
with the active version on a sampled copy of live traffic; ``verdict`` decides on the figures
(``ShadowFigures``) whether it is promoted, and the reason names every figure that failed.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from edge_agent.errors import ManifestError
from edge_agent.wire.policy import Policy, parse_window

MODES = ("direct", "shadow")
REGRESSION_TOLERANCE = 0.05  # a regression output "agrees" when its relative error is within 5%

# --promote-if keys: key -> (Policy field, the one operator it takes)
PROMOTE_KEYS: dict[str, tuple[str, str]] = {
    "agreement": ("promote_min_agreement", ">="),
    "latency": ("promote_max_latency_ratio", "<="),
    "errors": ("promote_max_error_rate", "<="),
}
_RULE = re.compile(r"\s*([a-z_]+)\s*(>=|<=|>|<|==|=)\s*([^\s,]+)\s*")


def check_policy(policy: Policy) -> Policy:
    """The window, shadow, signature and health fields of a release policy are sane; ManifestError naming the field."""
    if policy.window is not None:
        parse_window(policy.window)
    if policy.mode not in MODES:
        raise ManifestError(f"release.policy.mode: {policy.mode!r} is not one of {', '.join(MODES)}")
    _number(policy.shadow_rate, "shadow_rate", 0.0, 1.0)
    if policy.mode == "shadow" and policy.shadow_rate <= 0:
        raise ManifestError("release.policy.shadow_rate: a shadow release needs a rate above 0")
    if isinstance(policy.shadow_min_samples, bool) or not isinstance(policy.shadow_min_samples, int):
        raise ManifestError("release.policy.shadow_min_samples: expected a whole number")
    if policy.shadow_min_samples < 1:
        raise ManifestError("release.policy.shadow_min_samples: must be at least 1")
    _number(policy.shadow_window_s, "shadow_window_s", 0.0, None)
    _number(policy.promote_min_agreement, "promote_min_agreement", 0.0, 1.0)
    _number(policy.promote_max_latency_ratio, "promote_max_latency_ratio", 0.0, None)
    _number(policy.promote_max_error_rate, "promote_max_error_rate", 0.0, 1.0)
    if not isinstance(policy.breaking, bool):
        raise ManifestError("release.policy.breaking: expected true or false")
    for name in ("max_latency_ratio", "max_output_psi"):
        if getattr(policy, name) is not None:
            _number(getattr(policy, name), name, 0.0, None)
    return policy


def _number(value: Any, name: str, low: float, high: float | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ManifestError(f"release.policy.{name}: expected a number, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
        raise ManifestError(f"release.policy.{name}: {value!r} must be {bounds}")


def parse_promote_if(text: str) -> dict[str, float]:
    """``"agreement>=0.98,latency<=1.2,errors<=0.01"`` -> the Policy fields it sets; ManifestError if malformed."""
    out: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        m = _RULE.fullmatch(part)
        if m is None:
            raise ManifestError(f"--promote-if: {part.strip()!r} is not KEY>=VALUE or KEY<=VALUE")
        key, op, raw = m.groups()
        if key not in PROMOTE_KEYS:
            raise ManifestError(f"--promote-if: unknown key {key!r} (known: {', '.join(PROMOTE_KEYS)})")
        field, wanted = PROMOTE_KEYS[key]
        if op != wanted:
            raise ManifestError(f"--promote-if: {key} takes {wanted}, not {op}")
        try:
            value = float(raw)
        except ValueError:
            raise ManifestError(f"--promote-if: {key}: {raw!r} is not a number") from None
        if field in out:
            raise ManifestError(f"--promote-if: {key} is given twice")
        out[field] = value
    if not out:
        raise ManifestError("--promote-if: no rule given")
    check_policy(Policy(mode="shadow", **out))  # type: ignore[arg-type]
    return out


PRIORITIES = ("idle", "nice")  # the shadow process's CPU priority: SCHED_IDLE, or nice 10 given back
WORDS = {"verdict": ("promote", "reject"), "priority": PRIORITIES}  # the figures that are words


@dataclass
class ShadowFigures:
    """What the device measured while shadowing: reported live in ``updates.{name}.shadow``."""

    samples: int = 0  # requests compared
    agreement: float | None = None  # share of compared rows on which both versions agree
    mean_abs_diff: float | None = None  # mean absolute difference of the outputs
    latency_ratio: float | None = None  # candidate p50 / active p50 on the compared requests
    errors: int = 0  # candidate invocations that raised
    dropped: int = 0  # sampled copies dropped because the shadow queue was full
    verdict: str | None = None  # None while shadowing; "promote" or "reject"
    priority: str | None = None  # one of PRIORITIES; None before the shadow process has said

    @property
    def error_rate(self) -> float:
        tried = self.samples + self.errors
        return self.errors / tried if tried else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: Any) -> ShadowFigures:
        """From a device report; ManifestError when it is not a figures object."""
        if not isinstance(raw, dict) or not set(raw) <= set(cls.__dataclass_fields__):
            raise ManifestError("device state: shadow must be a shadow figures object")
        for key, value in raw.items():
            whole = key in ("samples", "errors", "dropped")
            if key in WORDS:
                ok = value is None or value in WORDS[key]
            else:
                ok = isinstance(value, int) if whole else value is None or isinstance(value, (int, float))
            if not ok or isinstance(value, bool):
                raise ManifestError(f"device state: shadow.{key}: unexpected value {value!r}")
        return cls(**raw)


def verdict(figures: ShadowFigures, policy: Policy) -> tuple[bool, str]:
    """Promote or not, and the reason with the measured figures (every failed rule is named)."""
    if figures.samples == 0:
        return False, f"shadow: no request was compared ({figures.errors} errors, {figures.dropped} dropped)"
    failed = []
    agreement = figures.agreement if figures.agreement is not None else 0.0
    if agreement < policy.promote_min_agreement:
        failed.append(f"agreement {agreement:.3f} < {policy.promote_min_agreement:g}")
    ratio = figures.latency_ratio
    if ratio is not None and ratio > policy.promote_max_latency_ratio:
        failed.append(f"p50 latency ratio {ratio:.2f} > {policy.promote_max_latency_ratio:g}")
    if figures.error_rate > policy.promote_max_error_rate:
        failed.append(f"error rate {figures.error_rate:.3f} > {policy.promote_max_error_rate:g}")
    summary = (
        f"{figures.samples} samples, agreement {agreement:.3f}, "
        f"latency ratio {'n/a' if ratio is None else f'{ratio:.2f}'}, "
        f"{figures.errors} errors, {figures.dropped} dropped"
    )
    if failed:
        return False, f"shadow rejected: {'; '.join(failed)} ({summary})"
    return True, f"shadow passed: {summary}"


def shadow_report(raw: Any) -> dict[str, Any] | None:
    """The ``shadow`` member of an update report in a device state, validated (None when absent)."""
    return None if raw is None else ShadowFigures.from_dict(raw).to_dict()


def describe(figures: dict[str, Any]) -> str:
    """One line of a device's shadow figures, e.g. for ``cloud-batch rollout status``."""
    f = ShadowFigures.from_dict(figures)
    agreement = "n/a" if f.agreement is None else f"{f.agreement:.3f}"
    ratio = "n/a" if f.latency_ratio is None else f"{f.latency_ratio:.2f}"
    priority = f", priority {f.priority}" if f.priority else ""
    verdict_ = f", {f.verdict}" if f.verdict else ""
    counts = f"{f.errors} errors, {f.dropped} dropped"
    return f"{f.samples} samples, agreement {agreement}, latency ratio {ratio}, {counts}{priority}{verdict_}"


def shadow_lines(devices: list[tuple[str, str, dict[str, Any] | None]], limit: int = 10) -> list[str]:
    """``(device id, state, figures)`` -> the status lines of the devices that report shadow figures."""
    rows = [(d, s, f) for d, s, f in devices if f]
    lines = [f"    {d}: {s}: shadow {describe(f)}" for d, s, f in rows[:limit] if f is not None]
    if len(rows) > limit:
        lines.append(f"    ... and {len(rows) - limit} more with shadow figures (--json lists all)")
    return lines


def without_empty_shadow(state: dict[str, Any]) -> dict[str, Any]:
    """A device state document without ``"shadow": null`` in its reports (readers before shadow releases refuse it)."""
    for key in ("updates", "feature_updates"):
        for report in (state.get(key) or {}).values():
            if report.get("shadow") is None:
                report.pop("shadow", None)
    return state
