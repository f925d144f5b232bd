"""Simulated devices that speak the OTA protocol like ``edge_agent.update.coordinator.OtaAgent``, a thousand to a process.

Each ``SimDevice`` has its own MQTT connection (client id = device id), so presence works
exactly as on a real device: a retained ``online`` on connect and a retained ``offline`` last
will that the broker publishes when the connection dies uncleanly (``SimFleet.kill``). Like
the agent it subscribes to the fleet's ``rollouts/+`` then ``releases/+`` and admits each
release with the agent's own ``update.admission`` (signature, topic, fleet, kind, anti-rollback,
size; a failure is ``rejected``), waits ``settle_s`` for the rollout document, applies the
rollout gate (``update.gate.why_not``: signed rollouts only, fails closed), downloads the artifact with the real
``Downloader`` + ``ChunkStore`` (per-chunk subscriptions, sha256 checks, fsynced chunk files,
assembly), unpacks it and checks its manifest, then reports the agent's ``update.State`` names
``downloading → verifying → validating → activating → health_check → committed`` in its
retained DeviceState (``waiting_window`` first when the release has a maintenance window that
is not open and is not urgent), with the agent's results. Devices in ``fail_ids`` fail
validation (``failed``). A rollout ``aborted`` stops an update before activation (``failed``)
and rolls back an activated one (``rolled_back``, result ``rolled-back``). Not simulated:
TFLite validation and serving (the candidate is never loaded), persistence across restarts.

Downloads run on the fleet's worker pool (``sim.candidate``); everything else on its loop thread.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from cloud_batch.sim.candidate import LoopLink, check_candidate, download
from cloud_batch.sim.host import FleetHost, Handler
from edge_agent.config import OtaConfig
from edge_agent.errors import EdgeError, RejectedError, ReleaseRejected, StaleRejected, TransferStopped
from edge_agent.update.admission import Admission, ledger_key
from edge_agent.update.coordinator import will_for
from edge_agent.update.gate import why_not
from edge_agent.update.states import RESULTS, State
from edge_agent.wire.freshness import SeqLedger
from edge_agent.wire.names import check_segment
from edge_agent.wire.policy import in_window
from edge_agent.wire.protocol import DeviceState, Release, Rollout, UpdateReport, encode
from edge_agent.wire.topics import device_state_topic, parse_model_topic, presence, release_filter, rollout_filter

log = logging.getLogger("cloud_batch.sim")

AGENT_VERSION = "sim-1"
SETTLE_S = OtaConfig.rollout_settle_s  # how long an agent waits for a release's rollout document
WINDOW_POLL_S = 1.0  # outside the release's maintenance window: check again this often


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

    def __init__(self, sim: FleetHost, device_id: str, fail: bool) -> None:
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
        self.subs: dict[str, tuple[Handler, int]] = {}
        self.connects = 0
        self.connected = False
        self.alive = True
        self.killed = False
        self.ready = False
        self.link = LoopLink(self)
        self.admission = Admission(sim.fleet, self.device_id, tuple(sim.trusted), OtaConfig.max_artifact_bytes)
        self.ledger = SeqLedger(None)  # highest accepted seq per (kind, name); not persisted (no restarts here)
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
        client.publish(*presence(fleet, self.device_id, online=True), qos=1, retain=True)
        self.publish_state()
        subs = [(rollout_filter(fleet), 1), (release_filter(fleet), 1)]  # rollouts first, like OtaAgent
        subs += [(t, q) for t, (_, q) in self.subs.items()]
        _, self._sub_mid = client.subscribe(subs)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if mid == self._sub_mid and not self.ready:
            self.ready = True
            self.sim.device_ready()

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
                sock.close()
            except OSError:
                pass

    def shutdown(self) -> None:
        """A clean stop, like OtaAgent.stop: retained ``offline``, then DISCONNECT."""
        for job in self.jobs.values():
            self._stop_job(job, "device shutting down")
        if self.alive and self.connected:
            self.client.publish(*presence(self.sim.fleet, self.device_id, online=False), qos=1, retain=True)
        if not self.killed and self.client.socket() is not None:
            self.client.disconnect()  # written after the presence message; paho then closes the socket
        self.alive = False

    # -- subscriptions for the Downloader ---------------------------------------------------
    def add_subscription(self, topic: str, handler: Handler, qos: int) -> None:
        self.subs[topic] = (handler, qos)
        if self.connected:
            self.client.subscribe(topic, qos)

    def remove_subscription(self, topic: str) -> None:
        if self.subs.pop(topic, None) is not None and self.connected:
            self.client.unsubscribe(topic)

    # -- incoming ----------------------------------------------------------------------------
    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        topic, payload = msg.topic, bytes(msg.payload)
        sub = self.subs.get(topic) or next((h for f, h in self.subs.items() if mqtt.topic_matches_sub(f, topic)), None)
        if sub is not None:  # an artifact chunk the Downloader asked for (one topic, or all of the artifact's)
            sub[0](topic, payload, bool(msg.retain))
            return
        parsed = parse_model_topic(topic)
        if parsed is None or parsed[0] != self.sim.fleet:
            return
        if parsed[1] == "rollouts":
            self._on_rollout(parsed[2], payload)
        else:
            self._on_release(parsed[2], payload)

    def _on_rollout(self, name: str, payload: bytes) -> None:
        if not payload or len(payload) > OtaConfig.max_document_bytes:
            return  # a deletion is unsigned; the last authentic rollout stands
        try:
            ro = self.admission.authenticate_rollout(payload, name)
            self.ledger.check(ledger_key("rollout", name), f"rollout of {name}", ro.seq, ro.release_id)
        except RejectedError as exc:
            log.warning("%s: ignoring a rollout for %s: %s", self.device_id, name, exc)
            return
        self.ledger.accept(ledger_key("rollout", name), ro.seq, ro.release_id)
        self.rollouts[name] = ro
        if ro.status == "aborted":
            self._abort(name, ro.release_id)
        else:
            self._consider(name)

    def _on_release(self, name: str, payload: bytes) -> None:
        if not payload or len(payload) > OtaConfig.max_document_bytes:
            return
        digest = "doc:" + hashlib.sha256(payload).hexdigest()
        if digest in self.handled:
            return
        try:
            rel, doc = self.admission.authenticate(payload)
        except ReleaseRejected:
            self.handled.add(digest)  # not authentic: nothing of it is reported (like the agent)
            return
        if rel.release_id in self.handled or (
            name in self.releases and self.releases[name].release_id == rel.release_id
        ):
            return
        try:  # the agent's own admission, against this device's active version
            self.admission.check_model_topic(rel, name)
            self.admission.admit(rel, doc, self.models.get(name), self.ledger.highest, time.time())
        except StaleRejected:
            self.handled.add(rel.release_id)  # a replay: ignored, not reported
            return
        except RejectedError as exc:
            self._reject(name, rel.release_id, rel.version, str(exc), rel.release_id)
            return
        self.ledger.accept(ledger_key(rel.kind, name), rel.seq, rel.release_id)
        self.releases[name] = rel
        self.settle_until[name] = time.monotonic() + self.sim.settle_s
        self.loop.call_later(self.sim.settle_s, self._consider, name)

    def _reject(self, name: str, release_id: str, version: str, reason: str, key: str) -> None:
        self.handled.add(key)
        rejected = State.REJECTED
        self.report(name, UpdateReport(release_id, name, version, rejected.value, RESULTS[rejected], reason))

    # -- the rollout gate and the update -----------------------------------------------------
    def _consider(self, name: str) -> None:
        rel = self.releases.get(name)
        if rel is None or rel.release_id in self.handled or not self.alive:
            return
        if time.monotonic() < self.settle_until.get(name, 0.0) - 1e-3:
            return  # its settle timer calls again
        if why_not(self.device_id, rel, self.rollouts.get(name)) is not None:
            return  # held until a signed rollout lets this device in
        self.handled.add(rel.release_id)
        old = self.jobs.get(name)
        if old is not None and not old.done:
            if old.activated:
                return  # an activated update finishes first (OtaAgent supersedes only before activation)
            self._stop_job(old, f"superseded by release {rel.release_id}")
        job = self.jobs[name] = _Job(rel)
        self._state(job, State.DOWNLOADING)
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
            sim = self.sim
            blob = download(
                self.link, self.dir / "downloads", rel, job.stop, sim.stall_timeout_s, sim.download_timeout_s
            )
            post(self._state, job, State.VERIFYING)
            check_candidate(blob, rel)
            post(self._state, job, State.VALIDATING)
            if self.fail:
                raise RejectedError("validation failed: golden samples differ (simulated failure)")
            post(self._activate, job)
        except TransferStopped:
            post(self._finish, job, State.FAILED, job.stop_reason or "stopped")
        except (EdgeError, OSError, ValueError) as exc:
            post(self._finish, job, State.FAILED, str(exc))
        except Exception as exc:
            log.exception("%s: update %s crashed", self.device_id, rel.release_id)
            post(self._finish, job, State.FAILED, f"simulator error: {exc!r}")

    def _activate(self, job: _Job) -> None:
        if job.stop.is_set() or not self.alive:
            self._finish(job, State.FAILED, job.stop_reason or "stopped")
            return
        policy = job.release.policy
        if not policy.urgent and not in_window(policy.window):
            report = self.reports.get(job.release.name)
            if report is None or report.state != State.WAITING_WINDOW.value:
                self._state(job, State.WAITING_WINDOW)
            self.loop.call_later(WINDOW_POLL_S, self._activate, job)
            return
        name = job.release.name
        job.activated = True
        self._state(job, State.ACTIVATING)
        self.previous[name] = self.models.get(name)
        self.models[name] = job.release.version
        self._state(job, State.HEALTH_CHECK)
        self.loop.call_later(job.release.policy.health_window_s, self._commit, job)

    def _commit(self, job: _Job) -> None:
        if not job.done and self.alive:
            self._finish(job, State.COMMITTED, None)

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
        if report is not None and report.result == RESULTS[State.ROLLED_BACK]:
            return
        job.done = True  # a pending health-window commit must not fire
        self._state(job, State.ROLLING_BACK, reason)
        prev = self.previous.get(name)
        if prev is None:
            self.models.pop(name, None)
        else:
            self.models[name] = prev
        done = State.ROLLED_BACK
        self.report(name, UpdateReport(release_id, name, job.release.version, done.value, RESULTS[done], reason))

    def _finish(self, job: _Job, state: State, reason: str | None) -> None:
        if job.done:
            return
        job.done = True
        if self.jobs.get(job.release.name) is job or state is State.COMMITTED:
            rel = job.release
            report = UpdateReport(rel.release_id, rel.name, rel.version, state.value, RESULTS[state], reason)
            self.report(rel.name, report)

    def _state(self, job: _Job, state: State, reason: str | None = None) -> None:
        rel = job.release
        if self.jobs.get(rel.name) is job and not (job.done and state is not State.ROLLING_BACK):
            self.report(rel.name, UpdateReport(rel.release_id, rel.name, rel.version, state.value, None, reason))

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


__all__ = ["SETTLE_S", "SimDevice"]
