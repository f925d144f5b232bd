"""Video fixtures for the camera tests: a digits clip with known labels, still clips, an MJPEG HTTP server."""

from __future__ import annotations

import socketserver
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
from sklearn.datasets import load_digits

BOUNDARY = b"frame"


def write_clip(path: Path, frames: Sequence[np.ndarray], fps: float = 25.0) -> Path:
    """BGR frames → an MJPG AVI (what cameras and ``cv2.VideoWriter`` produce everywhere)."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened(), "cv2.VideoWriter cannot write MJPG/AVI"
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def digit_frame(pixels: np.ndarray, size: int = 128) -> np.ndarray:
    """One sklearn digit (8x8, 0-16 ink) as dark ink on white paper, upscaled to ``size``² BGR."""
    grey = (255 - pixels.reshape(8, 8) * (255.0 / 16.0)).astype(np.uint8)
    big = cv2.resize(grey, (size, size), interpolation=cv2.INTER_NEAREST)
    return cv2.cvtColor(big, cv2.COLOR_GRAY2BGR)


def digits_clip(path: Path, n: int = 60, fps: float = 25.0) -> list[int]:
    """Write the first ``n`` digits as a clip, one digit per frame; return the true label of each frame."""
    digits = load_digits()
    write_clip(path, [digit_frame(digits.data[i]) for i in range(n)], fps)
    return [int(t) for t in digits.target[:n]]


class MjpegServer:
    """``multipart/x-mixed-replace`` JPEG frames over HTTP (an IP camera), stoppable and restartable on its port."""

    def __init__(self, frame: np.ndarray, fps: float = 30.0) -> None:
        ok, buf = cv2.imencode(".jpg", frame)
        assert ok
        self.jpeg, self.period = buf.tobytes(), 1.0 / fps
        self.port = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._alive = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/video.mjpg"

    def start(self) -> MjpegServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=" + BOUNDARY.decode())
                self.end_headers()
                try:
                    while owner._alive.is_set():
                        part = b"--%s\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % (
                            BOUNDARY,
                            len(owner.jpeg),
                        )
                        self.wfile.write(part + owner.jpeg + b"\r\n")
                        time.sleep(owner.period)
                except OSError:
                    pass

            def log_message(self, *args: object) -> None:
                pass

        socketserver.TCPServer.allow_reuse_address = True
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._alive.set()
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Close the listening socket and end every open stream (the camera goes away)."""
        self._alive.clear()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
