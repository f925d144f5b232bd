"""What the device says about its updates: the newest event per artifact, the rejections it remembers, and
the retained device state and presence it publishes (``StatePublisher``).

Only what is authentic is reported. A rejection of an authentic release is final for that
release: it is remembered by release id across reconnects and restarts in
``<data-dir>/updates/.rejected.json`` (the dot keeps it apart from the ``<model>.json``
records), so a retained release is not re-checked and re-reported on every connect. A document
that is not authentic (unsigned, forged, malformed, oversized) is only counted and logged
(``drop``): its payload digest is kept in a bounded in-memory set so a retained one is not
re-verified on every connect, and nothing of it reaches the device state or the disk.

Memory is bounded: at most ``MAX_REMEMBERED`` rejections (oldest evicted first) and
``MAX_UNAUTHENTIC`` digests; the file is rewritten at most once per ``save_interval_s``
(``flush``, called by the coordinator's intake loop and on stop).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edge_agent.errors import EdgeError
from edge_agent.features.cache import FeatureCache
from edge_agent.fsutil import atomic_write_json
from edge_agent.mqtt.link import MqttLink
from edge_agent.update.seams import ModelSlots
from edge_agent.update.states import FEATURES_PREFIX, State
from edge_agent.wire.protocol import RESULT_REJECTED, DeviceState, UpdateReport, encode
from edge_agent.wire.topics import device_state_topic, presence

log = logging.getLogger("edge_agent.update.coordinator")

REJECTED_FILE = ".rejected.json"
MAX_REMEMBERED = 200  # authentic rejections kept, by release id
MAX_UNAUTHENTIC = 1000  # digests of dropped junk, in memory only
SAVE_INTERVAL_S = 5.0


class Reports:
    """The newest report per record key (model or ``features:<set>``) and the bounded rejection memory."""

    def __init__(
        self,
        records_dir: Path,
        now: Callable[[], float],
        *,
        monotonic: Callable[[], float] = time.monotonic,
        save_interval_s: float = SAVE_INTERVAL_S,
    ) -> None:
        self.path = records_dir / REJECTED_FILE
        self.now = now
        self.monotonic = monotonic
        self.save_interval_s = save_interval_s
        self._lock = threading.Lock()
        self._reports: dict[str, UpdateReport] = {}
        self._rejected: OrderedDict[str, str] = OrderedDict()  # "id:<release_id>" -> reason, oldest first
        self._rejected_reports: dict[str, UpdateReport] = {}
        self._junk: OrderedDict[str, None] = OrderedDict()  # "doc:<sha256 of payload>"
        self.dropped = 0  # documents dropped as not authentic since start
        self.saves = 0
        self._dirty = False
        self._saved_at = float("-inf")

    def remember(self, key: str, report: UpdateReport) -> None:
        """Keep the newest event per record key: an update's state or a rejection."""
        with self._lock:
            current = self._reports.get(key)
            if current is None or current.at <= report.at or current.release_id == report.release_id:
                self._reports[key] = report

    def is_rejected(self, key: str) -> bool:
        with self._lock:
            return key in self._rejected or key in self._junk

    def drop(self, digest: str, where: str, reason: str) -> None:
        """Count and log a document that is not authentic; remember its digest in memory only."""
        with self._lock:
            self.dropped += 1
            self._junk[digest] = None
            while len(self._junk) > MAX_UNAUTHENTIC:
                self._junk.popitem(last=False)
        log.warning("dropped an unauthenticated document on %s: %s", where, reason[:300])

    def reject(self, lane: str, release_id: str, version: str, reason: str, key: str, name: str) -> None:
        """Remember an authentic release's rejection; ``lane`` is the record key, ``name`` the model or set."""
        log.warning("update %s (%s %s): rejected: %s", release_id, lane, version, reason)
        report = UpdateReport(release_id, name, version, State.REJECTED.value, RESULT_REJECTED, reason, self.now())
        with self._lock:
            self._rejected[key] = reason
            while len(self._rejected) > MAX_REMEMBERED:
                self._rejected.popitem(last=False)
            self._rejected_reports[lane] = report
            self._dirty = True
        self.remember(lane, report)
        self.flush()

    def split(self) -> tuple[dict[str, UpdateReport], dict[str, UpdateReport]]:
        """``(model updates, feature set updates)`` as the device state carries them."""
        with self._lock:
            reports = dict(self._reports)
        models = {k: r for k, r in reports.items() if not k.startswith(FEATURES_PREFIX)}
        sets = {k[len(FEATURES_PREFIX) :]: r for k, r in reports.items() if k.startswith(FEATURES_PREFIX)}
        return models, sets

    def load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
            rejected = [(str(k), str(v)) for k, v in (raw.get("rejected") or {}).items() if str(k).startswith("id:")]
            reports = {k: UpdateReport(**v) for k, v in (raw.get("reports") or {}).items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("forgetting unreadable rejection list %s: %s", self.path, exc)
            return
        with self._lock:
            self._rejected = OrderedDict(rejected[-MAX_REMEMBERED:])
            self._rejected_reports = reports
        for name, report in reports.items():
            self.remember(name, report)

    def flush(self, force: bool = False) -> None:
        """Write the rejection memory if it changed, at most once per ``save_interval_s`` unless ``force``."""
        with self._lock:
            if not self._dirty or (not force and self.monotonic() - self._saved_at < self.save_interval_s):
                return
            body = {
                "schema_version": 1,
                "rejected": dict(self._rejected),
                "reports": {k: asdict(v) for k, v in self._rejected_reports.items()},
            }
            self._dirty = False
            self._saved_at = self.monotonic()
            self.saves += 1
        try:
            atomic_write_json(self.path, body, mode=0o600)
        except OSError as exc:
            log.warning("cannot save the rejection list: %s", exc)


class StatePublisher:
    """Publishes the retained device state (after every change, on every connect) and the presence."""

    def __init__(
        self,
        link: MqttLink,
        fleet: str,
        device_id: str,
        store: ModelSlots,
        features: FeatureCache | None,
        reports: Reports,
        agent_version: str,
    ) -> None:
        self.link, self.fleet, self.device_id = link, fleet, device_id
        self.store, self.features, self.reports = store, features, reports
        self.agent_version = agent_version
        self.agent_slot = ""  # the A/B slot of a frozen agent (set by the app)
        self.drift: Callable[[], dict[str, dict[str, Any]]] = dict  # newest drift per model (set by the app)
        self._lock = threading.Lock()

    def device_state(self) -> DeviceState:
        """What this device runs and how its last updates went."""
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
        updates, feature_updates = self.reports.split()
        return DeviceState(
            self.device_id,
            self.fleet,
            models=models,
            updates=updates,
            agent_version=self.agent_version,
            last_seen=self.reports.now(),
            features=features,
            feature_updates=feature_updates,
            drift=self.drift(),
            agent_slot=self.agent_slot,
        )

    def publish(self, wait_s: float | None = None) -> None:
        with self._lock:
            payload = encode(self.device_state().to_dict())
            self.link.publish(device_state_topic(self.fleet, self.device_id), payload, retain=True, wait_s=wait_s)

    def online(self) -> None:
        """On every (re)connect: retained ``online``, then the state."""
        try:
            self.link.publish(*presence(self.fleet, self.device_id, online=True), retain=True)
            self.publish()
        except EdgeError as exc:
            log.warning("could not announce this device: %s", exc)

    def offline(self) -> None:
        """On a clean stop: the last state, then retained ``offline`` (the last will says it otherwise)."""
        if not self.link.connected:
            return
        try:
            self.publish(wait_s=2.0)
            self.link.publish(*presence(self.fleet, self.device_id, online=False), retain=True, wait_s=2.0)
        except EdgeError as exc:
            log.warning("could not announce going offline: %s", exc)
