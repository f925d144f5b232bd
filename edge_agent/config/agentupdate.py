"""``[agent_update]``: A/B self-update of the frozen agent (docs/deploy.md, "Self-update").

``root`` is the directory that holds ``slots/a``, ``slots/b``, ``current`` and ``good``
(``/opt/edgefleet/agent`` from the Debian package). Its default is found from the running binary:
a frozen agent started from ``<root>/slots/<slot>/edge-agent``; anything else (a source checkout,
a tarball elsewhere) has no root, and self-update is off.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.errors import ConfigError


def default_agent_root() -> Path | None:
    """``<root>`` when this is a frozen agent running from ``<root>/slots/<slot>/``, else None."""
    if not getattr(sys, "frozen", False):
        return None
    slot = Path(sys.executable).resolve().parent
    return slot.parent.parent if slot.parent.name == "slots" else None


@dataclass
class AgentUpdateConfig:
    """How a new agent slot is tried: self-test, then confirm within the window and the number of starts."""

    root: Path | None = field(default_factory=default_agent_root)
    health_window_s: float = 120.0  # a new agent must confirm (models served, broker connected) within this
    max_starts: int = 3  # starts of a new agent without a confirm before the previous slot is restored
    selftest_timeout_s: float = 120.0  # `<new slot>/edge-agent __selftest__` must pass within this


def validate_agent_update(c: AgentUpdateConfig) -> None:
    if c.health_window_s <= 0 or c.selftest_timeout_s <= 0:
        raise ConfigError("agent_update.health_window_s and agent_update.selftest_timeout_s must be positive")
    if c.max_starts < 1:
        raise ConfigError("agent_update.max_starts must be at least 1")
