"""Signed digits releases for the rollout tests: digits 1 from the shipped models, published for real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cloud_batch.fleetops.broker import BrokerLink
from cloud_batch.fleetops.release import release
from edge_agent.wire.protocol import Release
from tests.support.env import MODELS


def release_digits(link: BrokerLink, key: Path, fleet: str, **kwargs: Any) -> Release:
    """Publish digits 1 to ``fleet`` (all at once unless ``stages`` says otherwise), no health window, quiet."""
    kwargs.setdefault("stages", [100])
    kwargs.setdefault("health_window_s", 0)
    return release(MODELS, "digits", "1", fleet, key, link, progress=False, **kwargs)
