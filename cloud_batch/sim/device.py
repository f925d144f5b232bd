"""Simulated devices that speak the OTA protocol like ``edge_agent.update.coordinator.OtaAgent``, a thousand to a process.

Each ``SimDevice`` has its own MQTT connection (client id = device id), so presence works
exactly as on a real device: a retained ``online`` on connect and a retained ``offline`` last
will that the broker publishes when the connection dies uncleanly (``SimFleet.kill``). Like
the agent it subscribes to the fleet's ``rollouts/+`` then ``releases/+``, verifies each
release's Ed25519 signature against trusted keys, rejects wrong fleets/kinds/names and
downgrades (``rejected``), waits ``settle_s`` for the rollout document, applies the rollout
gate (status active/complete and ``in_cohort``), downloads the artifact with the real
``transfer.Downloader`` + ``ChunkStore`` (per-chunk subscriptions, sha256 checks, fsynced
chunk files, assembly), unpacks it and checks its manifest, then reports the update states
``downloading → verifying → validating → activating → health_check → committed`` in its
retained DeviceState (``waiting_window`` first when the release has a maintenance window that
is not open and is not urgent). Devices in ``fail_ids`` fail validation (``failed``). A rollout
``aborted`` stops an update before activation (``failed``) and rolls back an activated one
(``rolled_back``, result ``rolled-back``). Not simulated: TFLite validation and serving (the
candidate is never loaded), persistence across restarts.

Why one event loop and not one paho thread per device: paho's threaded loop waits with
``select.select``, which cannot watch file descriptors above 1023; each threaded client holds
three (socket + wake-up socket pair), so one process tops out near 340 devices, and beyond
that the loop threads die with "filedescriptor out of range". Measured here (2 cores): 500
threaded clients, only 339 ever subscribed. So the fleet drives every paho client from one
thread with ``selectors`` (epoll): paho's socket callbacks register each socket,
``loop_read``/``loop_write`` run when it is ready and ``loop_misc`` (keepalive) once a second.
All paho calls happen on that thread; other threads hand work over with ``call_soon``.
Downloads run ``Downloader.run`` (which blocks) on a small worker pool; the Downloader gets
a per-device link adapter whose subscribe/unsubscribe are marshalled to the loop thread.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import logging
import random
import resource
import selectors
import shutil
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.errors import EdgeError, ManifestError, RejectedError
from edge_agent.mqtt.download import ChunkStore, Downloader, TransferStopped
from edge_agent.mqtt.link import parse_broker_url
from edge_agent.update.coordinator import OtaOptions, ReleaseRejected, authenticate_release, will_for
from edge_agent.wire.manifest import MANIFEST_FILE, version_key
from edge_agent.wire.protocol import (
    PRESENCE_OFFLINE,
    PRESENCE_ONLINE,
    RESULT_FAILED,
    RESULT_REJECTED,
    RESULT_ROLLED_BACK,
    RESULT_SUCCESS,
    ROOT,
    DeviceState,
    Release,
    Rollout,
    UpdateReport,
    check_segment,
    decode,
    device_state_topic,
    encode,
    in_cohort,
    in_window,
    presence_topic,
    unpack_to,
)
from edge_agent.wire.signing import load_public_key

log = logging.getLogger(__name__)

AGENT_VERSION = "sim-1"
SETTLE_S = OtaOptions().rollout_settle_s  # how long an agent waits for a release's rollout document
MISC_INTERVAL_S = 1.0
WINDOW_POLL_S = 1.0  # outside the release's maintenance window: check again this often


# -- the event loop ---------------------------------------------------------------------------
class EventLoop:
    """One thread that drives many paho clients through epoll, plus thread-safe calls and timers."""

    def __init__(self, name: str = "simfleet-loop") -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._timers: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._clients: set[mqtt.Client] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._thread.is_alive():
            self.call_soon(self._set_stopping)
            self._thread.join(timeout_s)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _set_stopping(self) -> None:
        self._stopping = True

    @property
    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    # -- scheduling (any thread) ----------------------------------------------------
    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self._calls.append((fn, args))
        if not self.in_loop:
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass  # the buffer is full of wake-ups already, or the loop is closing

    def call_later(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> None:
        if self.in_loop:
            heapq.heappush(self._timers, (time.monotonic() + delay_s, next(self._seq), fn, args))
        else:
            self.call_soon(self.call_later, delay_s, fn, *args)

    def run_sync(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 10.0) -> Any:
        """Run ``fn`` on the loop thread and return its result (from another thread)."""
        fut: Future[Any] = Future()

        def call() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

        self.call_soon(call)
        return fut.result(timeout_s)

    # -- paho clients (loop thread) -----------------------------------------------------
    def attach(self, client: mqtt.Client) -> None:
        client.on_socket_open = self._on_open
        client.on_socket_close = self._on_close
        client.on_socket_register_write = self._on_want_write
        client.on_socket_unregister_write = self._on_done_writing
        self._clients.add(client)

    def detach(self, client: mqtt.Client) -> None:
        self._clients.discard(client)
        sock = client.socket()
        if sock is not None:
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass

    def _on_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._sel.register(sock, selectors.EVENT_READ, client)

    def _on_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _on_want_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        try:
            self._sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
        except (KeyError, ValueError):
            pass

    def _on_done_writing(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        try:
            self._sel.modify(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError):
            pass

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        last_misc = time.monotonic()
        while not self._stopping:
            timeout = MISC_INTERVAL_S
            if self._calls:
                timeout = 0
            elif self._timers:
                timeout = max(0.0, min(timeout, self._timers[0][0] - time.monotonic()))
            for key, mask in self._sel.select(timeout):
                client = key.data
                if client is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                try:
                    if mask & selectors.EVENT_READ:
                        client.loop_read()
                    if mask & selectors.EVENT_WRITE and client.socket() is not None:
                        client.loop_write()
                except Exception:
                    log.exception("simulated fleet: a network step failed")
            for _ in range(len(self._calls)):
                fn, args = self._calls.popleft()
                self._safe(fn, args)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn, args = heapq.heappop(self._timers)
                self._safe(fn, args)
            if now - last_misc >= MISC_INTERVAL_S:
                last_misc = now
                for client in list(self._clients):
                    if client.socket() is not None:
                        self._safe(client.loop_misc, ())

    @staticmethod
    def _safe(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("simulated fleet: %r failed", fn)


# -- one device ----------------------------------------------------------------------------
class _LinkAdapter:
    """What ``transfer.Downloader`` needs from an MqttLink, served by a SimDevice on the loop thread."""

    def __init__(self, device: SimDevice) -> None:
        self._device = device

    @property
    def connects(self) -> int:
        return self._device.connects

    @property
    def connected(self) -> bool:
        return self._device.connected

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes, bool], None], qos: int = 1) -> None:
        self._device.loop.call_soon(self._device.add_subscription, topic_filter, handler, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        self._device.loop.call_soon(self._device.remove_subscription, topic_filter)


@dataclass
class _Job:
    """One update of one model on one device."""

    release: Release
    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: str = ""
    activated: bool = False
    done: bool = False


class SimDevice:
    """A protocol-faithful simulated device. All methods run on the fleet's loop thread."""

    def __init__(self, sim: SimFleet, device_id: str, fail: bool) -> None:
        self.sim = sim
        self.loop = sim.loop
        self.device_id = check_segment(device_id, "device id")
        self.fail = fail
        self.models: dict[str, str] = dict(sim.initial_models)
        self.previous: dict[str, str | None] = {}
        self.reports: dict[str, UpdateReport] = {}
        self.rollouts: dict[str, Rollout] = {}
        self.releases: dict[str, Release] = {}
        self.settle_until: dict[str, float] = {}
        self.handled: set[str] = set()  # release ids started, rejected or dropped: never started again
        self.jobs: dict[str, _Job] = {}
        self.subs: dict[str, tuple[Callable[[str, bytes, bool], None], int]] = {}
        self.connects = 0
        self.connected = False
        self.alive = True
        self.killed = False
        self.ready = False
        self.link = _LinkAdapter(self)
        self.dir = sim.workdir / device_id
        c = self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311, clean_session=True
        )
        will = will_for(sim.fleet, device_id)  # the agent's own last will: retained "offline"
        c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.max_inflight_messages_set(64)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self._sub_mid: int | None = None
        self._backoff = 0.5

    # -- connection -------------------------------------------------------------------------
    def connect(self) -> None:
        if not self.alive:
            return
        try:
            if self.connects == 0 and not self.connected:
                self.client.connect(self.sim.host, self.sim.port, keepalive=self.sim.keepalive)
            else:
                self.client.reconnect()
        except OSError as exc:
            log.debug("%s: connect failed (%s); retrying in %.1fs", self.device_id, exc, self._backoff)
            self.loop.call_later(self._backoff, self.connect)
            self._backoff = min(self._backoff * 2, 10.0)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("%s: broker refused the connection: %s", self.device_id, reason_code)
            return
        self.connects += 1
        self.connected = True
        self._backoff = 0.5
        fleet = self.sim.fleet
        client.publish(presence_topic(fleet, self.device_id), PRESENCE_ONLINE, qos=1, retain=True)
        self.publish_state()
        prefix = f"{ROOT}/fleets/{fleet}"
        subs = [(f"{prefix}/rollouts/+", 1), (f"{prefix}/releases/+", 1)]  # rollouts first, like OtaAgent
        subs += [(t, q) for t, (_, q) in self.subs.items()]
        _, self._sub_mid = client.subscribe(subs)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if mid == self._sub_mid and not self.ready:
            self.ready = True
            self.sim._device_ready()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connected = False
        if self.alive and not self.sim.stopping:
            self.loop.call_later(self._backoff, self.connect)
            self._backoff = min(self._backoff * 2, 10.0)

    def kill(self) -> None:
        """Drop the TCP connection without DISCONNECT: the broker publishes the last will."""
        self.alive = False
        self.killed = True
        self.connected = False
        for job in self.jobs.values():
            self._stop_job(job, "device killed")
        sock = self.client.socket()
        self.loop.detach(self.client)
        if sock is not None:
            try:
                sock.close()  # type: ignore[union-attr]
            except OSError:
                pass

    def shutdown(self) -> None:
        """A clean stop, like OtaAgent.stop: retained ``offline``, then DISCONNECT."""
        for job in self.jobs.values():
            self._stop_job(job, "device shutting down")
        if self.alive and self.connected:
            self.client.publish(presence_topic(self.sim.fleet, self.device_id), PRESENCE_OFFLINE, qos=1, retain=True)
        if not self.killed and self.client.socket() is not None:
            self.client.disconnect()  # written after the presence message; paho then closes the socket
        self.alive = False

    # -- subscriptions for the Downloader ---------------------------------------------------
    def add_subscription(self, topic: str, handler: Callable[[str, bytes, bool], None], qos: int) -> None:
        self.subs[topic] = (handler, qos)
        if self.connected:
            self.client.subscribe(topic, qos)

    def remove_subscription(self, topic: str) -> None:
        if self.subs.pop(topic, None) is not None and self.connected:
            self.client.unsubscribe(topic)

    # -- incoming ----------------------------------------------------------------------------
    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        topic, payload = msg.topic, msg.payload
        sub = self.subs.get(topic)
        if sub is not None:  # an artifact chunk the Downloader asked for
            sub[0](topic, payload, bool(msg.retain))
            return
        # ROOT/fleets/{fleet}/{rollouts|releases}/{name}
        parts = topic[len(ROOT) + 1 :].split("/") if topic.startswith(ROOT + "/") else []
        if len(parts) != 4 or parts[0] != "fleets" or parts[1] != self.sim.fleet:
            return
        if parts[2] == "rollouts":
            self._on_rollout(parts[3], payload)
        elif parts[2] == "releases":
            self._on_release(parts[3], payload)

    def _on_rollout(self, name: str, payload: bytes) -> None:
        if not payload:
            self.rollouts.pop(name, None)
            return
        try:
            ro = Rollout.from_dict(decode(payload, "rollout"))
        except ManifestError as exc:
            log.warning("%s: ignoring a malformed rollout for %s: %s", self.device_id, name, exc)
            return
        self.rollouts[name] = ro
        if ro.status == "aborted":
            self._abort(name, ro.release_id)
        else:
            self._consider(name)

    def _on_release(self, name: str, payload: bytes) -> None:
        if not payload:
            return
        digest = "doc:" + hashlib.sha256(payload).hexdigest()
        if digest in self.handled:
            return
        try:
            rel, _ = authenticate_release(payload, self.sim.trusted)
        except ReleaseRejected as exc:
            self._reject(name, exc.release_id, exc.version, str(exc), digest)
            return
        if rel.release_id in self.handled or (
            name in self.releases and self.releases[name].release_id == rel.release_id
        ):
            return
        reason = self._admit(name, rel)
        if reason is not None:
            self._reject(name, rel.release_id, rel.version, reason, rel.release_id)
            return
        self.releases[name] = rel
        self.settle_until[name] = time.monotonic() + self.sim.settle_s
        self.loop.call_later(self.sim.settle_s, self._consider, name)

    def _admit(self, name: str, rel: Release) -> str | None:
        """OtaAgent.admit's checks (the signature is already verified); the reason to reject, or None."""
        if rel.fleet != self.sim.fleet:
            return f"wrong fleet: the release is for fleet {rel.fleet!r}, this device is in {self.sim.fleet!r}"
        if rel.name != name:
            return f"release for model {rel.name!r} published on the topic of {name!r}"
        if rel.kind != "model":
            return f"kind {rel.kind!r} is not applied by the model agent"
        active = self.models.get(name)
        if active is not None and not rel.rollback and version_key(rel.version) <= version_key(active):
            return (
                f"anti-rollback: version {rel.version} is not newer than the active version {active} and the "
                "release is not a signed rollback"
            )
        return None

    def _reject(self, name: str, release_id: str, version: str, reason: str, key: str) -> None:
        self.handled.add(key)
        self.report(name, UpdateReport(release_id, name, version, "rejected", RESULT_REJECTED, reason))

    # -- the rollout gate and the update -----------------------------------------------------
    def _consider(self, name: str) -> None:
        rel = self.releases.get(name)
        if rel is None or rel.release_id in self.handled or not self.alive:
            return
        if time.monotonic() < self.settle_until.get(name, 0.0) - 1e-3:
            return  # its settle timer calls again
        ro = self.rollouts.get(name)
        if ro is not None and ro.release_id == rel.release_id:
            if ro.status not in ("active", "complete"):
                return  # held: halted rollouts start nothing new
            if not in_cohort(self.device_id, name, ro.percent):
                return  # held until a later stage includes this device
        self.handled.add(rel.release_id)
        old = self.jobs.get(name)
        if old is not None and not old.done:
            if old.activated:
                return  # an activated update finishes first (OtaAgent supersedes only before activation)
            self._stop_job(old, f"superseded by release {rel.release_id}")
        job = self.jobs[name] = _Job(rel)
        self._state(job, "downloading")
        self.sim.pool.submit(self._work, job)

    def _stop_job(self, job: _Job, reason: str) -> None:
        if not job.done and not job.activated:
            job.stop_reason = reason
            job.stop.set()

    def _work(self, job: _Job) -> None:
        """Worker thread: download, verify, validate; results go back to the loop thread."""
        rel = job.release
        post = self.loop.call_soon
        try:
            downloads = self.dir / "downloads"
            out = downloads / f"{rel.artifact.sha256}.tar"
            Downloader(
                self.link,
                ChunkStore(downloads, rel.artifact),
                window=8,
                use_http=False,
                out_path=out,
                stall_timeout_s=self.sim.stall_timeout_s,
            ).run(stop=job.stop, timeout_s=self.sim.download_timeout_s)
            post(self._state, job, "verifying")
            staging = Path(tempfile.mkdtemp(prefix="candidate-", dir=downloads))
            try:
                unpack_to(out, staging)
                manifest = json.loads((staging / MANIFEST_FILE).read_text())
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                out.unlink(missing_ok=True)
            if manifest.get("name") != rel.name or str(manifest.get("version")) != rel.version:
                raise ManifestError(
                    f"the artifact holds {manifest.get('name')} {manifest.get('version')}, not {rel.name} {rel.version}"
                )
            post(self._state, job, "validating")
            if self.fail:
                raise RejectedError("validation failed: golden samples differ (simulated failure)")
            post(self._activate, job)
        except TransferStopped:
            post(self._finish, job, "failed", job.stop_reason or "stopped")
        except (EdgeError, OSError, ValueError) as exc:
            post(self._finish, job, "failed", str(exc))
        except Exception as exc:
            log.exception("%s: update %s crashed", self.device_id, rel.release_id)
            post(self._finish, job, "failed", f"simulator error: {exc!r}")

    def _activate(self, job: _Job) -> None:
        if job.stop.is_set() or not self.alive:
            self._finish(job, "failed", job.stop_reason or "stopped")
            return
        policy = job.release.policy
        if not policy.urgent and not in_window(policy.window):
            report = self.reports.get(job.release.name)
            if report is None or report.state != "waiting_window":
                self._state(job, "waiting_window")
            self.loop.call_later(WINDOW_POLL_S, self._activate, job)
            return
        name = job.release.name
        job.activated = True
        self._state(job, "activating")
        self.previous[name] = self.models.get(name)
        self.models[name] = job.release.version
        self._state(job, "health_check")
        self.loop.call_later(job.release.policy.health_window_s, self._commit, job)

    def _commit(self, job: _Job) -> None:
        if not job.done and self.alive:
            self._finish(job, "committed", None)

    def _abort(self, name: str, release_id: str) -> None:
        reason = f"rollout {release_id} aborted"
        rel = self.releases.get(name)
        if rel is not None and rel.release_id == release_id:
            self.handled.add(release_id)  # held or settling: never start it
        job = self.jobs.get(name)
        if job is None or job.release.release_id != release_id:
            return
        if not job.activated:
            self._stop_job(job, reason)
            return
        report = self.reports.get(name)
        if report is not None and report.result == RESULT_ROLLED_BACK:
            return
        job.done = True  # a pending health-window commit must not fire
        self._state(job, "rolling_back", reason)
        prev = self.previous.get(name)
        if prev is None:
            self.models.pop(name, None)
        else:
            self.models[name] = prev
        self.report(
            name, UpdateReport(release_id, name, job.release.version, "rolled_back", RESULT_ROLLED_BACK, reason)
        )

    def _finish(self, job: _Job, state: str, reason: str | None) -> None:
        if job.done:
            return
        job.done = True
        result = {"committed": RESULT_SUCCESS, "failed": RESULT_FAILED}[state]
        if self.jobs.get(job.release.name) is job or state == "committed":
            rel = job.release
            self.report(rel.name, UpdateReport(rel.release_id, rel.name, rel.version, state, result, reason))

    def _state(self, job: _Job, state: str, reason: str | None = None) -> None:
        rel = job.release
        if self.jobs.get(rel.name) is job and not (job.done and state != "rolling_back"):
            self.report(rel.name, UpdateReport(rel.release_id, rel.name, rel.version, state, None, reason))

    # -- outgoing ------------------------------------------------------------------------
    def report(self, name: str, report: UpdateReport) -> None:
        self.reports[name] = report
        self.publish_state()

    def device_state(self) -> DeviceState:
        return DeviceState(
            self.device_id,
            self.sim.fleet,
            models=dict(self.models),
            updates=dict(self.reports),
            agent_version=AGENT_VERSION,
            last_seen=time.time(),
        )

    def publish_state(self) -> None:
        if self.alive:
            self.client.publish(
                device_state_topic(self.sim.fleet, self.device_id),
                encode(self.device_state().to_dict()),
                qos=1,
                retain=True,
            )


# -- the fleet -----------------------------------------------------------------------------------
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

    def _device_ready(self) -> None:
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
            self.loop.run_sync(lambda: [d.shutdown() for d in self.devices.values()], timeout_s=timeout_s)
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
                sock.close()  # type: ignore[union-attr]
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

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


__all__ = ["EventLoop", "SimDevice", "SimFleet"]
