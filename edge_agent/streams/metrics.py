"""Prometheus metrics of the streams, registered in the API's registry (``Metrics.registry``)::

edgefleet_stream_frames_total{stream,outcome}    read | processed | dropped (replaced unseen) | failed
edgefleet_stream_frame_age_seconds{stream}       frame age when the model starts on it
edgefleet_stream_latency_seconds{stream}         frame read → result ready (end to end)
edgefleet_stream_source_state{stream,state}      1 for the stream's current state, 0 for the others
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OUTCOMES = ("read", "processed", "dropped", "failed")
STATES = ("starting", "running", "reconnecting", "ended", "failed", "stopped")
# From 1 ms to 10 s: a frame's age and its frame-to-result latency.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class StreamMetrics:
    """The stream metrics of one agent; ``for_stream`` resolves the label children once."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.frames = Counter(
            "edgefleet_stream_frames", "Stream frames by outcome.", ("stream", "outcome"), registry=registry
        )
        self.age = Histogram(
            "edgefleet_stream_frame_age_seconds",
            "Age of a frame when inference starts on it, in seconds.",
            ("stream",),
            buckets=BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "edgefleet_stream_latency_seconds",
            "Frame read to result ready, in seconds.",
            ("stream",),
            buckets=BUCKETS,
            registry=registry,
        )
        self.state = Gauge(
            "edgefleet_stream_source_state", "1 for the stream's current state.", ("stream", "state"), registry=registry
        )

    def for_stream(self, stream: str) -> dict[str, Any]:
        out: dict[str, Any] = {o: self.frames.labels(stream, o) for o in OUTCOMES}
        out["age"] = self.age.labels(stream)
        out["latency"] = self.latency.labels(stream)
        return out

    def set_state(self, stream: str, state: str) -> None:
        for s in STATES:
            self.state.labels(stream, s).set(1.0 if s == state else 0.0)
