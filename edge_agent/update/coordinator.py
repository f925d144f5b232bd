"""The device side of over-the-air updates: MQTT in, admission, the rollout gate, lanes, device state out.

``OtaAgent`` listens on the fleet's release and rollout topics (``wire.protocol``). Every
document passes ``intake`` first (size before parsing, authenticity, freshness; junk and
replays are dropped unreported) and a release then ``admission``: a failed check is a
rejection: final for that release (``reports`` remembers it across reconnects and restarts),
reported with result ``rejected`` under its authentic release id, nothing downloaded.

An accepted model release waits ``rollout_settle_s`` for its signed rollout document and
must pass the rollout gate (status ``active`` or ``complete`` and this device in the cohort;
no signed rollout for it means "wait" unless the release says ``stages = [100]``):
the gate runs once, here, when the release is dispatched or when its rollout changes; a lane
(``lanes``) then runs it through the ``UpdateMachine``, one update per artifact at a time, a
newer release superseding one that has not started activating. A rollout ``aborted`` stops the
release wherever it is and rolls it back if it was activated, even after commit.

Feature bundles (``kind = "features"``) come through the same pipeline on ``topics.features_filters``
(everyone, this device, each of its groups), not gated by rollouts, on their set's own lane.

The device state (active model versions, cached feature set versions, the last update of each)
is published retained after every state change and on every (re)connect, beside a retained
``online`` presence whose ``offline`` counterpart is the link's last will (``will_for``).

Wiring: ``link = MqttLink(url, device_id, will=will_for(fleet, device_id))``, ``ota = OtaAgent(link, store,
server, data_dir, device_id, fleet, trusted_keys, options=OtaConfig(...), features=FeatureCache(...))``, then
``link.start(); ota.start()`` (resumes a persisted update first) and at the end ``ota.stop(); link.stop()``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from edge_agent import __version__
from edge_agent.config import OtaConfig
from edge_agent.errors import EdgeError, ManifestError, RejectedError, StaleRejected
from edge_agent.features.cache import FeatureCache
from edge_agent.inference.runtime import RuntimeOptions
from edge_agent.mqtt.link import MqttLink, Will
from edge_agent.update.admission import Admission
from edge_agent.update.gate import RolloutGate
from edge_agent.update.installers import Installer
from edge_agent.update.intake import Intake
from edge_agent.update.lanes import Lanes
from edge_agent.update.machine import UpdateMachine
from edge_agent.update.reports import Reports, StatePublisher
from edge_agent.update.seams import (
    ArtifactFetcher,
    HealthSource,
    ModelServing,
    ModelSlots,
    MqttFetcher,
    Seams,
    Validator,
    Wait,
    event_wait,
)
from edge_agent.update.shadow.verdict import shadow_seams
from edge_agent.update.states import State, UpdateRecord, record_key, recover_before_serving
from edge_agent.update.validate import cool_down, validate_candidate, warm_up
from edge_agent.wire.names import check_name, check_segment
from edge_agent.wire.protocol import DeviceState, Release
from edge_agent.wire.topics import (
    features_filters,
    parse_features_topic,
    parse_model_topic,
    presence,
    release_filter,
    rollout_filter,
)

log = logging.getLogger(__name__)


def will_for(fleet: str, device_id: str) -> Will:
    """The last will an agent's MqttLink must carry: retained ``offline`` on the presence topic."""
    return Will(*presence(fleet, device_id, online=False), retain=True, qos=1)


class OtaAgent:
    """Receives releases and rollouts over MQTT and applies them through the update state machine."""

    def __init__(
        self,
        link: MqttLink,
        store: ModelSlots,
        server: ModelServing,
        data_dir: str | Path,
        device_id: str,
        fleet: str,
        trusted_keys: Iterable[Any],
        *,
        options: OtaConfig | None = None,
        runtime_options: RuntimeOptions | None = None,
        agent_version: str = __version__,
        fetcher: ArtifactFetcher | None = None,
        validator: Validator | None = None,
        health: HealthSource | None = None,
        now: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        wait: Wait = event_wait,
        features: FeatureCache | None = None,
        groups: Iterable[str] = (),
        metrics: CollectorRegistry | None = None,
    ) -> None:
        """``store``: ModelStore; ``server``: ModelServer; ``trusted_keys``: Ed25519 public keys.

        ``options``: the ``[ota]`` settings; ``runtime_options``: for validating candidates (default: the server's).
        ``features``: the cache feature releases go to (None: no feature releases); ``groups``: the feature
        partitions this device is in. ``fetcher``, ``validator`` (and with it the forkserver's warm/cool hooks),
        ``health``, ``now``, ``monotonic`` and ``wait`` replace the real download, child-process validation, health
        counters and clocks (tests). ``metrics``: the OTA counters' Prometheus registry (default: a private one).
        """
        self.link, self.store, self.server = link, store, server
        self.data_dir = Path(data_dir)
        self.device_id = check_segment(device_id, "device id")
        self.fleet = check_segment(fleet, "fleet")
        self.trusted = list(trusted_keys)
        self.features, self.now = features, now
        self.groups = tuple(check_segment(g, "group") for g in groups)
        self.options = opts = options or OtaConfig()
        self.admission = Admission(
            self.fleet, self.device_id, tuple(self.trusted), opts.max_artifact_bytes, self.groups, features is not None
        )
        seams = Seams(
            store=store,
            server=server,
            fetcher=fetcher or MqttFetcher(link, self.data_dir / "downloads", opts),
            validate=validator or self._child_validator(runtime_options or getattr(server, "options", None)),
            admit=self.admission.bind(self._in_use, lambda key: self.intake.ledger.highest(key), now),
            health=health,
            now=now,
            monotonic=monotonic,
            wait=wait,
            features=features,
            warm=warm_up if validator is None else None,
            cool=cool_down if validator is None else None,
            **shadow_seams(store, server),
        )
        self.machine = UpdateMachine(self.data_dir, seams, opts, on_change=self._on_record)
        self.reports = Reports(self.machine.records.dir, now)
        self.intake = Intake(self.admission, self.reports, self.machine.records.dir, opts, now, metrics)
        self.publisher = StatePublisher(link, self.fleet, self.device_id, store, features, self.reports, agent_version)
        self.stopped = threading.Event()
        self._lane = Lanes(self.machine, store, self.stopped)
        self.gate = RolloutGate(self.device_id, opts.rollout_settle_s)  # intake thread only
        self._inbox: queue.SimpleQueue[tuple[str, str, bytes]] = queue.SimpleQueue()
        self._counted: set[str] = set()  # models whose unfinished update before_serving() already counted
        self._intake: threading.Thread | None = None
        self.on_tick: Callable[[], None] = lambda: None  # called on every turn of the intake loop (the watchdog's beat)
        self._topics = [rollout_filter(self.fleet), release_filter(self.fleet)]
        self._feature_topics = features_filters(self.fleet, self.device_id, self.groups) if features is not None else []

    def attach_agent(self, installer: Installer, version: str, slot: str) -> None:
        """Take releases of kind ``agent`` through ``installer``; the device state reports ``version`` and ``slot``."""
        self.machine.installers["agent"] = installer
        self.publisher.agent_version, self.publisher.agent_slot = version, slot

    def _in_use(self, kind: str, name: str) -> str | None:
        """The version admission compares a release with: its kind's installer says (None: no such kind)."""
        return inst.current(name) if (inst := self.machine.installers.get(kind)) is not None else None

    def _child_validator(self, runtime: RuntimeOptions | None) -> Validator:
        """The real validator: ``validate_candidate`` in a child process with this device's runtime options."""
        timeout_s = self.options.validate_timeout_s

        def validate(path: Path, max_latency_ms: float | None, stop: threading.Event) -> Mapping[str, Any]:
            return validate_candidate(
                path,
                max_latency_ms=max_latency_ms,
                runtime_options=runtime,
                timeout_s=timeout_s,
                stop=stop,
                fleet_key=self.options.fleet_key,  # a sealed candidate is opened in the child's memory only
            )

        return validate

    # -- lifecycle -------------------------------------------------------------------
    def before_serving(self) -> None:
        """Call before the model server's first load (optional, recommended).

        It counts this start against every unfinished update right away, so a candidate that
        crashes the agent in service is rolled back after ``max_loops`` restarts instead of
        being loaded on every start (``update.recover_before_serving``).
        """
        counted = recover_before_serving(self.data_dir, self.store, max_loops=self.options.max_loops, now=self.now)
        self._counted = {r.key for r in counted}

    def start(self) -> None:
        """Resume persisted updates, then subscribe and announce this device."""
        self.stopped.clear()
        self.reports.load()
        records = []
        for name in self.machine.records.names():
            try:
                record = self.machine.records.load(name)
            except EdgeError as exc:
                log.error("update record of %s unreadable, ignored: %s", name, exc)
                continue
            if record is not None:
                records.append(record)
                self.reports.remember(record.key, record.report())
        self.machine.sweep([r for r in records if not r.final])
        for record in records:  # kill -9 safety: every saved update continues where it was
            self._lane(record.key).put("resume", record.key not in self._counted)
        self._counted = set()
        self._intake = threading.Thread(target=self._intake_loop, name="ota-intake", daemon=True)
        self._intake.start()
        # Rollouts first: mosquitto sends retained messages in subscription order, so a release's
        # rollout document is usually known before the release itself.
        self.link.subscribe(self._topics[0], lambda t, p, r: self._inbox.put(("rollout", t, p)))
        self.link.subscribe(self._topics[1], lambda t, p, r: self._inbox.put(("release", t, p)))
        for topic in self._feature_topics:
            self.link.subscribe(topic, lambda t, p, r: self._inbox.put(("features", t, p)))

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking releases; a running update stops at its next step boundary and resumes on the next start."""
        self.stopped.set()
        for topic in self._topics + self._feature_topics:
            self.link.unsubscribe(topic)
        deadline = time.monotonic() + timeout_s
        self._lane.shutdown(deadline)
        if self._intake is not None:
            self._intake.join(max(0.1, deadline - time.monotonic()))
            self._intake = None
        self.reports.flush(force=True)
        self.publisher.offline()
        if isinstance(fetcher := self.machine.seams.fetcher, MqttFetcher):  # its chunk sink stops
            fetcher.close()

    def device_state(self) -> DeviceState:
        """What this device runs and how its last updates went, as published retained."""
        return self.publisher.device_state()

    def _intake_loop(self) -> None:
        connects = 0
        while not self.stopped.is_set():
            self.on_tick()
            if self.link.connects != connects and self.link.connected:
                connects = self.link.connects
                self.publisher.online()
            due = self.gate.next_due()
            timeout = 0.2 if due is None else min(0.2, max(0.0, due - time.monotonic()))
            try:
                kind, topic, payload = self._inbox.get(timeout=timeout)
            except queue.Empty:
                kind = ""
            try:
                if kind == "release":
                    self._on_release(topic, payload)
                elif kind == "features":
                    self._on_features_release(topic, payload)
                elif kind == "rollout":
                    self._on_rollout(topic, payload)
                for release, doc in self.gate.due():
                    self._lane(release.name).offer(release, doc)
                self.reports.flush()
            except Exception:
                log.exception("OTA intake failed on %s", topic if kind else "a timer")

    def _admit(self, lane: str, release: Release, doc: dict[str, Any], key: str) -> bool:
        """``intake.admit``; False (after reporting a rejection, or ignoring a replay) if it may not go on."""
        try:
            self.intake.admit(release, doc, self._in_use(release.kind, release.name), lane)
        except StaleRejected:
            return False
        except RejectedError as exc:
            self._reject(lane, release, str(exc), key, name=release.name)
            return False
        return True

    def _on_release(self, topic: str, payload: bytes) -> None:
        name = _model_of(topic)
        if not payload:  # the retained release was cleared
            return
        try:
            check_name(name)
        except ManifestError:
            log.warning("ignoring a release on %s: not a model name", topic)
            return
        found = self.intake.release(topic, payload, lambda release_id: self._known(name, release_id))
        if found is None:
            return
        release, doc, key = found
        try:
            self.admission.check_model_topic(release, name)
        except RejectedError as exc:
            self._reject(name, release, str(exc), key)
            return
        if not self._admit(name, release, doc, key):
            return
        settle = self.gate.settle(release, doc)
        what = f"{name} {release.version}"
        log.info("update %s (%s): release accepted; waiting %.1fs for its rollout", release.release_id, what, settle)

    def _on_features_release(self, topic: str, payload: bytes) -> None:
        """A release on ``features_topic(fleet, set, by, key)``: check it, queue it on its set's lane."""
        parsed = parse_features_topic(topic)
        if parsed is None or not payload:  # an empty payload: the retained release was cleared
            return
        feature_set, by, part_key = parsed
        try:
            check_name(feature_set)
        except ManifestError:
            log.warning("ignoring a feature release on %s: not a feature set name", topic)
            return
        lane = record_key("features", feature_set)
        found = self.intake.release(topic, payload, lambda release_id: self._known(lane, release_id))
        if found is None:
            return
        release, doc, key = found
        running = self._lane.get(lane)
        try:
            pending = running.pending_version() if running is not None else None
            self.admission.check_features_topic(release, feature_set, by, part_key, pending)
        except RejectedError as exc:
            self._reject(lane, release, str(exc), key, name=feature_set)
            return
        if not self._admit(lane, release, doc, key):
            return
        what = f"features {feature_set} {release.version}, {by}/{part_key}"
        log.info("update %s (%s): release accepted", release.release_id, what)
        self._lane(lane).offer(release, doc)

    def _known(self, name: str, release_id: str) -> bool:
        """Already settling, held, queued, running or recorded on this device."""
        if self.gate.knows(name, release_id):
            return True
        lane = self._lane.get(name)
        if lane is not None and lane.knows(release_id):
            return True
        try:
            record = self.machine.records.load(name)
        except EdgeError:
            return False
        return record is not None and record.release_id == release_id

    def _on_rollout(self, topic: str, payload: bytes) -> None:
        name = _model_of(topic)
        try:
            check_name(name)
        except ManifestError:
            log.warning("ignoring a rollout on %s: not a model name", topic)
            return
        ro = self.intake.rollout(topic, name, payload)
        if ro is None:
            return
        admitted = self.gate.rollout(name, ro)
        if ro.status == "aborted":
            self._abort(name, ro.release_id)
        elif admitted is not None:
            self._lane(name).offer(*admitted)

    def _abort(self, name: str, release_id: str) -> None:
        reason = f"rollout {release_id} aborted"
        self.gate.drop(name, release_id)
        lane = self._lane.get(name)
        if lane is not None and lane.abort(release_id, reason):
            log.warning("update %s (%s): %s; stopping it", release_id, name, reason)
            return
        try:
            record = self.machine.records.load(name)
        except EdgeError:
            return
        if (
            record is not None
            and record.release_id == release_id
            and record.state == State.COMMITTED
            and self.store.active(name) == record.version
        ):
            what = f"{name} {record.version}"
            log.warning("update %s (%s): %s; rolling back to %s", release_id, what, reason, record.previous_version)
            self._lane(name).put("rollback", (release_id, reason))

    # -- reports ---------------------------------------------------------------------
    def _on_record(self, record: UpdateRecord) -> None:
        self.reports.remember(record.key, record.report())
        self.publisher.publish()

    def _reject(self, lane: str, release: Release, reason: str, key: str, *, name: str | None = None) -> None:
        """Remember and report a rejection; ``lane`` is the record key, ``name`` the model or set (default: lane)."""
        self.reports.reject(lane, release.release_id, release.version, reason, key, name or lane)
        self.publisher.publish()


def _model_of(topic: str) -> str:
    """The model a release/rollout topic names ("" if it is not one: refused as not a model name)."""
    parsed = parse_model_topic(topic)
    return parsed[2] if parsed is not None else ""


__all__ = ["OtaAgent", "will_for"]
