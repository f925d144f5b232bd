"""Where the tests run: the repo's paths, the interpreter, and free local ports for real servers."""

from __future__ import annotations

import random
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
PYTHON = sys.executable


def _ephemeral_low() -> int:
    """The bottom of the kernel's ephemeral range: outgoing connections never take a port below it."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port nobody listens on right now, so each broker or HTTP server gets its own.

    It is drawn below the ephemeral range: a broker stopped and started again on its port (or reserved and
    started later) cannot then lose it to one of the thousands of outgoing connections a test makes;
    and above 19999, so `ray start` (whose workers take 10002-19999) accepts it.
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(20000 if low > 21000 else 1024, low)  # above Ray's worker ports (10002-19999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")
