"""The rollout gate: admitted model releases wait here for their rollout document, or are held back by it.

It fails closed. Only rollouts the coordinator has authenticated (signed, this fleet and model,
a fresh ``seq``) reach it, and a release needs one for its own id (status ``active`` or
``complete`` and this device in the cohort) unless the signed release itself says
``stages = [100]``. A forged, deleted or mismatched rollout therefore never lets a release in;
a release with staged rollout and no signed rollout waits.

cloud-batch publishes a release's rollout before the release, so it is usually known already;
otherwise the release settles for ``settle_s``. The gate then decides once: a release it lets
through goes to its lane and is not gated again; one it holds back is re-decided only when its
rollout document changes.
Feature releases are not gated. Only the coordinator's intake thread calls this, so it has no
lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from edge_agent.wire.policy import in_cohort
from edge_agent.wire.protocol import Release, Rollout

log = logging.getLogger("edge_agent.update.coordinator")

Pending = tuple[Release, dict[str, Any]]  # a release and its signed document


class RolloutGate:
    """Model releases between admission and their lane, per model name."""

    def __init__(self, device_id: str, settle_s: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.device_id = device_id
        self.settle_s = settle_s
        self.monotonic = monotonic
        self._incoming: dict[str, tuple[Release, dict[str, Any], float]] = {}  # settling: name -> (rel, doc, due)
        self._held: dict[str, Pending] = {}  # gated out by the rollout, for now
        self._rollouts: dict[str, Rollout] = {}

    def settle(self, release: Release, doc: Mapping[str, Any]) -> float:
        """Start ``release``'s wait for its rollout document; return how long it waits."""
        ro = self._rollouts.get(release.name)
        settle = 0.0 if ro is not None and ro.release_id == release.release_id else self.settle_s
        self._incoming[release.name] = (release, dict(doc), self.monotonic() + settle)
        return settle

    def next_due(self) -> float | None:
        """When the next settling release is due (``monotonic`` time), None if none settles."""
        return min((due for _, _, due in self._incoming.values()), default=None)

    def due(self) -> list[Pending]:
        """Releases done settling that the rollout lets in now; the others are held back."""
        now, out = self.monotonic(), []
        for name, (release, doc, due) in list(self._incoming.items()):
            if due > now:
                continue
            del self._incoming[name]
            self._held.pop(name, None)  # a newer release replaces one the rollout held back
            if self._admits(release, doc):
                out.append((release, doc))
        return out

    def rollout(self, name: str, ro: Rollout) -> Pending | None:
        """Take an authenticated rollout document; return the held release it now lets in, if any."""
        self._rollouts[name] = ro
        held = self._held.get(name)
        if ro.status == "aborted" or held is None or held[0].release_id != ro.release_id:
            return None
        if self._why_not(held[0]) is not None:
            return None
        del self._held[name]
        log.info("update %s (%s): the rollout now includes this device", ro.release_id, name)
        return held

    def knows(self, name: str, release_id: str) -> bool:
        """Settling or held here."""
        return any(name in table and table[name][0].release_id == release_id for table in (self._incoming, self._held))

    def drop(self, name: str, release_id: str) -> None:
        """Forget ``release_id`` (its rollout was aborted): it never starts."""
        for table in (self._incoming, self._held):
            if name in table and table[name][0].release_id == release_id:
                del table[name]

    def _admits(self, release: Release, doc: dict[str, Any]) -> bool:
        why = self._why_not(release)
        if why is None:
            return True
        log.info("update %s (%s %s): not applied yet: %s", release.release_id, release.name, release.version, why)
        self._held[release.name] = (release, doc)
        return False

    def _why_not(self, release: Release) -> str | None:
        return why_not(self.device_id, release, self._rollouts.get(release.name))


def why_not(device_id: str, release: Release, ro: Rollout | None) -> str | None:
    """The gate rule: why authenticated rollout ``ro`` does not let ``device_id`` apply ``release`` now (None: it may).

    Shared with ``cloud_batch.sim``. Fails closed: no rollout for this release means wait,
    unless the signed release itself says ``stages = [100]``.
    """
    if ro is None or ro.release_id != release.release_id:
        if release.policy.stages == [100]:
            return None  # the signed release itself says everyone at once
        return "no signed rollout for this release yet"
    if ro.status not in ("active", "complete"):
        return f"rollout {ro.status}"
    if not in_cohort(device_id, release.name, ro.percent):
        return f"not in the rollout's {ro.percent}% cohort"
    return None
