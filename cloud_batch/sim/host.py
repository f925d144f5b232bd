"""The seams between the simulator's modules, as Protocols, so its modules import one way only.

``fleet`` builds devices (``device``), devices download with ``candidate``; each lower module
types what it needs from the one above with these instead of importing it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cloud_batch.sim.loop import EventLoop

Handler = Callable[[str, bytes, bool], None]  # (topic, payload, retained)


class FleetHost(Protocol):
    """What a SimDevice reads from its SimFleet: the broker, the fleet, the shared loop and pool, the pacing."""

    host: str
    port: int
    keepalive: int
    fleet: str
    trusted: list[Ed25519PublicKey]
    initial_models: dict[str, str]
    workdir: Path
    loop: EventLoop
    pool: ThreadPoolExecutor
    stopping: bool
    settle_s: float
    stall_timeout_s: float
    download_timeout_s: float | None

    def device_ready(self) -> None:
        """A device has connected and subscribed for the first time."""


class LinkHost(Protocol):
    """What ``candidate.LoopLink`` reads from its SimDevice: the connection and the loop-thread subscriptions."""

    connects: int
    connected: bool
    loop: EventLoop

    def add_subscription(self, topic: str, handler: Handler, qos: int) -> None: ...

    def remove_subscription(self, topic: str) -> None: ...
