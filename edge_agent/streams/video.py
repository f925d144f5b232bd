"""Offline video: every Nth frame of a file through a model, one JSON line per frame.

``edge-agent predict MODEL --video FILE [--every N] [--out results.jsonl]`` and the cloud's
``cloud-batch score`` on videos both call :func:`video_results`, which runs each frame through
``runner.infer_frame`` (the streams' one frame rule), so the cloud and the device give the same
boxes for the same frames. A line::

    {"frame": 12, "ts_ms": 480.0, "result": {"kind": "ssd_anchors", "detections": [...]}}

``frame`` counts from 0 in the file; ``ts_ms`` is the frame's position in the video.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from edge_agent.errors import RequestError
from edge_agent.inference.preprocess import image_input
from edge_agent.inference.runtime import LoadedModel
from edge_agent.streams.runner import infer_frame

VIDEO_SUFFIXES = {".avi", ".mp4", ".mkv", ".mov", ".webm", ".mjpg", ".mjpeg", ".m4v", ".mpg", ".mpeg"}


def video_frames(path: str | Path, every: int = 1, start: int = 0) -> Iterator[tuple[int, float, np.ndarray]]:
    """``(index, position ms, BGR image)`` of every ``every``-th frame from ``start`` on; RequestError if unreadable.

    Frames before ``start`` and between the chosen ones are skipped without decoding (``grab``).
    """
    import cv2

    if every < 1:
        raise RequestError(f"--every must be at least 1, got {every}")
    p = Path(path)
    if not p.is_file():
        raise RequestError(f"video file not found: {p}")
    cap = cv2.VideoCapture(str(p))
    try:
        if not cap.isOpened():
            raise RequestError(f"cannot open video {p.name} (not a video OpenCV can decode)")
        index = 0
        while True:
            if index < start or (index - start) % every:
                if not cap.grab():  # skip without decoding
                    break
            else:
                ok, image = cap.read()
                if not ok or image is None:
                    break
                yield index, float(cap.get(cv2.CAP_PROP_POS_MSEC)), image
            index += 1
        if index == 0:
            raise RequestError(f"video {p.name} has no frames OpenCV can decode")
    finally:
        cap.release()


def frame_count(path: str | Path) -> int:
    """The container's frame count (0 when it does not say)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        return max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0))
    finally:
        cap.release()


def video_results(model: LoadedModel, path: str | Path, every: int = 1) -> Iterator[dict[str, Any]]:
    """One result line per processed frame of ``path``."""
    image_input(model.manifest)  # refuse a model without an image input before decoding anything
    for index, ts_ms, image in video_frames(path, every):
        yield {"frame": index, "ts_ms": round(ts_ms, 3), "result": infer_frame(model, image)}


def write_jsonl(results: Iterator[dict[str, Any]], out: IO[str], progress: Callable[[int], None] | None = None) -> int:
    """Write each result as a JSON line; return how many."""
    n = 0
    for line in results:
        out.write(json.dumps(line, separators=(",", ":")) + "\n")
        n += 1
        if progress is not None:
            progress(n)
    return n


BAR_WIDTH = 30


def progress_line(n: int, expected: int) -> str:
    """``frames [#######-------]  12/40  30%`` (or ``frames 12`` when the file does not say its length)."""
    if expected <= 0:
        return f"frames {n}"
    done = min(n, expected)
    filled = BAR_WIDTH * done // expected
    width = len(str(expected))
    return (
        f"frames [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {done:>{width}}/{expected} {100 * done // expected:3d}%"
    )


class TerminalBar:
    """A progress bar redrawn in place (``\\r``) for each frame written; ``close`` ends its line."""

    def __init__(self, expected: int, stream: IO[str]) -> None:
        self.expected, self.stream = expected, stream
        self._open = False

    def __call__(self, n: int) -> None:
        self.stream.write("\r" + progress_line(n, self.expected))
        self.stream.flush()
        self._open = True

    def close(self) -> None:
        """End the bar's line (also when the container's frame count was wrong or the run failed)."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def terminal_progress(total: int, every: int, stream: IO[str] | None = None) -> TerminalBar | None:
    """A bar of the ``total / every`` frames to process on ``stream`` (stderr) when it is a terminal, else None."""
    stream = stream if stream is not None else sys.stderr  # looked up now: whatever stderr is at this call
    if not stream.isatty():
        return None
    return TerminalBar((total + every - 1) // every if total else 0, stream)
