"""What the device says about its updates: the newest event per artifact, the rejections it remembers, and
the retained device state and presence it publishes (``StatePublisher``).

A rejection is final for that release: it is remembered (by release id once the document is
authentic, else by the payload's sha256) across reconnects and restarts in
``<data-dir>/updates/.rejected.json`` (the dot keeps it apart from the ``<model>.json``
records), so a retained release is not re-checked and re-reported on every connect.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from edge_agent.errors import EdgeError
from edge_agent.features.cache import FeatureCache
from edge_agent.fsutil import atomic_write_json
from edge_agent.mqtt.link import MqttLink
from edge_agent.update.seams import ModelSlots
from edge_agent.update.states import FEATURES_PREFIX, State
from edge_agent.wire.protocol import RESULT_REJECTED, DeviceState, UpdateReport, encode, presence
from edge_agent.wire.topics import device_state_topic

log = logging.getLogger("edge_agent.update.coordinator")

REJECTED_FILE = ".rejected.json"
MAX_REMEMBERED = 500


class Reports:
    """The newest report per record key (model or ``features:<set>``) and the persisted rejection memory."""

    def __init__(self, records_dir: Path, now: Callable[[], float]) -> None:
        self.path = records_dir / REJECTED_FILE
        self.now = now
        self._lock = threading.Lock()
        self._reports: dict[str, UpdateReport] = {}
        self._rejected: dict[str, str] = {}  # "id:<release_id>" or "doc:<sha256 of payload>" -> reason
        self._rejected_reports: dict[str, UpdateReport] = {}

    def remember(self, key: str, report: UpdateReport) -> None:
        """Keep the newest event per record key: an update's state or a rejection."""
        with self._lock:
            current = self._reports.get(key)
            if current is None or current.at <= report.at or current.release_id == report.release_id:
                self._reports[key] = report

    def is_rejected(self, key: str) -> bool:
        return key in self._rejected

    def reject(self, lane: str, release_id: str, version: str, reason: str, key: str, name: str) -> None:
        """Remember and save a rejection; ``lane`` is the record key, ``name`` the model or set."""
        log.warning("update %s (%s %s): rejected: %s", release_id, lane, version, reason)
        report = UpdateReport(release_id, name, version, State.REJECTED.value, RESULT_REJECTED, reason, self.now())
        self._rejected[key] = reason
        with self._lock:
            self._rejected_reports[lane] = report
        self.remember(lane, report)
        self._save()

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
            self._rejected = {str(k): str(v) for k, v in (raw.get("rejected") or {}).items()}
            self._rejected_reports = {k: UpdateReport(**v) for k, v in (raw.get("reports") or {}).items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("forgetting unreadable rejection list %s: %s", self.path, exc)
            return
        for name, report in self._rejected_reports.items():
            self.remember(name, report)

    def _save(self) -> None:
        items = list(self._rejected.items())[-MAX_REMEMBERED:]
        self._rejected = dict(items)
        with self._lock:
            reports = {k: asdict(v) for k, v in self._rejected_reports.items()}
        try:
            atomic_write_json(self.path, {"schema_version": 1, "rejected": self._rejected, "reports": reports})
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
