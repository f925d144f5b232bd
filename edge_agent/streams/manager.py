"""``StreamManager``: the agent's ``[[streams]]``, started and stopped together, read by HTTP and status.

Built only when the config has streams (``app.py``), so an agent without them never imports OpenCV.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from edge_agent.config.streams import StreamConfig
from edge_agent.errors import NotFoundError
from edge_agent.models.serving import ModelServer
from edge_agent.mqtt.link import PublishLink
from edge_agent.streams.metrics import StreamMetrics
from edge_agent.streams.runner import Stream
from edge_agent.telemetry.outbox import Row


class StreamManager:
    """Every configured stream; one broken stream never affects the others or HTTP serving."""

    def __init__(
        self,
        configs: list[StreamConfig],
        server: ModelServer,
        registry: CollectorRegistry,
        *,
        outbox_append: Callable[[list[Row]], object] | None = None,
        opener: Callable[[str | int], Any] | None = None,  # -> cv2.VideoCapture (untyped: Any)
    ) -> None:
        self.metrics = StreamMetrics(registry)
        self.closing = threading.Event()  # set on shutdown: SSE feeds end (http/streams.py)
        self.streams = {
            c.id: Stream(c, server, self.metrics, outbox_append=outbox_append, opener=opener) for c in configs
        }

    def attach(self, link: PublishLink, fleet: str, device_id: str) -> None:
        """Publish results over ``link`` (the agent's MQTT link) from now on."""
        for s in self.streams.values():
            s.publisher.attach(link, fleet, device_id)

    def start(self) -> None:
        for s in self.streams.values():
            s.start()

    def stop(self) -> None:
        """Stop every stream: all are asked first, so they wind down together."""
        self.closing.set()
        for s in self.streams.values():
            s.request_stop()
        for s in self.streams.values():
            s.stop()

    def get(self, stream_id: str) -> Stream:
        s = self.streams.get(stream_id)
        if s is None:
            raise NotFoundError(f"unknown stream {stream_id!r} (configured: {sorted(self.streams)})")
        return s

    def status(self) -> list[dict[str, Any]]:
        return [s.status() for s in self.streams.values()]
