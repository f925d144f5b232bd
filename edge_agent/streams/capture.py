"""Capture: one thread per stream reads frames with OpenCV ``VideoCapture`` into a slot of depth 1.

Under the ``latest`` policy a new frame replaces one the model has not taken yet (a drop, counted);
under ``every`` the reader waits until the model took the previous frame. A source that fails to
open or stops delivering frames is reopened with exponential backoff (``reconnect_s`` doubling up
to ``max_reconnect_s``); a file at its end is reopened at once (``loop``) or ends the stream.
Network sources get OpenCV's open/read timeouts, so a silent server cannot hang the reader.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.config.streams import StreamConfig

log = logging.getLogger(__name__)

OPEN_TIMEOUT_MS = 5000
READ_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class Frame:
    image: np.ndarray
    ts: float  # wall-clock time it was read (time.time())
    seq: int  # 1, 2, ... per stream


class FrameSlot:
    """The newest frame only (queue depth 1); ``blocking`` makes the writer wait instead of replacing."""

    def __init__(self, blocking: bool) -> None:
        self.blocking = blocking
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._closed = False

    def put(self, frame: Frame) -> bool:
        """Offer a frame; True when it replaced one nobody took (a dropped frame)."""
        with self._cond:
            while self.blocking and self._frame is not None and not self._closed:
                self._cond.wait(0.5)
            dropped = self._frame is not None
            self._frame = frame
            self._cond.notify_all()
            return dropped

    def get(self, timeout: float) -> Frame | None:
        """Take the newest frame, waiting up to ``timeout`` s; None when none came or the slot is closed."""
        with self._cond:
            if self._frame is None and not self._closed:
                self._cond.wait(timeout)
            frame, self._frame = self._frame, None
            self._cond.notify_all()
            return frame

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def open_capture(source: str | int) -> Any:  # OpenCV ships no usable types: a cv2.VideoCapture is Any here
    """An opened ``cv2.VideoCapture`` for a camera index, device, URL or file (check ``isOpened()``)."""
    import cv2  # imported lazily: only streams and image models need OpenCV

    if isinstance(source, int):
        return cv2.VideoCapture(source)
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, READ_TIMEOUT_MS]
    backend = cv2.CAP_FFMPEG if "://" in source else cv2.CAP_ANY
    return cv2.VideoCapture(source, backend, params)


class Capture:
    """The reader thread of one stream. ``on_read(dropped)`` is called once per frame read.

    ``reconnects`` counts reopenings after a failure (cannot open, stopped delivering), not a file's loops.
    """

    def __init__(
        self,
        cfg: StreamConfig,
        slot: FrameSlot,
        *,
        on_read: Callable[[bool], None],
        on_state: Callable[[str, str | None], None],
        opener: Callable[[str | int], Any] = open_capture,
    ) -> None:
        self.cfg, self.slot = cfg, slot
        self.on_read, self.on_state, self.opener = on_read, on_state, opener
        self.ended = threading.Event()  # a non-looping file reached its end
        self.reconnects = 0
        self._stop = threading.Event()
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name=f"stream-capture-{cfg.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the reader to stop (returns at once; a blocking read ends within the read timeout)."""
        self._stop.set()
        self.slot.close()

    def stop(self, timeout: float = 10.0) -> None:
        self.request_stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        backoff = self.cfg.reconnect_s
        retry = False  # reopening after a failure (a reconnect), not the first open or a file's loop
        while not self._stop.is_set():
            if retry:
                self.reconnects += 1
            retry = True
            error: str | None = None
            try:
                cap = self.opener(self.cfg.source)
            except Exception as exc:  # OpenCV raises on some malformed sources
                cap, error = None, f"cannot open {self.cfg.source}: {exc}"
            else:
                error = None if cap.isOpened() else f"cannot open {self.cfg.source}"
            if error is not None:
                if cap is not None:
                    cap.release()
                self.on_state("reconnecting", error)
                self._stop.wait(backoff)
                backoff = min(self.cfg.max_reconnect_s, max(backoff * 2, 0.01))
                continue
            self.on_state("running", None)
            try:
                delivered, at_end = self._read_all(cap)
            finally:
                cap.release()
            if delivered:
                backoff = self.cfg.reconnect_s
            if at_end and not self.cfg.loop:
                self.ended.set()
                self.on_state("ended", None)
                return
            retry = not at_end  # a file's loop reopens it without counting a reconnect
            if not at_end and not self._stop.is_set():
                self.on_state("reconnecting", f"{self.cfg.source} stopped delivering frames")
                self._stop.wait(backoff)
                backoff = min(self.cfg.max_reconnect_s, max(backoff * 2, 0.01))

    def _read_all(self, cap: Any) -> tuple[int, bool]:
        """Read until the source fails or the stop; return (frames read, reached a file's end)."""
        import cv2

        cfg = self.cfg
        fps = cfg.source_fps
        if fps <= 0 and cfg.is_file and cfg.policy == "latest":
            fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)  # a file plays at its own rate, like a camera
        period = 1.0 / fps if fps > 0 else 0.0
        n = 0
        due = time.monotonic()
        while not self._stop.is_set():
            ok, image = cap.read()
            if not ok or image is None:
                return n, cfg.is_file and n > 0
            n += 1
            self._seq += 1
            self.on_read(self.slot.put(Frame(image, time.time(), self._seq)))
            if period:
                due += period
                delay = due - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                else:
                    due = time.monotonic()  # fell behind: do not burst to catch up
        return n, False
