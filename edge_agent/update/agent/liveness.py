"""What the agent tells systemd and what a new agent slot must show: the status line and the health rule.

``status_line``: the ``STATUS=`` text (models served, the broker, updates in progress).
``healthy``: a new agent slot is confirmed once its models are served without load errors, the API
listens and the broker is connected (when one is configured). ``attach_self_update``: a frozen
agent in A/B slots takes releases of itself (kind ``agent``) and reports its slot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from edge_agent.config.agentupdate import AgentUpdateConfig
from edge_agent.models.serving import ModelServer
from edge_agent.mqtt.link import MqttLink
from edge_agent.update.agent.installer import AgentInstaller
from edge_agent.update.agent.watch import SlotWatch
from edge_agent.wire.protocol import DeviceState

if TYPE_CHECKING:
    from edge_agent.update.installers import Installer  # the OTA modules load only with a broker (app.py)


class Ota(Protocol):
    """What this module needs of the OTA agent (``update.coordinator.OtaAgent``)."""

    def device_state(self) -> DeviceState: ...

    def attach_agent(self, installer: Installer, version: str, slot: str) -> None: ...


def status_line(server: ModelServer, link: MqttLink | None, ota: Ota | None) -> str:
    """``link`` is None when no broker is configured; ``ota`` None without OTA."""
    parts = [f"serving {len(server.status()['models'])} models"]
    if link is not None:
        parts.append("broker " + ("connected" if link.connected else "disconnected"))
    if ota is not None:
        busy = sorted({r.name for r in ota.device_state().updates.values() if r.result is None})
        parts.append(f"updating {', '.join(busy)}" if busy else "no update in progress")
    return "; ".join(parts)


def healthy(server: ModelServer, listening: bool, link: MqttLink | None) -> bool:
    st = server.status()
    return bool(st["models"]) and not st["errors"] and listening and (link is None or bool(link.connected))


def attach_self_update(ota: Ota, watch: SlotWatch, restart: Callable[[str], None], cfg: AgentUpdateConfig) -> None:
    """Give the OTA machine the ``agent`` installer and the device state the agent's version and slot.

    The installer stages through the watch's slots, which self-test a new build with the device's
    fleet key and runtime options (``watch.open_slot_watch``).
    """
    installer = AgentInstaller(watch.slots, restart, selftest_timeout_s=cfg.selftest_timeout_s)
    ota.attach_agent(installer, watch.slots.status()["agent_version"], watch.slot)
