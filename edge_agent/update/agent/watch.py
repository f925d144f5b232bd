"""In the running agent: confirm a new agent slot once healthy, revert it when its window passes, restart when ``current`` moves.

A thread checks every ``interval_s``:

* ``current`` no longer points at the slot this process runs from (an install switched it, or a
  revert switched it back) → ``restart`` (the agent drains and exits ``RESTART_EXIT``; systemd
  starts whatever ``current`` is now);
* this slot is the pending update's and the agent is ``healthy`` (models served, API listening,
  broker connected if configured) → ``AgentSlots.confirm``;
* still unconfirmed ``health_window_s`` after this start → ``AgentSlots.revert``, then restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from edge_agent.update.agent.slots import AgentSlots, device_slots, running_slot

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig

log = logging.getLogger("edge_agent.update.agent")


class SlotWatch:
    """The confirm / window / restart rules for the slot this process runs from."""

    def __init__(
        self,
        slots: AgentSlots,
        slot: str,
        window_s: float,
        healthy: Callable[[], bool],
        restart: Callable[[str], None],
        *,
        interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slots, self.slot, self.window_s = slots, slot, window_s
        self.healthy, self.restart, self.interval_s, self.clock = healthy, restart, interval_s, clock
        self.started = clock()
        self._restarting = False

    def check(self) -> None:
        """One turn of the rules above."""
        if self._restarting:
            return
        current = self.slots.link("current")
        if current is not None and current != self.slot:
            self._restart(f"agent slot switched from {self.slot} to {current}")
            return
        pending = self.slots.state()["pending"]
        if not pending or pending["slot"] != self.slot:
            return
        if self.healthy():
            if self.slots.confirm():
                log.info("agent %s in slot %s confirmed healthy", pending["version"], self.slot)
        elif self.clock() - self.started > self.window_s:
            reason = f"not healthy within the {self.window_s:g} s health window"
            if self.slots.revert(reason):
                log.error("agent %s rolled back: %s", pending["version"], reason)
            self._restart(reason)

    def _restart(self, reason: str) -> None:
        self._restarting = True
        log.warning("restarting: %s", reason)
        self.restart(reason)

    def start(self) -> None:
        threading.Thread(target=self._run, name="agent-slot", daemon=True).start()

    def _run(self) -> None:
        """Until the process ends: a daemon thread, it goes with the agent's exit (0, or 75 to restart)."""
        while True:
            time.sleep(self.interval_s)
            try:
                self.check()
            except Exception:  # a broken state file must not end the checks silently
                log.exception("agent slot check failed")


def open_slot_watch(cfg: AgentConfig, healthy: Callable[[], bool], restart: Callable[[str], None]) -> SlotWatch | None:
    """The watch (not started) for a frozen agent running from a slot under ``agent_update.root``; None otherwise
    (self-update off). Its slots self-test a new build with the device's fleet key and runtime options
    (``device_slots``), whether the build came over OTA or by hand."""
    slot = running_slot()
    if cfg.agent_update.root is None or slot is None:
        return None
    return SlotWatch(device_slots(cfg), slot, cfg.agent_update.health_window_s, healthy, restart)
