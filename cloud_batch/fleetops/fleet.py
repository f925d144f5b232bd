"""The fleet as the broker sees it: retained device state and presence, read over MQTT.

Devices publish a retained ``DeviceState`` on ``devices/{id}/state`` and a retained
``online``/``offline`` presence (their last will) on ``devices/{id}/presence``; the broker's
retained store is therefore the fleet database, and reading it needs no server of ours.

``FleetView`` subscribes to those topics (and, for rollouts, to a model's release and rollout
topics) and keeps the newest document of each. ``sync`` returns once the broker has sent
every retained message: after the real subscriptions it subscribes to a private probe topic
and publishes one message there; mosquitto queues retained messages in subscription order
on the same connection, so when the probe comes back the retained ones are in. A short
quiet period follows (for brokers that send retained messages later); a broker whose ACL
drops the probe costs the whole ``timeout_s``.

Functions take an open ``broker.BrokerLink``; the CLI opens it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from cloud_batch.errors import BrokerError, input_errors
from cloud_batch.fleetops.broker import BrokerLink, Handler
from edge_agent.errors import EdgeError, FailedError
from edge_agent.wire.names import check_segment
from edge_agent.wire.protocol import DeviceState, Release, Rollout, UpdateReport, decode
from edge_agent.wire.topics import (
    PRESENCE_OFFLINE,
    PRESENCE_ONLINE,
    parse_device_topic,
    parse_model_topic,
    presence_filter,
    release_topic,
    rollout_topic,
    state_filter,
    sync_probe_topic,
)


# -- the live view ------------------------------------------------------------------------
@dataclass
class Snapshot:
    """What a FleetView knew at one moment (copies; safe to keep)."""

    states: dict[str, DeviceState] = field(default_factory=dict)  # device id -> newest state
    presence: dict[str, str] = field(default_factory=dict)  # device id -> "online" / "offline"
    releases: dict[str, tuple[Release, dict[str, Any]]] = field(default_factory=dict)  # name -> (parsed, raw doc)
    rollout_docs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> rollout document (unverified)
    problems: list[str] = field(default_factory=list)  # unparseable documents, newest last


class FleetView:
    """Newest retained (and live) fleet documents from one MQTT connection. Thread-safe."""

    def __init__(self, link: BrokerLink, fleet: str, *, models: Iterable[str] = (), devices: bool = True) -> None:
        self.link = link
        self.fleet = check_segment(fleet, "fleet")
        self.models = [check_segment(m, "name") for m in models]
        self.devices = devices
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._version = 0
        self._snap = Snapshot()
        self._synced = threading.Event()
        self._on_state = self._keeper(
            lambda s: s.states, _device_of, lambda p: DeviceState.from_dict(decode(p, "device state"))
        )
        self._on_presence = self._keeper(lambda s: s.presence, _device_of, lambda p: p.decode("utf-8", "replace"))
        self._on_release = self._keeper(lambda s: s.releases, _model_of, _release_doc)
        self._on_rollout = self._keeper(lambda s: s.rollout_docs, _model_of, _rollout_doc)

    # -- subscribing ----------------------------------------------------------------------
    def sync(self, timeout_s: float = 5.0, quiet_s: float = 0.1) -> FleetView:
        """Subscribe and wait until the broker has sent every retained message (see the module docstring)."""
        if self.devices:
            self.link.subscribe(state_filter(self.fleet), self._on_state, qos=0)
            self.link.subscribe(presence_filter(self.fleet), self._on_presence, qos=0)
        for name in self.models:
            self.link.subscribe(rollout_topic(self.fleet, name), self._on_rollout, qos=0)
            self.link.subscribe(release_topic(self.fleet, name), self._on_release, qos=0)
        probe = sync_probe_topic(self.link.client_id, uuid.uuid4().hex[:8])
        self.link.subscribe(probe, lambda t, p, r: self._synced.set(), qos=0)
        try:
            self.link.publish(probe, b"sync", qos=1, retain=False)
        except FailedError as exc:
            raise BrokerError(f"broker {self.link.host}:{self.link.port}: {exc}") from exc
        deadline = time.monotonic() + timeout_s
        self._synced.wait(timeout_s)
        self.link.unsubscribe(probe)
        # Quiet period: stop once nothing new arrived for quiet_s (or the deadline passed).
        while time.monotonic() < deadline:
            with self._lock:
                seen = self._version
            time.sleep(quiet_s)
            with self._lock:
                if self._version == seen:
                    break
        return self

    def close(self) -> None:
        if self.devices:
            self.link.unsubscribe(state_filter(self.fleet))
            self.link.unsubscribe(presence_filter(self.fleet))
        for name in self.models:
            self.link.unsubscribe(rollout_topic(self.fleet, name))
            self.link.unsubscribe(release_topic(self.fleet, name))

    # -- reading --------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self._lock:
            s = self._snap
            return Snapshot(dict(s.states), dict(s.presence), dict(s.releases), dict(s.rollout_docs), list(s.problems))

    @property
    def version(self) -> int:
        """Increments on every document received (for ``wait_change``)."""
        with self._lock:
            return self._version

    def wait_change(self, since: int, timeout_s: float) -> int:
        """Block until a document newer than ``since`` arrives (or the timeout); return the current version."""
        with self._changed:
            self._changed.wait_for(lambda: self._version != since, timeout=timeout_s)
            return self._version

    # -- paho network thread ----------------------------------------------------------------
    def _bump(self) -> None:
        self._version += 1
        self._changed.notify_all()

    def _problem(self, text: str) -> None:
        self._snap.problems = [*self._snap.problems, text][-50:]

    def _keeper(
        self, docs: Callable[[Snapshot], dict[str, Any]], key: Callable[[str], str], parse: Callable[[bytes], Any]
    ) -> Handler:
        """A handler keeping the newest parsed document per key (an empty payload deletes it)."""

        def handler(topic: str, payload: bytes, retained: bool) -> None:
            with self._lock:
                if not payload:
                    docs(self._snap).pop(key(topic), None)
                else:
                    try:
                        docs(self._snap)[key(topic)] = parse(payload)
                    except EdgeError as exc:
                        self._problem(f"{topic}: {exc}")
                self._bump()

        return handler


def _device_of(topic: str) -> str:
    parsed = parse_device_topic(topic)
    return parsed[1] if parsed else topic


def _model_of(topic: str) -> str:
    parsed = parse_model_topic(topic)
    return parsed[2] if parsed else topic


def _rollout_doc(payload: bytes) -> dict[str, Any]:
    doc = decode(payload, "rollout")
    Rollout.from_dict(doc)  # well-formed; whether it is authentic is for the reader to check
    return doc


def _release_doc(payload: bytes) -> tuple[Release, dict[str, Any]]:
    doc = decode(payload, "release")
    return Release.from_dict(doc), doc


# -- fleet status ---------------------------------------------------------------------------
@dataclass
class DeviceRow:
    """One device in ``fleet status``."""

    device_id: str
    presence: str  # online | offline | unknown (no presence message retained)
    models: dict[str, str]  # name -> active version
    last_update: UpdateReport | None  # the most recent update attempt of any model
    updates: dict[str, UpdateReport]  # name -> last attempt
    last_seen: float | None  # when the device last published its state (its clock)
    agent_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rows_from(snap: Snapshot) -> list[DeviceRow]:
    """One row per device that has a retained state or presence, sorted by id."""
    rows = []
    for device_id in sorted(set(snap.states) | set(snap.presence)):
        state = snap.states.get(device_id)
        raw = snap.presence.get(device_id)
        presence = (
            "online"
            if raw == PRESENCE_ONLINE.decode()
            else "offline"
            if raw == PRESENCE_OFFLINE.decode()
            else "unknown"
        )
        updates = dict(state.updates) if state else {}
        last = max(updates.values(), key=lambda u: u.at, default=None)
        rows.append(
            DeviceRow(
                device_id,
                presence,
                dict(state.models) if state else {},
                last,
                updates,
                state.last_seen if state else None,
                state.agent_version if state else "",
            )
        )
    return rows


def fleet_status(link: BrokerLink, fleet: str, timeout_s: float = 2.0) -> list[DeviceRow]:
    """Every device of ``fleet`` from the broker's retained state and presence topics."""
    return fleet_report(link, fleet, timeout_s)[0]


def fleet_report(link: BrokerLink, fleet: str, timeout_s: float = 2.0) -> tuple[list[DeviceRow], list[str]]:
    """``fleet_status`` and the problems seen: one line per malformed device state, skipped (not a row's state)."""
    check_fleet(fleet)
    view = FleetView(link, fleet).sync(timeout_s)
    try:
        snap = view.snapshot()
        return rows_from(snap), snap.problems
    finally:
        view.close()


def check_fleet(fleet: str) -> str:
    with input_errors():
        return check_segment(fleet, "fleet")


def rows_json(rows: list[DeviceRow]) -> str:
    return json.dumps([r.to_dict() for r in rows], indent=2, sort_keys=True)


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    s = max(0.0, now - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"


def render_table(rows: list[DeviceRow], fleet: str, console: Any = None) -> None:
    """Print ``rows`` as a rich table (stdout)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    now = time.time()
    table = Table(title=f"fleet {fleet}: {sum(r.presence == 'online' for r in rows)}/{len(rows)} online")
    for col in ("device", "presence", "models", "last update", "result", "reason", "last seen"):
        table.add_column(col)
    for r in rows:
        u = r.last_update
        colour = {"online": "green", "offline": "red"}.get(r.presence, "yellow")
        cells = (  # device-supplied strings: plain text, never rich markup
            " ".join(f"{k}={v}" for k, v in sorted(r.models.items())) or "-",
            f"{u.name} {u.version} ({u.state})" if u else "-",
            (u.result or "in progress") if u else "-",
            (u.reason or "") if u else "",
        )
        table.add_row(escape(r.device_id), f"[{colour}]{r.presence}[/]", *map(escape, cells), _ago(r.last_seen, now))
    (console or Console()).print(table)
