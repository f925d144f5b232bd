"""How a release may spread and when a device may apply it: the ``Policy`` inside every release,
deterministic rollout cohorts and maintenance windows.

Pure rules shared by the device (``update``), the fleet simulator and the cloud release tools,
apart from ``protocol`` so that the wire documents stay one file.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field

from edge_agent.errors import ManifestError


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
    # Shadow releases, signature changes and model-aware health (rules and checks: wire/shadow.py).
    mode: str = "direct"  # "shadow": mirror live traffic to the candidate first, promote by the rules below
    shadow_rate: float = 0.2  # share of live requests copied to the candidate
    shadow_min_samples: int = 200  # verdict once this many samples are compared ...
    shadow_window_s: float = 600.0  # ... or when this window closes
    promote_min_agreement: float = 0.98  # argmax agreement (regression: relative error within 5%)
    promote_max_latency_ratio: float = 1.2  # candidate p50 / active p50 on the same requests
    promote_max_error_rate: float = 0.0  # candidate invocations that raised
    breaking: bool = False  # the signature may differ from the active version's
    max_latency_ratio: float | None = None  # health window: p99 against the previous version's p99 here
    max_output_psi: float | None = None  # health window: PSI of outputs against the previous version's


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
