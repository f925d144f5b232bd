"""A real ``NOTIFY_SOCKET``: a unix datagram socket that collects what the agent tells systemd."""

from __future__ import annotations

import socket
import time
from pathlib import Path


class NotifySocket:
    """Binds ``path`` (AF_UNIX, SOCK_DGRAM) and keeps every received assignment, in order."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        """Read what is queued now; returns the new assignments."""
        new: list[str] = []
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                break
            new.extend(data.decode().split("\n"))
        self.messages.extend(new)
        return new

    def wait_for(self, prefix: str, timeout: float = 60, after: int = 0) -> str:
        """The first assignment starting with ``prefix`` at index ≥ ``after``; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.drain()
            for m in self.messages[after:]:
                if m.startswith(prefix):
                    return m
        raise AssertionError(f"no {prefix!r} from the agent; got {self.messages[-10:]}")

    def close(self) -> None:
        self.sock.close()
