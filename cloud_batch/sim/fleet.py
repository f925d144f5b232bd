"""``SimFleet``: a thousand simulated devices in one process, on one broker (see ``sim.device``).

One event loop (``sim.loop``) drives every device's MQTT client; downloads run on a small
worker pool. Use it as a context manager.
"""

from __future__ import annotations

import logging
import random
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cloud_batch.sim.device import SETTLE_S, SimDevice
from cloud_batch.sim.loop import EventLoop
from edge_agent.mqtt.link import parse_broker_url
from edge_agent.wire.names import check_segment
from edge_agent.wire.protocol import DeviceState
from edge_agent.wire.signing import load_public_key

log = logging.getLogger("cloud_batch.sim")


class SimFleet:
    """``n`` simulated devices ``{prefix}-0000``… of ``fleet`` on one broker, in this process.

    ``trusted_keys``: Ed25519 public keys (or PEM paths) releases must be signed with.
    Failing devices: ``fail_ids`` or, else, ``round(fail_rate * n)`` of them drawn with ``seed``.
    ``settle_s``: wait for a release's rollout (the agent's default: 1 s). Use as a context manager.
    """

    def __init__(
        self,
        broker_url: str,
        fleet: str,
        n: int,
        *,
        trusted_keys: Iterable[Ed25519PublicKey | str | Path],
        fail_ids: Iterable[str] | None = None,
        fail_rate: float = 0.0,
        seed: int = 0,
        prefix: str = "sim",
        initial_models: Mapping[str, str] | None = None,
        workdir: str | Path | None = None,
        workers: int = 16,
        settle_s: float = SETTLE_S,
        keepalive: int = 60,
        stall_timeout_s: float = 10.0,
        download_timeout_s: float | None = 300.0,
    ) -> None:
        if n < 1:
            raise ValueError("n must be >= 1")
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError("fail_rate must be between 0 and 1")
        self.host, self.port, tls = parse_broker_url(broker_url)
        if tls:
            raise ValueError("SimFleet speaks plain MQTT only (mqtt://)")
        self.fleet = check_segment(fleet, "fleet")
        self.trusted = [k if isinstance(k, Ed25519PublicKey) else load_public_key(k) for k in trusted_keys]
        self.initial_models = dict(initial_models or {})
        self.settle_s = settle_s
        self.keepalive = keepalive
        self.stall_timeout_s = stall_timeout_s
        self.download_timeout_s = download_timeout_s
        self.device_ids = [f"{prefix}-{i:04d}" for i in range(n)]
        if fail_ids is not None:
            self.fail_ids = set(fail_ids)
            unknown = self.fail_ids - set(self.device_ids)
            if unknown:
                raise ValueError(f"fail_ids not in the fleet: {sorted(unknown)[:5]}")
        else:
            self.fail_ids = set(random.Random(seed).sample(self.device_ids, round(fail_rate * n)))
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="simfleet-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stopping = False
        self.loop = EventLoop()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="simfleet-dl")
        self.devices = {d: SimDevice(self, d, d in self.fail_ids) for d in self.device_ids}
        self._ready = 0
        self._all_ready = threading.Event()
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> SimFleet:
        """Connect every device; return once each has announced itself and subscribed."""
        _raise_fd_limit(len(self.devices) + 256)
        self._started = True
        for device in self.devices.values():
            self.loop.attach(device.client)
        self.loop.start()
        self.loop.call_soon(self._connect_batch, 0)
        if not self._all_ready.wait(timeout_s):
            ready = self._ready
            self.stop()
            raise TimeoutError(f"only {ready}/{len(self.devices)} simulated devices connected within {timeout_s:g}s")
        return self

    def _connect_batch(self, start: int, batch: int = 50) -> None:
        for device_id in self.device_ids[start : start + batch]:
            self.devices[device_id].connect()
        if start + batch < len(self.device_ids):
            self.loop.call_soon(self._connect_batch, start + batch)

    def device_ready(self) -> None:
        self._ready += 1
        if self._ready == len(self.devices):
            self._all_ready.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every device cleanly (retained ``offline``, DISCONNECT) and free everything."""
        if not self._started:
            if not self.stopping:  # never started: only the loop's sockets and the work dir to free
                self.stopping = True
                self.loop.stop()
                if self._own_workdir:
                    shutil.rmtree(self.workdir, ignore_errors=True)
            return
        self._started = False
        self.stopping = True
        try:
            self.loop.run_sync(self._shutdown_devices, timeout_s=timeout_s)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if (
                    self.loop.run_sync(
                        lambda: sum(d.client.socket() is not None and not d.killed for d in self.devices.values())
                    )
                    == 0
                ):
                    break
                time.sleep(0.05)
        except Exception:
            log.exception("simulated fleet: clean stop failed")
        self.loop.stop()
        self.pool.shutdown(wait=True, cancel_futures=True)
        for device in self.devices.values():
            sock = device.client.socket()
            if sock is not None and not device.killed:
                sock.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _shutdown_devices(self) -> None:
        for device in self.devices.values():
            device.shutdown()

    def __enter__(self) -> SimFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control and inspection (any thread) ------------------------------------------------
    def kill(self, device_id: str) -> None:
        """Cut one device's connection uncleanly (no DISCONNECT): the broker publishes its ``offline`` will."""
        self.loop.run_sync(self.devices[device_id].kill)

    def states(self) -> dict[str, DeviceState]:
        """Every device's current DeviceState, as it would publish it now."""
        return self.loop.run_sync(lambda: {d: dev.device_state() for d, dev in self.devices.items()})


def _raise_fd_limit(needed: int) -> None:
    """One socket per device (plus chunk files): lift the soft RLIMIT_NOFILE towards the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            log.warning("open file limit %d is below the %d a simulated fleet of this size needs", target, needed)


__all__ = ["SimFleet"]
