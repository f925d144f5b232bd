"""systemd's ``sd_notify`` datagram protocol, in a few lines (no dependency).

The service manager passes ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) and,
with ``WatchdogSec=``, ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``). A message is newline-separated
``KEY=VALUE`` assignments in one datagram: ``READY=1``, ``STATUS=...``, ``STOPPING=1``,
``WATCHDOG=1`` (see ``man sd_notify``). Outside systemd every call is a cheap no-op.
"""

from __future__ import annotations

import os
import socket

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"


def _address(value: str) -> str | bytes:
    return b"\0" + value[1:].encode() if value.startswith("@") else value


def notify(*assignments: str) -> bool:
    """Send ``assignments`` (e.g. ``"READY=1"``, ``"STATUS=serving 2 models"``) in one datagram.

    Returns False when there is no ``$NOTIFY_SOCKET`` or the send failed (systemd gone): the
    agent keeps serving either way.
    """
    target = os.environ.get(NOTIFY_SOCKET)
    if not target or not assignments:
        return False
    payload = "\n".join(a.replace("\n", " ") for a in assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, _address(target))
    except OSError:
        return False
    return True


def watchdog_period_s() -> float | None:
    """The ``WatchdogSec=`` of this process in seconds, or None when the watchdog is off (or meant for another pid)."""
    usec = os.environ.get(WATCHDOG_USEC, "")
    pid = os.environ.get(WATCHDOG_PID, "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000
