"""Camera and video streams (#12): capture with a latest-frame policy, inference through the shared models, results out."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from edge_agent.config.streams import StreamConfig
    from edge_agent.models.serving import ModelServer
    from edge_agent.streams.manager import StreamManager
    from edge_agent.telemetry import Telemetry


def open_streams(
    configs: list[StreamConfig], server: ModelServer, registry: CollectorRegistry, telemetry: Telemetry | None
) -> StreamManager | None:
    """The agent's streams (not started), or None without ``[[streams]]``: then nothing of them is imported."""
    if not configs:
        return None
    from edge_agent.streams.manager import StreamManager

    append = telemetry.outbox.append if telemetry is not None else None
    return StreamManager(configs, server, registry, outbox_append=append)
