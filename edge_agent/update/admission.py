"""Release admission, pure: may this device apply this release? The one copy, for the agent and the simulator.

A release document is checked in this order, and the first failed check is the rejection
(final for that release, reported with result ``rejected``, nothing downloaded):

0. it is at most ``max_document_bytes`` long (checked by the caller before parsing);
1. it parses and its Ed25519 signature verifies against the trusted keys (``authenticate``);
   a document that fails here is not authentic: nothing in it (not even its release id) is
   reported, the caller only counts and logs it;
2. it fits the topic it came on: the model or feature set named by the topic, the kind the
   topic carries, the partition of a feature topic, and for a feature set a version newer than
   one already queued or being applied there unless a signed rollback
   (``check_model_topic`` / ``check_features_topic``);
3. ``admit``: the signature again (the machine re-admits a stored document), this fleet, a kind
   this device installs, for a feature release a partition that includes this device, a version
   newer than the one in use unless a signed rollback (``wire.names.require_newer``; for a
   feature set ``features.plan.require_version``, the cache's own rule), and artifacts within
   ``max_artifact_bytes``. Freshness (``wire.freshness``) is checked first,
   right after the signature: not expired, and a ``seq`` newer than the highest accepted for
   this (kind, name), else ``StaleRejected`` (a replay: logged, never reported).

Rollout documents go through ``authenticate_rollout``: signature, this fleet, the topic's model.

Nothing here does I/O: the caller passes the version in use, so ``OtaAgent``, the update
machine's ``idle`` step (through ``Admission.bind``) and ``cloud_batch.sim`` share it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import ManifestError, RejectedError, ReleaseRejected
from edge_agent.features.plan import require_version
from edge_agent.update.seams import Admit
from edge_agent.wire.freshness import require_fresh, require_unexpired
from edge_agent.wire.names import require_newer
from edge_agent.wire.protocol import Release, Rollout, decode
from edge_agent.wire.signing import verify

Highest = Callable[[str], "tuple[int, str] | None"]  # ledger key -> highest accepted (seq, id)


AGENT_RELEASE_NAME = "edge-agent"  # releases of the agent itself (kind "agent") use this name's topic


def ledger_key(kind: str, name: str) -> str:
    """The freshness ledger's key of a release (``model/digits``) or rollout (``rollout/digits``)."""
    return f"{kind}/{name}"


def authenticate_release(payload: bytes, trusted: Iterable[Any]) -> tuple[Release, dict[str, Any]]:
    """Parse a release document and check its signature; ReleaseRejected says why not.

    Nothing in a document is trusted before this has passed.
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


@dataclass(frozen=True)
class Admission:
    """Who this device is and what it trusts: everything admission needs besides the release."""

    fleet: str
    device_id: str
    trusted: tuple[Any, ...]
    max_artifact_bytes: int
    groups: tuple[str, ...] = ()
    features: bool = False  # the device has a feature cache

    def authenticate(self, payload: bytes) -> tuple[Release, dict[str, Any]]:
        """Step 1: parse and verify; ReleaseRejected carries the readable ids."""
        return authenticate_release(payload, self.trusted)

    @staticmethod
    def check_model_topic(release: Release, name: str) -> None:
        """Step 2 for ``releases/<name>``: the release is a model release for that model."""
        if release.name != name:
            raise RejectedError(f"release for model {release.name!r} published on the topic of {name!r}")
        if release.kind != ("agent" if name == AGENT_RELEASE_NAME else "model"):  # the agent's own: update/agent/slots
            raise RejectedError(f"a release of kind {release.kind!r} on the release topic of {name!r}")

    @staticmethod
    def check_features_topic(release: Release, feature_set: str, by: str, key: str, pending: str | None) -> None:
        """Step 2 for ``features/<set>/<by>/<key>``; ``pending``: the version queued or running on the set's lane."""
        if release.kind != "features":
            raise RejectedError(f"a release of kind {release.kind!r} on a feature topic (need kind 'features')")
        if release.name != feature_set:
            raise RejectedError(f"release for feature set {release.name!r} published on the topic of {feature_set!r}")
        if release.partition != {"by": by, "key": key}:
            raise RejectedError(
                f"wrong partition: the release is signed for {release.partition['by']}/"
                f"{release.partition['key']} but arrived on {by}/{key}"
            )
        if pending is not None:
            _require_feature_version(release, pending, held="queued or running")

    def authenticate_rollout(self, payload: bytes, name: str) -> Rollout:
        """A rollout document that is signed by a trusted key for this fleet and model; RejectedError otherwise."""
        doc = decode(payload, "rollout")
        rollout = Rollout.from_dict(doc)
        verify(doc, self.trusted)
        if rollout.fleet != self.fleet or rollout.name != name:
            raise RejectedError(
                f"rollout signed for {rollout.fleet}/{rollout.name} arrived on the topic of {self.fleet}/{name}"
            )
        return rollout

    def admit(
        self, release: Release, doc: Mapping[str, Any], current: str | None, highest: Highest, now: float
    ) -> bool:
        """Step 3: raise a RejectedError naming the reason; ``current``: the version in use of that artifact.

        Returns True for a document newer than any accepted, False for the one accepted last again.
        Freshness comes right after the signature and the fleet: a replayed old release is stale,
        never "rejected" under its id (that report would overwrite the device's real outcome).
        """
        verify(doc, self.trusted)
        if release.fleet != self.fleet:
            raise RejectedError(
                f"wrong fleet: the release is for fleet {release.fleet!r}, this device is in {self.fleet!r}"
            )
        what = f"{release.kind} release {release.name}"  # seq counts per (fleet, kind, name): fleet first
        require_unexpired(what, release.expires_at, now)
        fresh = require_fresh(what, release.seq, release.release_id, highest(ledger_key(release.kind, release.name)))
        if release.kind == "features":
            self._admit_partition(release)
            _require_feature_version(release, current, held="cached")
        elif release.kind == "agent":
            require_newer("agent version", release.version, current, rollback=release.rollback, held="running")
        elif release.kind != "model":
            raise RejectedError(f"kind {release.kind!r} is not applied by this agent")
        else:
            require_newer("version", release.version, current, rollback=release.rollback, held="active")
        for what, artifact in (("artifact", release.artifact), ("fallback", release.fallback)):
            if artifact is not None and artifact.size > self.max_artifact_bytes:
                raise RejectedError(
                    f"too large: the {what} is {artifact.size} bytes, this device accepts at "
                    f"most {self.max_artifact_bytes}"
                )
        return fresh

    def _admit_partition(self, release: Release) -> None:
        if not self.features:
            raise RejectedError("this device has no feature cache")
        by, key = release.partition["by"], release.partition["key"]
        if by == "device" and key != self.device_id:
            raise RejectedError(f"wrong partition: the release is for device {key!r}, this is {self.device_id!r}")
        if by == "group" and key not in self.groups:
            raise RejectedError(
                f"wrong partition: the release is for group {key!r}, this device is in {list(self.groups)}"
            )

    def bind(self, current: Callable[[str, str], str | None], highest: Highest, now: Callable[[], float]) -> Admit:
        """The machine's ``Seams.admit``: ``admit`` against ``current(kind, name)`` read at the time of the call."""

        def admit(release: Release, doc: Mapping[str, Any]) -> None:
            self.admit(release, doc, current(release.kind, release.name), highest, now())

        return admit


def _require_feature_version(release: Release, current: str | None, held: str) -> None:
    """The feature cache's version rule at release level: the bundle's kind and data are not known yet."""
    require_version(
        release.version, current, rollback=release.rollback, what=f"feature set {release.name} version", held=held
    )
