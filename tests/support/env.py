"""Where the tests run: the repo's paths, the interpreter, and free local ports for real servers."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
PYTHON = sys.executable


def free_port() -> int:
    """A port nobody listens on right now, so each broker or HTTP server gets its own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
