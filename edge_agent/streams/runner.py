"""One stream: its capture thread feeds an inference thread that runs the served model on the newest frame.

Each frame resolves the model through ``ModelServer.get`` (the same ``LoadedModel`` and interpreter
pool as HTTP requests, so a hot swap applies to streams too), is preprocessed by the manifest
(``inference/preprocess.frame_to_tensor``), run, postprocessed (``inference/postprocess``) into
boxes or classes in source pixels, then handed to ``/latest``, the SSE subscribers, MQTT and the
sampler. A failure (model missing, not an image model, a bad frame) marks the stream with its reason
and never leaves this stream's threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from edge_agent.config.streams import StreamConfig
from edge_agent.errors import EdgeError
from edge_agent.inference.postprocess import best_score, postprocess, postprocessing_of
from edge_agent.inference.preprocess import Geometry, frame_to_tensor, image_input
from edge_agent.inference.runtime import LoadedModel
from edge_agent.models.serving import ModelServer
from edge_agent.streams.capture import Capture, Frame, FrameSlot
from edge_agent.streams.metrics import StreamMetrics
from edge_agent.streams.outputs import Publisher, Sampler
from edge_agent.streams.rate import RecentRate
from edge_agent.telemetry.outbox import Row
from edge_agent.wire.model.manifest import Manifest

log = logging.getLogger(__name__)

Subscriber = Callable[[dict[str, Any]], None]
RETRY_S = 1.0  # wait before retrying a missing or unusable model


def frame_input(
    manifest: Manifest, image: np.ndarray, roi: Sequence[int] | None = None
) -> tuple[dict[str, np.ndarray], Geometry]:
    """One frame as the model's inputs (batch 1) and the geometry back to the frame."""
    name = image_input(manifest)
    x, geometry = frame_to_tensor(image, manifest.preprocessing, roi)
    spec = manifest.inputs[0]
    if spec.quantization is None and np.dtype(spec.dtype).kind in "iu":
        x = np.clip(np.rint(x), np.iinfo(spec.dtype).min, np.iinfo(spec.dtype).max).astype(spec.dtype)
    return {name: x}, geometry


def frame_result(manifest: Manifest, outputs: Mapping[str, np.ndarray], geometry: Geometry) -> dict[str, Any]:
    """One frame's outputs (batch 1) as boxes or classes in the frame's pixels."""
    return postprocess(outputs, postprocessing_of(manifest), geometry, manifest.labels)


def infer_frame(model: LoadedModel, image: np.ndarray, roi: Sequence[int] | None = None) -> dict[str, Any]:
    """One frame through ``model``: the one frame rule, for streams, video files and the cloud's video scoring."""
    feeds, geometry = frame_input(model.manifest, image, roi)
    return frame_result(model.manifest, model.predict(feeds), geometry)


class Stream:
    """A configured stream and its two threads; thread-safe status, latest result and subscriptions."""

    def __init__(
        self,
        cfg: StreamConfig,
        server: ModelServer,
        metrics: StreamMetrics,
        *,
        outbox_append: Callable[[list[Row]], object] | None = None,
        opener: Callable[[str | int], Any] | None = None,  # -> cv2.VideoCapture (untyped: Any)
    ) -> None:
        self.cfg, self.server, self.metrics = cfg, server, metrics
        self._m = metrics.for_stream(cfg.id)
        self.slot = FrameSlot(blocking=cfg.policy == "every")
        kwargs = {"opener": opener} if opener is not None else {}
        self.capture = Capture(cfg, self.slot, on_read=self._on_read, on_state=self._on_capture_state, **kwargs)
        self.publisher = Publisher(cfg.publish, cfg.id)
        self.sampler = Sampler(cfg.sample, cfg.id, outbox_append)
        self.state = "starting"
        self.last_error: str | None = None
        self.counts = {"read": 0, "processed": 0, "dropped": 0, "failed": 0}
        self._latest: dict[str, Any] | None = None
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._model_checked: LoadedModel | None = None
        self.rate_in, self.rate_processed = RecentRate(), RecentRate()  # fps_in, fps_processed: recent, not lifetime
        self._thread = threading.Thread(target=self._run, name=f"stream-infer-{cfg.id}", daemon=True)
        metrics.set_state(cfg.id, "starting")

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.rate_in.restart()
        self.rate_processed.restart()
        self.capture.start()
        self._thread.start()

    def request_stop(self) -> None:
        """Ask both threads to stop without waiting (``stop`` waits)."""
        self._stop.set()
        self.capture.request_stop()

    def stop(self) -> None:
        self.request_stop()
        self.capture.stop()
        if self._thread.is_alive():
            self._thread.join(10.0)
        self._set_state("stopped", self.last_error)

    # -- state ----------------------------------------------------------------------------
    def _set_state(self, state: str, error: str | None) -> None:
        with self._lock:
            changed = (state, error) != (self.state, self.last_error)
            self.state = state
            if error is not None or state == "running":
                self.last_error = error
        if changed:
            self.metrics.set_state(self.cfg.id, state)
            if error:
                log.warning("stream %s: %s: %s", self.cfg.id, state, error)

    def _on_capture_state(self, state: str, error: str | None) -> None:
        if self.state == "failed" and state == "running":
            return  # a model problem stays visible until a frame succeeds
        if state == "ended":
            return  # the inference thread says so once it has taken the last frame (``_run``), not before
        self._set_state(state, error)

    def _on_read(self, dropped: bool) -> None:
        self.counts["read"] += 1
        self.rate_in.tick()
        self._m["read"].inc()
        if dropped:
            self.counts["dropped"] += 1
            self._m["dropped"].inc()

    # -- the inference thread ---------------------------------------------------------------
    def _run(self) -> None:
        period = 1.0 / self.cfg.max_fps if self.cfg.max_fps > 0 else 0.0
        next_at = time.monotonic()
        while not self._stop.is_set():
            if period:
                delay = next_at - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
            frame = self.slot.get(0.5)
            if frame is None:
                if self.capture.ended.is_set():
                    self._set_state("ended", None)
                continue
            next_at = time.monotonic() + period
            try:
                model = self.server.get(self.cfg.model)
                if model is not self._model_checked:
                    image_input(model.manifest)  # not an image model: fail the stream with the reason
                    self._model_checked = model
            except EdgeError as exc:
                self._fail(f"model {self.cfg.model!r}: {exc}")
                self._stop.wait(RETRY_S)
                continue
            self._process(model, frame)

    def _fail(self, reason: str) -> None:
        self.counts["failed"] += 1
        self._m["failed"].inc()
        self._set_state("failed", reason)

    def _process(self, model: LoadedModel, frame: Frame) -> None:
        started = time.time()
        self._m["age"].observe(max(0.0, started - frame.ts))
        try:
            result = infer_frame(model, frame.image, self.cfg.roi)
        except EdgeError as exc:
            self._fail(f"frame {frame.seq}: {exc}")
            return
        except Exception as exc:  # a runtime fault on one frame must not end the stream
            log.exception("stream %s: frame %d failed", self.cfg.id, frame.seq)
            self._fail(f"frame {frame.seq}: {type(exc).__name__}: {exc}")
            return
        done = time.time()
        self._m["latency"].observe(done - frame.ts)
        self._m["processed"].inc()
        h, w = frame.image.shape[:2]
        doc = {
            "stream": self.cfg.id,
            "model": model.name,
            "version": model.version,
            "frame": frame.seq,
            "frame_ts": frame.ts,
            "frame_size": [int(w), int(h)],
            "age_at_inference_ms": round((started - frame.ts) * 1000.0, 3),
            "latency_ms": round((done - frame.ts) * 1000.0, 3),
            "result": result,
        }
        with self._lock:
            self.counts["processed"] += 1
            self._latest = doc
            subscribers = list(self._subscribers)
        self.rate_processed.tick()
        if self.state != "running" and not self.capture.ended.is_set():
            self._set_state("running", None)
        score = best_score(result)
        for fn in subscribers:
            try:
                fn(doc)
            except Exception:
                log.exception("stream %s: subscriber failed", self.cfg.id)
        self.publisher.offer(doc, score)
        self.sampler.offer(frame.image, doc, score)

    # -- readers (any thread) ---------------------------------------------------------------
    def latest(self) -> dict[str, Any] | None:
        """The newest result with its age now, or None before the first one."""
        with self._lock:
            doc = self._latest
        if doc is None:
            return None
        return {**doc, "age_ms": round((time.time() - doc["frame_ts"]) * 1000.0, 3)}

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call ``fn(doc)`` on the inference thread for each new result; returns the unsubscribe function."""
        with self._lock:
            self._subscribers.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._subscribers:
                    self._subscribers.remove(fn)

        return unsubscribe

    def status(self) -> dict[str, Any]:
        """The stream's state and counters; ``fps_in`` / ``fps_processed`` are rates over the last 5 s."""
        with self._lock:
            counts = dict(self.counts)
            state, error = self.state, self.last_error
        return {
            "id": self.cfg.id,
            "source": str(self.cfg.source),
            "model": self.cfg.model,
            "policy": self.cfg.policy,
            "state": state,
            "last_error": error,
            "frames": counts,
            "fps_in": round(self.rate_in.per_second(), 2),
            "fps_processed": round(self.rate_processed.per_second(), 2),
            "reconnects": self.capture.reconnects,
            "published": self.publisher.published,
            "sampled": self.sampler.sampled,
        }
