"""The device's trust boundary: what a document off the wire must be before the coordinator acts on it.

In order, for a release (``release``, then ``admit``) and a rollout (``rollout``):

1. at most ``max_document_bytes`` long, checked before parsing;
2. authentic (``admission``: parses, signed by a trusted key; a rollout for this fleet and
   the topic's model). Anything else is *dropped*: counted in
   ``edgefleet_ota_rejected_unauthenticated_total{kind}``, logged, its digest remembered in
   memory (``reports.drop``), and nothing of it reported: its release id is unproven;
3. fresh (``wire.freshness``): a ``seq`` newer than the highest accepted for its (kind, name),
   or the very document accepted last again; not expired. A stale authentic document is a
   replay: logged and ignored, never reported (a report would overwrite the real outcome);
4. for a release, the rest of admission; a failure there is reported under its release id.

The ``seq`` of what passes is persisted in ``<data-dir>/updates/.seq.json`` before the
coordinator hands the document on (gate, lane, abort).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from edge_agent.config import OtaConfig
from edge_agent.errors import RejectedError, ReleaseRejected, StaleRejected
from edge_agent.update.admission import Admission, ledger_key
from edge_agent.update.reports import Reports
from edge_agent.wire.freshness import SeqLedger
from edge_agent.wire.protocol import Release, Rollout

log = logging.getLogger("edge_agent.update.coordinator")

SEQ_FILE = ".seq.json"
Found = tuple[Release, dict[str, Any], str]  # release, signed document, rejection key ("id:<release_id>")


class Intake:
    """Size, authenticity and freshness of incoming documents, with the persisted ``seq`` ledger."""

    def __init__(
        self,
        admission: Admission,
        reports: Reports,
        records_dir: Path,
        options: OtaConfig,
        now: Callable[[], float],
        metrics: CollectorRegistry | None = None,
    ) -> None:
        self.admission, self.reports, self.options, self.now = admission, reports, options, now
        self.ledger = SeqLedger(records_dir / SEQ_FILE)
        self.unauthenticated = Counter(
            "edgefleet_ota_rejected_unauthenticated_total",
            "OTA documents dropped as not authentic (unsigned, forged, malformed, oversized, deleted)",
            ["kind"],
            registry=metrics if metrics is not None else CollectorRegistry(),
        )

    def drop(self, kind: str, topic: str, reason: str, digest: str = "") -> None:
        """Count and log a document that is not authentic; nothing of it is reported."""
        self.unauthenticated.labels(kind).inc()
        self.reports.drop(digest, topic, reason)

    def release(self, topic: str, payload: bytes, known: Callable[[str], bool]) -> Found | None:
        """Steps 1-2 for a release; None if dropped, already rejected or ``known(release_id)``."""
        if len(payload) > self.options.max_document_bytes:
            self.drop("release", topic, f"{len(payload)} bytes, above max_document_bytes")
            return None
        digest = "doc:" + hashlib.sha256(payload).hexdigest()
        if self.reports.is_rejected(digest):
            return None
        try:
            release, doc = self.admission.authenticate(payload)
        except ReleaseRejected as exc:
            self.drop("release", topic, str(exc), digest)
            return None
        key = "id:" + release.release_id  # authentic from here on: the id can be trusted
        if self.reports.is_rejected(key) or known(release.release_id):
            return None
        return release, doc, key

    def admit(self, release: Release, doc: dict[str, Any], current: str | None, lane: str) -> None:
        """Steps 3-4, then the ``seq`` persisted. StaleRejected: ignore; another RejectedError: report it."""
        try:
            self.admission.admit(release, doc, current, self.ledger.highest, self.now())
        except StaleRejected as exc:
            log.warning("update %s (%s): ignored, not fresh: %s", release.release_id, lane, exc)
            raise
        self.ledger.accept(ledger_key(release.kind, release.name), release.seq, release.release_id)

    def rollout(self, topic: str, name: str, payload: bytes) -> Rollout | None:
        """An authentic, fresh rollout for ``name`` with its ``seq`` persisted; None if dropped or stale."""
        if not payload:
            self.drop("rollout", topic, "an empty (deleted) rollout: the last authentic one stands")
            return None
        if len(payload) > self.options.max_document_bytes:
            self.drop("rollout", topic, f"{len(payload)} bytes, above max_document_bytes")
            return None
        try:
            ro = self.admission.authenticate_rollout(payload, name)
        except RejectedError as exc:
            self.drop("rollout", topic, str(exc))
            return None
        key = ledger_key("rollout", name)
        try:  # the same document again (a reconnect) passes: applying it twice is harmless
            self.ledger.check(key, f"rollout of {name}", ro.seq, ro.release_id)
        except StaleRejected as exc:
            log.warning("rollout of %s ignored, not fresh: %s", name, exc)
            return None
        self.ledger.accept(key, ro.seq, ro.release_id)
        return ro
