"""Where stream results go besides ``/latest``: MQTT (rate-limited, QoS 0) and JPEG samples into the outbox.

Samples are ``prediction`` records with ``has_inputs``, so the outbox's bound strips their frame
first when it is over ``max_bytes`` (telemetry/outbox.py); the body carries the stream's result as
``outputs`` and the frame as ``inputs.frame = {"jpeg_base64", "shape"}``.
"""

from __future__ import annotations

import base64
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_agent.config.streams import PublishConfig, SampleConfig
from edge_agent.errors import EdgeError
from edge_agent.mqtt.link import PublishLink
from edge_agent.telemetry.outbox import Row
from edge_agent.wire.kserve_v2 import dumps
from edge_agent.wire.topics import stream_results_topic

log = logging.getLogger(__name__)


class Publisher:
    """Publishes a stream's results to its MQTT topic: at most one per ``min_interval_ms``, score ≥ ``min_score``."""

    def __init__(self, cfg: PublishConfig, stream: str) -> None:
        self.cfg, self.stream = cfg, stream
        self.link: PublishLink | None = None
        self.topic: str | None = None
        self.published = 0
        self._last = -float("inf")

    def attach(self, link: PublishLink, fleet: str, device_id: str) -> None:
        self.topic = stream_results_topic(fleet, device_id, self.stream)
        self.link = link

    def offer(self, doc: dict[str, Any], score: float | None) -> bool:
        if self.link is None or self.topic is None or not self.cfg.mqtt:
            return False
        if self.cfg.min_score > 0 and (score is None or score < self.cfg.min_score):
            return False
        now = time.monotonic()
        if (now - self._last) * 1000.0 < self.cfg.min_interval_ms:
            return False
        try:
            self.link.publish(self.topic, dumps(doc), qos=0)
        except EdgeError as exc:
            log.warning("stream %s: publish failed: %s", self.stream, exc)
            return False
        self._last = now
        self.published += 1
        return True


def encode_jpeg(image: np.ndarray, quality: int, max_bytes: int) -> bytes | None:
    """JPEG of ``image`` within ``max_bytes``: lower quality, then half size, else None."""
    import cv2

    img = image
    for _ in range(4):
        for q in (quality, min(quality, 50)):
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])
            if ok and buf.nbytes <= max_bytes:
                return buf.tobytes()
        img = cv2.resize(img, (max(1, img.shape[1] // 2), max(1, img.shape[0] // 2)), interpolation=cv2.INTER_AREA)
    return None


class Sampler:
    """Chooses frames for the flywheel (random share + low confidence), capped per hour and in size."""

    def __init__(
        self,
        cfg: SampleConfig,
        stream: str,
        append: Callable[[list[Row]], object] | None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg, self.stream, self.append = cfg, stream, append
        self._random = (rng or random.Random()).random
        self._clock = clock
        self._recent: deque[float] = deque()
        self.sampled = 0
        self.capped = 0  # wanted but over max_per_hour or max_bytes

    def reason(self, score: float | None) -> str | None:
        low = self.cfg.on_low_confidence
        if low is not None and (score is None or score < low):
            return "low_confidence"
        if self.cfg.rate > 0 and self._random() < self.cfg.rate:
            return "random"
        return None

    def offer(self, image: np.ndarray, doc: dict[str, Any], score: float | None) -> bool:
        """Sample this frame if the rules say so; True when a record went to the outbox."""
        if self.append is None:
            return False
        why = self.reason(score)
        if why is None:
            return False
        now = self._clock()
        while self._recent and now - self._recent[0] >= 3600.0:
            self._recent.popleft()
        if len(self._recent) >= self.cfg.max_per_hour:
            self.capped += 1
            return False
        jpeg = encode_jpeg(image, self.cfg.jpeg_quality, self.cfg.max_bytes)
        if jpeg is None:
            self.capped += 1
            return False
        body = {
            "model": doc["model"],
            "version": doc["version"],
            "request_id": f"{self.stream}-{doc['frame']}-{int(doc['frame_ts'] * 1000)}",
            "latency_ms": doc["latency_ms"],
            "outputs": doc["result"],
            "stream": self.stream,
            "sample_reason": why,
            "inputs": {"frame": {"jpeg_base64": base64.b64encode(jpeg).decode(), "shape": list(image.shape)}},
        }
        row = Row("prediction", doc["frame_ts"], dumps(body).decode(), model=doc["model"],
                  request_id=body["request_id"], has_inputs=True)  # fmt: skip
        try:
            self.append([row])
        except EdgeError as exc:
            log.warning("stream %s: frame sample not stored: %s", self.stream, exc)
            return False
        self._recent.append(now)
        self.sampled += 1
        return True
