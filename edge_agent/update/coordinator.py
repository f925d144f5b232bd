"""The device side of over-the-air model updates: MQTT in, the update state machine, device state out.

``OtaAgent`` listens on the fleet's release and rollout topics (``protocol.py``). For every
release document it checks, in this order, that the document parses, that its signature
verifies against the trusted keys, that it names this fleet, the model on whose topic it
came, the ``model`` kind, a version newer than the active one (unless it is a signed
``rollback``) and an artifact within ``max_artifact_bytes``. A failed check is a rejection:
final for that release (remembered across reconnects and restarts), reported in the device
state with result ``rejected``, nothing downloaded or installed. An accepted release waits
``rollout_settle_s`` for its rollout document, must pass the rollout gate (status ``active``
or ``complete`` and this device in the cohort), and then runs through ``update.UpdateMachine``
on the model's own worker thread: one update per model at a time, and a newer release
supersedes one that has not started activating. A rollout ``aborted`` stops the release
wherever it is on this device and rolls it back if it was activated, even after commit.

Feature bundles (``kind = "features"``) come through the same pipeline. With a feature cache,
the agent also subscribes to ``protocol.features_filters`` (everyone, this device, each of its
groups). A feature release passes the same checks (signature, fleet, size, malformed) and in
addition: it must be of kind ``features`` for the set named by its topic, its signed
``partition`` must be the topic's partition and must include this device (all, this device id,
one of its groups), and its version must be newer than the cached version of the set (and than
one already being applied). It is not gated by rollouts; it runs through the same update state
machine on its set's own lane (``update.FeatureInstaller``: verify the bundle, dry-check it
against the cache, apply it in one transaction; a delta whose base is not the cached version
falls back to the release's snapshot).

The device state (``DeviceState``: active model versions, cached feature set versions, the last
update of each model and of each feature set) is published retained after every state change
and on every (re)connect, beside a retained ``online`` presence whose ``offline`` counterpart is
the link's last will (``will_for``).

Wiring::

    link = MqttLink(url, device_id, will=will_for(fleet, device_id))
    ota = OtaAgent(link, store, server, data_dir, device_id, fleet, trusted_keys, options=OtaOptions(...),
                   features=FeatureCache(data_dir / "features.db"), groups=["line-3"])
    link.start(); ota.start()   # resumes a persisted update first
    ...
    ota.stop(); link.stop()
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent import __version__
from edge_agent.errors import EdgeError, ManifestError, RejectedError
from edge_agent.features.cache import FeatureCache, VersionNotNewer
from edge_agent.fsutil import atomic_write_json
from edge_agent.inference.runtime import RuntimeOptions
from edge_agent.mqtt.download import ChunkStore, Downloader
from edge_agent.mqtt.link import MqttLink, Will
from edge_agent.update.machine import (
    FEATURES_PREFIX,
    Control,
    HealthSource,
    Seams,
    State,
    UpdateMachine,
    UpdateRecord,
    Validator,
    Wait,
    event_wait,
    record_key,
    recover_before_serving,
)
from edge_agent.update.validate import validate_candidate
from edge_agent.wire.manifest import check_name, version_key
from edge_agent.wire.protocol import (
    PRESENCE_OFFLINE,
    PRESENCE_ONLINE,
    RESULT_REJECTED,
    ROOT,
    Artifact,
    DeviceState,
    Release,
    Rollout,
    UpdateReport,
    check_segment,
    decode,
    device_state_topic,
    encode,
    features_filters,
    in_cohort,
    presence_topic,
)
from edge_agent.wire.signing import verify

log = logging.getLogger(__name__)

REJECTED_FILE = ".rejected.json"  # in <data-dir>/updates/; the dot keeps it apart from <model>.json records
MAX_REMEMBERED = 500


@dataclass
class OtaOptions:
    """Limits and pacing of updates on this device (``[ota]`` in the agent config)."""

    max_artifact_bytes: int = 256 * 1024 * 1024
    bandwidth_bps: float | None = None  # download limit in bytes/s; None = unlimited
    chunk_window: int = 8  # chunk subscriptions outstanding at once
    stall_timeout_s: float = 30.0  # re-request the window after this long without a chunk
    download_timeout_s: float | None = None  # None: wait for the artifact as long as the release stands
    download_attempts: int = 5  # transient download failures before the update fails
    validate_timeout_s: float = 120.0
    runtime_options: RuntimeOptions | None = None  # for validation; default: the server's
    max_loops: int = 30  # loop breaker: state saves + loads per update
    poll_s: float = 0.5  # maintenance window and health window polling
    serve_timeout_s: float = 120.0  # activation: the new version must serve within this
    health_min_calls: int = 5  # fewer calls in the health window cannot breach it
    rollout_settle_s: float = 1.0  # wait this long for a release's rollout document before applying it
    retry_backoff_s: float = 2.0
    agent_version: str = __version__


def will_for(fleet: str, device_id: str) -> Will:
    """The last will an agent's MqttLink must carry: retained ``offline`` on the presence topic."""
    return Will(presence_topic(fleet, device_id), PRESENCE_OFFLINE, retain=True, qos=1)


class ReleaseRejected(RejectedError):
    """A release document that is malformed or not authentic; carries whatever ids were readable."""

    def __init__(self, reason: str, release_id: str = "?", version: str = "?") -> None:
        super().__init__(reason)
        self.release_id, self.version = release_id, version


def authenticate_release(payload: bytes, trusted: Iterable[Any]) -> tuple[Release, dict[str, Any]]:
    """Parse a release document and check its signature; ReleaseRejected says why not.

    Devices (and the fleet simulator) call this first: nothing in a document is trusted before it.
    """
    doc: dict[str, Any] = {}
    try:
        doc = decode(payload, "release")
        release = Release.from_dict(doc)
    except ManifestError as exc:
        raise ReleaseRejected(
            f"malformed release: {exc}", str(doc.get("release_id") or "?"), str(doc.get("version") or "?")
        ) from exc
    try:
        verify(doc, trusted)
    except RejectedError as exc:
        raise ReleaseRejected(str(exc), release.release_id, release.version) from exc
    return release, doc


class MqttFetcher:
    """``update.ArtifactFetcher`` over the broker: ``transfer.Downloader`` with chunks under ``root``."""

    def __init__(self, link: MqttLink, root: Path, options: OtaOptions) -> None:
        self.link = link
        self.root = Path(root)
        self.options = options

    def fetch(self, artifact: Artifact, out_path: Path, stop: threading.Event) -> Path:
        store = ChunkStore(self.root, artifact)
        dl = Downloader(
            self.link,
            store,
            window=self.options.chunk_window,
            bandwidth_bps=self.options.bandwidth_bps,
            stall_timeout_s=self.options.stall_timeout_s,
            out_path=out_path,
        )
        return dl.run(stop=stop, timeout_s=self.options.download_timeout_s)

    def discard(self, artifact: Artifact) -> None:
        ChunkStore(self.root, artifact).discard()


class _Lane:
    """One artifact's worker thread (a model, or a feature set): its updates one at a time, newest release winning."""

    def __init__(self, agent: OtaAgent, name: str) -> None:
        self.agent = agent
        self.name = name  # the record key: a model name or "features:<set>"
        self.cond = threading.Condition()
        # ("resume", count_load) | ("release", (Release, doc)) | ("rollback", (release_id, reason))
        self.queue: list[tuple[str, Any]] = []
        self.current: Release | None = None
        self.control: Control | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name=f"ota-{name}", daemon=True)
        self.thread.start()

    def busy(self) -> bool:
        with self.cond:
            return bool(self.queue) or self.control is not None

    def pending_version(self) -> str | None:
        """The highest version queued or running here (None: idle)."""
        with self.cond:
            versions = [item[0].version for kind, item in self.queue if kind == "release"]
            if self.current is not None:
                versions.append(self.current.version)
        return max(versions, key=version_key, default=None)

    def knows(self, release_id: str) -> bool:
        with self.cond:
            return (self.current is not None and self.current.release_id == release_id) or any(
                kind == "release" and item[0].release_id == release_id for kind, item in self.queue
            )

    def put(self, kind: str, item: Any) -> None:
        with self.cond:
            self.queue.append((kind, item))
            self.cond.notify()

    def offer(self, release: Release, doc: Mapping[str, Any]) -> None:
        """Queue ``release``; it replaces a queued one and supersedes a running one not yet activating."""
        with self.cond:
            if self.knows(release.release_id):
                return
            self.queue = [(k, i) for k, i in self.queue if k != "release"]
            self.queue.append(("release", (release, doc)))
            if self.control is not None and self.current is not None:
                same = self.current.artifact.sha256 == release.artifact.sha256
                if self.control.abort(
                    f"superseded by release {release.release_id}", before_activation_only=True, keep_download=same
                ):
                    log.info("update %s (%s): superseded by %s", self.current.release_id, self.name, release.release_id)
            self.cond.notify()

    def abort(self, release_id: str, reason: str) -> bool:
        """Stop ``release_id`` if queued or running here; True when it was."""
        with self.cond:
            before = len(self.queue)
            self.queue = [(k, i) for k, i in self.queue if not (k == "release" and i[0].release_id == release_id)]
            hit = len(self.queue) != before
            if self.current is not None and self.current.release_id == release_id and self.control is not None:
                hit = self.control.abort(reason) or hit  # False once past rolling back / final: see the record
            return hit

    def _saved_release(self) -> Release | None:
        """The release of the saved, unfinished update (so a newer release can supersede a resumed one)."""
        try:
            record = self.agent.machine.records.load(self.name)
            return None if record is None or record.final else record.release_obj
        except EdgeError:
            return None

    def shutdown(self) -> None:
        with self.cond:
            self.stopping = True
            if self.control is not None:
                self.control.shutdown()
            self.cond.notify_all()

    def _loop(self) -> None:
        machine = self.agent.machine
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                kind, item = self.queue.pop(0)
                control = self.control = Control()
                self.current = item[0] if kind == "release" else self._saved_release()
            try:
                if kind == "resume":
                    machine.resume(self.name, control, count_load=bool(item))
                elif kind == "release":
                    release, doc = item
                    gate = self.agent.gate(release)
                    if gate is not None:
                        self.agent.hold(release, doc, gate)
                    else:
                        machine.run(machine.create(release, doc), control)
                elif kind == "rollback":
                    release_id, reason = item
                    record = machine.records.load(self.name)
                    if (
                        record is not None
                        and record.release_id == release_id
                        and record.state == State.COMMITTED
                        and record.kind == "model"
                        and self.agent.store.active(self.name) == record.version
                    ):
                        machine.rollback_committed(record, reason, control)
            except Exception:
                log.exception("update lane %s: unexpected error; resuming the saved update shortly", self.name)
                if not self.agent.stopped.wait(5.0):
                    self.put("resume", True)
            finally:
                with self.cond:
                    self.control = None
                    self.current = None


class OtaAgent:
    """Receives releases and rollouts over MQTT and applies them through the update state machine."""

    def __init__(
        self,
        link: MqttLink,
        store: Any,
        server: Any,
        data_dir: str | Path,
        device_id: str,
        fleet: str,
        trusted_keys: Iterable[Any],
        *,
        options: OtaOptions | None = None,
        fetcher: Any = None,
        validator: Validator | None = None,
        health: HealthSource | None = None,
        now: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        wait: Wait = event_wait,
        features: FeatureCache | None = None,
        groups: Iterable[str] = (),
    ) -> None:
        """``store``: ModelStore; ``server``: ModelServer; ``trusted_keys``: Ed25519 public keys.

        ``features``: the feature cache feature releases are applied to (None: the agent takes
        no feature releases); ``groups``: the feature partitions (``mqtt.groups``) this device is in.
        ``fetcher``, ``validator``, ``health``, ``now``, ``monotonic`` and ``wait`` replace the
        real artifact download, child-process validation, health counters and clocks (tests).
        """
        self.link = link
        self.store = store
        self.server = server
        self.data_dir = Path(data_dir)
        self.device_id = check_segment(device_id, "device id")
        self.fleet = check_segment(fleet, "fleet")
        self.trusted = list(trusted_keys)
        self.features = features
        self.groups = tuple(check_segment(g, "group") for g in groups)
        self.options = opts = options or OtaOptions()
        self.now = now
        if validator is None:
            runtime = opts.runtime_options or getattr(server, "options", None)

            def validator(path: Path, max_latency_ms: float | None, stop: threading.Event) -> Mapping[str, Any]:
                return validate_candidate(
                    path,
                    max_latency_ms=max_latency_ms,
                    runtime_options=runtime,
                    timeout_s=opts.validate_timeout_s,
                    stop=stop,
                )

        seams = Seams(
            store=store,
            server=server,
            fetcher=fetcher or MqttFetcher(link, self.data_dir / "downloads", opts),
            validate=validator,
            admit=self.admit,
            health=health,
            now=now,
            monotonic=monotonic,
            wait=wait,
            features=features,
        )
        self.machine = UpdateMachine(
            self.data_dir,
            seams,
            max_loops=opts.max_loops,
            poll_s=opts.poll_s,
            serve_timeout_s=opts.serve_timeout_s,
            health_min_calls=opts.health_min_calls,
            download_attempts=opts.download_attempts,
            retry_backoff_s=opts.retry_backoff_s,
            on_change=self._on_record,
        )
        self._lanes: dict[str, _Lane] = {}
        self._lanes_lock = threading.Lock()
        self._gate_lock = threading.RLock()  # _incoming, _held, _rollouts: the intake thread and lanes' hold()
        self._inbox: queue.SimpleQueue[tuple[str, str, bytes]] = queue.SimpleQueue()
        self._incoming: dict[str, tuple[Release, dict[str, Any], float]] = {}  # settling: name -> (rel, doc, due)
        self._held: dict[str, tuple[Release, dict[str, Any]]] = {}  # gated out by the rollout, for now
        self._rollouts: dict[str, Rollout] = {}
        self._reports: dict[str, UpdateReport] = {}
        self._reports_lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._rejected_path = self.machine.records.dir / REJECTED_FILE
        self._rejected: dict[str, str] = {}  # "id:<release_id>" or "doc:<sha256 of payload>" -> reason
        self._rejected_reports: dict[str, UpdateReport] = {}
        self.stopped = threading.Event()
        self._counted: set[str] = set()  # models whose unfinished update before_serving() already counted
        self._intake: threading.Thread | None = None
        # rollout_topic(fleet, "+") / release_topic(fleet, "+"): those helpers refuse wildcards.
        self._topics = [f"{ROOT}/fleets/{self.fleet}/rollouts/+", f"{ROOT}/fleets/{self.fleet}/releases/+"]
        self._feature_topics = features_filters(self.fleet, self.device_id, self.groups) if features is not None else []

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
        self._load_rejections()
        records = []
        for name in self.machine.records.names():
            try:
                record = self.machine.records.load(name)
            except EdgeError as exc:
                log.error("update record of %s unreadable, ignored: %s", name, exc)
                continue
            if record is not None:
                records.append(record)
                self._remember_report(record.key, record.report())
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
        with self._lanes_lock:
            lanes = list(self._lanes.values())
        for lane in lanes:
            lane.shutdown()
        deadline = time.monotonic() + timeout_s
        for lane in lanes:
            lane.thread.join(max(0.1, deadline - time.monotonic()))
        with self._lanes_lock:
            self._lanes.clear()
        if self._intake is not None:
            self._intake.join(max(0.1, deadline - time.monotonic()))
            self._intake = None
        if self.link.connected:
            try:
                self._publish_state(wait_s=2.0)
                self.link.publish(presence_topic(self.fleet, self.device_id), PRESENCE_OFFLINE, retain=True, wait_s=2.0)
            except EdgeError as exc:
                log.warning("could not announce going offline: %s", exc)

    def device_state(self) -> DeviceState:
        try:
            models = self.store.active_map()
        except EdgeError as exc:
            log.error("cannot read the model store for the device state: %s", exc)
            models = {}
        features: dict[str, str] = {}
        if self.features is not None:
            try:
                features = {s.name: s.version for s in self.features.list_sets()}
            except EdgeError as exc:
                log.error("cannot read the feature cache for the device state: %s", exc)
        with self._reports_lock:
            reports = dict(self._reports)
        updates = {k: r for k, r in reports.items() if not k.startswith(FEATURES_PREFIX)}
        feature_updates = {k[len(FEATURES_PREFIX) :]: r for k, r in reports.items() if k.startswith(FEATURES_PREFIX)}
        return DeviceState(
            self.device_id,
            self.fleet,
            models=models,
            updates=updates,
            agent_version=self.options.agent_version,
            last_seen=self.now(),
            features=features,
            feature_updates=feature_updates,
        )

    # -- admission (also re-run by the machine's idle step) ----------------------------
    def admit(self, release: Release, doc: Mapping[str, Any]) -> None:
        """Raise a RejectedError naming the reason when this device must not apply ``release``."""
        verify(doc, self.trusted)
        if release.fleet != self.fleet:
            raise RejectedError(
                f"wrong fleet: the release is for fleet {release.fleet!r}, this device is in {self.fleet!r}"
            )
        if release.kind == "features":
            self._admit_features(release)
        elif release.kind != "model":
            raise RejectedError(f"kind {release.kind!r} is not applied by this agent")
        else:
            active = self.store.active(release.name)
            if active is not None and not release.rollback and version_key(release.version) <= version_key(active):
                raise RejectedError(
                    f"anti-rollback: version {release.version} is not newer than the active version "
                    f"{active} and the release is not a signed rollback"
                )
        for what, artifact in (("artifact", release.artifact), ("fallback", release.fallback)):
            if artifact is not None and artifact.size > self.options.max_artifact_bytes:
                raise RejectedError(
                    f"too large: the {what} is {artifact.size} bytes, this device accepts at "
                    f"most {self.options.max_artifact_bytes}"
                )

    def _admit_features(self, release: Release) -> None:
        if self.features is None:
            raise RejectedError("this device has no feature cache")
        by, key = release.partition["by"], release.partition["key"]
        if by == "device" and key != self.device_id:
            raise RejectedError(f"wrong partition: the release is for device {key!r}, this is {self.device_id!r}")
        if by == "group" and key not in self.groups:
            raise RejectedError(
                f"wrong partition: the release is for group {key!r}, this device is in {list(self.groups)}"
            )
        cached = self.features.version(release.name)
        if cached is not None and not release.rollback and version_key(release.version) <= version_key(cached):
            raise VersionNotNewer(
                f"anti-rollback: feature set {release.name} version {release.version} is not newer "
                f"than the cached version {cached} and the release is not a signed rollback"
            )

    def gate(self, release: Release) -> str | None:
        """Why the rollout does not let this device apply ``release`` now (None: it may; features always may)."""
        if release.kind != "model":
            return None
        ro = self._rollouts.get(release.name)
        if ro is None or ro.release_id != release.release_id:
            return None
        if ro.status not in ("active", "complete"):
            return f"rollout {ro.status}"
        if not in_cohort(self.device_id, release.name, ro.percent):
            return f"not in the rollout's {ro.percent}% cohort"
        return None

    def hold(self, release: Release, doc: Mapping[str, Any], why: str) -> None:
        """Keep a gated-out release until its rollout lets this device in."""
        log.info("update %s (%s %s): not applied yet: %s", release.release_id, release.name, release.version, why)
        with self._gate_lock:
            self._held[release.name] = (release, dict(doc))

    # -- intake (one thread: MQTT handlers only enqueue) --------------------------------
    def _intake_loop(self) -> None:
        connects = 0
        while not self.stopped.is_set():
            if self.link.connects != connects and self.link.connected:
                connects = self.link.connects
                self._announce()
            with self._gate_lock:
                due = min((d for _, _, d in self._incoming.values()), default=None)
            timeout = 0.2 if due is None else min(0.2, max(0.0, due - time.monotonic()))
            try:
                kind, topic, payload = self._inbox.get(timeout=timeout)
            except queue.Empty:
                kind = ""
            try:
                with self._gate_lock:
                    if kind == "release":
                        self._on_release(topic, payload)
                    elif kind == "features":
                        self._on_features_release(topic, payload)
                    elif kind == "rollout":
                        self._on_rollout(topic, payload)
                    self._dispatch_due()
            except Exception:
                log.exception("OTA intake failed on %s", topic if kind else "a timer")

    def _announce(self) -> None:
        try:
            self.link.publish(presence_topic(self.fleet, self.device_id), PRESENCE_ONLINE, retain=True)
            self._publish_state()
        except EdgeError as exc:
            log.warning("could not announce this device: %s", exc)

    def _on_release(self, topic: str, payload: bytes) -> None:
        name = topic.rsplit("/", 1)[-1]
        if not payload:  # the retained release was cleared
            return
        try:
            check_name(name)
        except ManifestError:
            log.warning("ignoring a release on %s: not a model name", topic)
            return
        digest = "doc:" + hashlib.sha256(payload).hexdigest()
        if digest in self._rejected:
            return
        try:
            release, doc = authenticate_release(payload, self.trusted)
        except ReleaseRejected as exc:
            self._reject(name, exc.release_id, exc.version, str(exc), digest)
            return
        key = "id:" + release.release_id  # authentic from here on: the id can be trusted
        if key in self._rejected or self._known(name, release.release_id):
            return
        if release.name != name:
            self._reject(
                name,
                release.release_id,
                release.version,
                f"release for model {release.name!r} published on the topic of {name!r}",
                key,
            )
            return
        if release.kind != "model":
            self._reject(
                name,
                release.release_id,
                release.version,
                f"a release of kind {release.kind!r} on a model release topic",
                key,
            )
            return
        try:
            self.admit(release, doc)
        except RejectedError as exc:
            self._reject(name, release.release_id, release.version, str(exc), key)
            return
        ro = self._rollouts.get(name)
        # cloud-batch publishes the rollout before the release, so it is usually here already.
        settle = 0.0 if ro is not None and ro.release_id == release.release_id else self.options.rollout_settle_s
        log.info(
            "update %s (%s %s): release accepted; waiting %.1fs for its rollout",
            release.release_id,
            name,
            release.version,
            settle,
        )
        self._incoming[name] = (release, doc, time.monotonic() + settle)

    def _on_features_release(self, topic: str, payload: bytes) -> None:
        """A release on ``fleets/{fleet}/features/{set}/{by}/{key}``: check it, queue it on its set's lane."""
        parts = topic.split("/")
        if len(parts) != 8 or not payload:  # an empty payload: the retained release was cleared
            return
        feature_set, by, part_key = parts[5], parts[6], parts[7]
        try:
            check_name(feature_set)
        except ManifestError:
            log.warning("ignoring a feature release on %s: not a feature set name", topic)
            return
        lane = record_key("features", feature_set)
        digest = "doc:" + hashlib.sha256(payload).hexdigest()
        if digest in self._rejected:
            return
        try:
            release, doc = authenticate_release(payload, self.trusted)
        except ReleaseRejected as exc:
            self._reject(lane, exc.release_id, exc.version, str(exc), digest, name=feature_set)
            return
        key = "id:" + release.release_id  # authentic from here on: the id can be trusted
        if key in self._rejected or self._known(lane, release.release_id):
            return
        reason = None
        if release.kind != "features":
            reason = f"a release of kind {release.kind!r} on a feature topic (need kind 'features')"
        elif release.name != feature_set:
            reason = f"release for feature set {release.name!r} published on the topic of {feature_set!r}"
        elif release.partition != {"by": by, "key": part_key}:
            reason = (
                f"wrong partition: the release is signed for {release.partition['by']}/"
                f"{release.partition['key']} but arrived on {by}/{part_key}"
            )
        else:
            with self._lanes_lock:
                running = self._lanes.get(lane)
            pending = running.pending_version() if running is not None else None
            if pending is not None and version_key(release.version) <= version_key(pending):
                reason = f"anti-rollback: version {release.version} is not newer than version {pending} being applied"
        if reason is None:
            try:
                self.admit(release, doc)
            except RejectedError as exc:
                reason = str(exc)
        if reason is not None:
            self._reject(lane, release.release_id, release.version, reason, key, name=feature_set)
            return
        log.info(
            "update %s (features %s %s, %s/%s): release accepted",
            release.release_id,
            feature_set,
            release.version,
            by,
            part_key,
        )
        self._lane(lane).offer(release, doc)

    def _known(self, name: str, release_id: str) -> bool:
        """Already settling, held, queued, running or recorded on this device."""
        if name in self._incoming and self._incoming[name][0].release_id == release_id:
            return True
        if name in self._held and self._held[name][0].release_id == release_id:
            return True
        with self._lanes_lock:
            lane = self._lanes.get(name)
        if lane is not None and lane.knows(release_id):
            return True
        try:
            record = self.machine.records.load(name)
        except EdgeError:
            return False
        return record is not None and record.release_id == release_id

    def _dispatch_due(self) -> None:
        now = time.monotonic()
        for name, (release, doc, due) in list(self._incoming.items()):
            if due > now:
                continue
            del self._incoming[name]
            self._held.pop(name, None)  # a newer release replaces one the rollout held back
            gate = self.gate(release)
            if gate is not None:
                self.hold(release, doc, gate)
            else:
                self._lane(name).offer(release, doc)

    def _on_rollout(self, topic: str, payload: bytes) -> None:
        name = topic.rsplit("/", 1)[-1]
        try:
            check_name(name)
        except ManifestError:
            log.warning("ignoring a rollout on %s: not a model name", topic)
            return
        if not payload:
            self._rollouts.pop(name, None)
            return
        try:
            ro = Rollout.from_dict(decode(payload, "rollout"))
        except ManifestError as exc:
            log.warning("ignoring malformed rollout for %s: %s", name, exc)
            return
        self._rollouts[name] = ro
        if ro.status == "aborted":
            self._abort(name, ro.release_id)
            return
        held = self._held.get(name)
        if held is not None and held[0].release_id == ro.release_id and self.gate(held[0]) is None:
            del self._held[name]
            log.info("update %s (%s): the rollout now includes this device", ro.release_id, name)
            self._lane(name).offer(*held)

    def _abort(self, name: str, release_id: str) -> None:
        reason = f"rollout {release_id} aborted"
        if name in self._incoming and self._incoming[name][0].release_id == release_id:
            del self._incoming[name]
        if name in self._held and self._held[name][0].release_id == release_id:
            del self._held[name]
        with self._lanes_lock:
            lane = self._lanes.get(name)
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
            log.warning(
                "update %s (%s %s): %s; rolling back to %s",
                release_id,
                name,
                record.version,
                reason,
                record.previous_version,
            )
            self._lane(name).put("rollback", (release_id, reason))

    # -- reports -----------------------------------------------------------------------
    def _lane(self, name: str) -> _Lane:
        with self._lanes_lock:
            lane = self._lanes.get(name)
            if lane is None:
                lane = self._lanes[name] = _Lane(self, name)
            return lane

    def _on_record(self, record: UpdateRecord) -> None:
        self._remember_report(record.key, record.report())
        self._publish_state()

    def _remember_report(self, name: str, report: UpdateReport) -> None:
        """Keep the newest event per record key (model or ``features:<set>``): an update's state or a rejection."""
        with self._reports_lock:
            current = self._reports.get(name)
            if current is None or current.at <= report.at or current.release_id == report.release_id:
                self._reports[name] = report

    def _reject(
        self, lane: str, release_id: str, version: str, reason: str, key: str, *, name: str | None = None
    ) -> None:
        """Remember and report a rejection; ``lane`` is the record key, ``name`` the model or set (default: lane)."""
        name = name or lane
        log.warning("update %s (%s %s): rejected: %s", release_id, lane, version, reason)
        report = UpdateReport(release_id, name, version, State.REJECTED.value, RESULT_REJECTED, reason, self.now())
        self._rejected[key] = reason
        with self._reports_lock:
            self._rejected_reports[lane] = report
        self._remember_report(lane, report)
        self._save_rejections()
        self._publish_state()

    def _publish_state(self, wait_s: float | None = None) -> None:
        with self._publish_lock:
            state = self.device_state()
            self.link.publish(
                device_state_topic(self.fleet, self.device_id), encode(state.to_dict()), retain=True, wait_s=wait_s
            )

    def _load_rejections(self) -> None:
        try:
            raw = json.loads(self._rejected_path.read_text())
            self._rejected = {str(k): str(v) for k, v in (raw.get("rejected") or {}).items()}
            self._rejected_reports = {k: UpdateReport(**v) for k, v in (raw.get("reports") or {}).items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("forgetting unreadable rejection list %s: %s", self._rejected_path, exc)
            return
        for name, report in self._rejected_reports.items():
            self._remember_report(name, report)

    def _save_rejections(self) -> None:
        from dataclasses import asdict

        items = list(self._rejected.items())[-MAX_REMEMBERED:]
        self._rejected = dict(items)
        with self._reports_lock:
            reports = {k: asdict(v) for k, v in self._rejected_reports.items()}
        try:
            atomic_write_json(
                self._rejected_path, {"schema_version": 1, "rejected": self._rejected, "reports": reports}
            )
        except OSError as exc:
            log.warning("cannot save the rejection list: %s", exc)


__all__ = ["MqttFetcher", "OtaAgent", "OtaOptions", "will_for"]
