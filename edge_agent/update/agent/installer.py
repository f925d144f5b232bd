"""``AgentInstaller`` (``kind = "agent"``): the update machine's steps for the agent itself, on A/B slots.

The release's artifact holds ``edge-agent.tar.gz`` (the tar of the one-folder build, top folder
``edge-agent/``) and ``VERSION``; ``cloud-batch agent register`` writes both. The machine
downloads and verifies the artifact as for any kind; then

* ``check``: the artifact's ``VERSION`` is the release's version;
* ``validate``: ``AgentSlots.stage`` unpacks it into the inactive slot (SHA256SUMS, VERSION) and
  runs the new build's ``__selftest__``;
* ``activate``: ``AgentSlots.switch`` (pending persisted, then ``current`` switched) and the agent
  is asked to restart (exit 75): systemd starts the new slot;
* ``watch`` (health check, resumed by the new process after the restart): waits until the slot
  state says ``committed`` (the new agent confirmed: ``agentwatch.SlotWatch``) → OK, or
  ``rolled-back`` (it crashed, or did not confirm in its window or starts) → HEALTH_BREACH with
  the reason; ``restore`` makes sure ``current`` is the good slot again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edge_agent.errors import Interrupted, ManifestError
from edge_agent.update.admission import AGENT_RELEASE_NAME as AGENT_NAME
from edge_agent.update.agent.slots import AgentSlots, folder_version
from edge_agent.update.seams import Control, Wait, event_wait
from edge_agent.update.states import Event, UpdateRecord
from edge_agent.wire.protocol import Release

ARCHIVE = "edge-agent.tar.gz"


class AgentInstaller:
    """The agent's own slots as an update kind."""

    kind = "agent"

    def __init__(
        self,
        slots: AgentSlots,
        restart: Callable[[str], None],
        *,
        selftest_timeout_s: float,
        wait: Wait = event_wait,
        poll_s: float = 0.5,
    ) -> None:
        self.slots, self.restart, self.selftest_timeout_s, self.wait, self.poll_s = (
            slots, restart, selftest_timeout_s, wait, poll_s)  # fmt: skip

    def current(self, name: str) -> str | None:
        return str(self.slots.status()["agent_version"]) or None

    def check(self, record: UpdateRecord, release: Release, staging: Path) -> None:
        if record.name != AGENT_NAME or not (staging / ARCHIVE).is_file():
            raise ManifestError(f"an agent release must be named {AGENT_NAME!r} and hold {ARCHIVE}")
        if folder_version(staging) != record.version:
            raise ManifestError(
                f"the artifact holds agent {folder_version(staging)}, the release says {record.version}"
            )

    def validate(self, record: UpdateRecord, release: Release, staging: Path, control: Control) -> Event | None:
        slot = self.slots.stage(staging / ARCHIVE, record.version, rollback=release.rollback,
                                selftest_timeout_s=self.selftest_timeout_s)  # fmt: skip
        record.details["slot"] = slot
        return None

    def activate(self, record: UpdateRecord, release: Release, staging: Path, control: Control) -> None:
        if self.slots.link("current") != record.details.get("slot"):  # not switched yet (a resume may find it done)
            self.slots.switch(str(record.details["slot"]), record.version)
        self.restart(f"agent {record.version} switched in, slot {record.details['slot']}")

    def watch(self, record: UpdateRecord, release: Release, control: Control) -> tuple[Event, str | None]:
        while True:
            last = self.slots.state()["last"] or {}
            if last.get("version") == record.version and last.get("result") == "committed":
                return Event.OK, None
            if last.get("version") == record.version and last.get("result") in ("rolled-back", "failed"):
                return Event.HEALTH_BREACH, f"agent {record.version} {last['result']}: {last.get('reason')}"
            if self.wait(control.interrupt, self.poll_s):
                raise Interrupted()

    def restore(self, record: UpdateRecord, control: Control, interruptible: bool) -> str | None:
        self.slots.revert("rolled back by the update")
        return self.current(record.name)

    def commit(self, record: UpdateRecord) -> None:
        return None

    def forget(self, staging: Path) -> None:
        return None
