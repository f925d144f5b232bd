"""The health window after a version is activated: one loop for the update machine and the local shadow.

For ``policy.health_window_s`` it watches the error rate of the calls the new version serves
(continuously: once ``min_calls`` calls were served, a share of failures above
``policy.max_error_rate`` ends it at once) and, when the window closes, the model signals
(``signals.check``: p99 latency and output distribution against the previous version's
``baseline``). Used by ``installers.ModelInstaller.watch`` (state ``health_check``) and by
``shadow.local`` after a local promotion.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import FailedError, Interrupted
from edge_agent.models.taps import ModelTaps
from edge_agent.update.health import signals
from edge_agent.update.seams import HealthSource, Wait
from edge_agent.wire.policy import Policy


@dataclass
class Verdict:
    """How a health window ended: ``breach`` (the reason) or None, the calls it saw, the signals' figures."""

    breach: str | None
    calls: int
    failures: int
    signals: dict[str, Any] | None = None  # None when the error rate ended the window early


@dataclass
class HealthWindow:
    """Where the window reads health from (the served model's counters, the request taps) and its clocks."""

    health: HealthSource
    taps: ModelTaps | None
    min_calls: int
    poll_s: float
    monotonic: Callable[[], float]
    wait: Wait

    def watch(
        self, name: str, version: str, policy: Policy, baseline: dict[str, Any] | None, interrupt: threading.Event
    ) -> Verdict:
        """Watch ``version`` of ``name``; FailedError when another version serves meanwhile, Interrupted on ``interrupt``."""
        clock = self.monotonic
        deadline = clock() + policy.health_window_s
        _, calls0, fails0 = self.health(name)
        since = signals.start(self.taps, name, version)
        while True:
            serving, calls, fails = self.health(name)
            if serving != version:
                raise FailedError(f"{name} {version} stopped serving during the health window (serving: {serving})")
            if calls < calls0:  # the model was reloaded: its counters restarted
                calls0, fails0 = 0, 0
            dc, df = calls - calls0, fails - fails0
            if dc >= self.min_calls and df / dc > policy.max_error_rate:
                return Verdict(
                    f"health window: {df} of {dc} calls failed ({df / dc:.0%}), above the "
                    f"release's maximum error rate {policy.max_error_rate:.0%}",
                    dc,
                    df,
                )
            if clock() >= deadline:
                breach, figures = signals.check(policy, baseline, self.taps, name, version, since)
                return Verdict(breach, dc, df, figures)
            if self.wait(interrupt, min(self.poll_s, max(0.0, deadline - clock()))):
                raise Interrupted()
