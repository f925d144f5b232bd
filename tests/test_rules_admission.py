"""Release admission and the feature cache's plan() decide a bundle's version with one rule.

Pure: a signed Release through ``Admission`` (as the agent and the simulator run it) against
``features.plan.plan`` on the bundle the release would carry. Admission sees no kind and no data,
so it may only be looser than plan(), never stricter: a bundle the cache would apply is never
refused before its download (docs/protocol.md, "signed rollback").
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.errors import VersionNotNewer
from edge_agent.features.plan import plan
from edge_agent.features.records import SetInfo
from edge_agent.update.admission import Admission
from edge_agent.wire.bundle import BundleInfo
from edge_agent.wire.bundle.info import FeatureSpec
from edge_agent.wire.protocol import Artifact, Release
from edge_agent.wire.signing import sign

SET, CACHED, DATA, OTHER = "maint", "3", "a" * 64, "b" * 64  # OTHER: the same version with other data
KEY = Ed25519PrivateKey.generate()
ADMISSION = Admission("fleet-a", "dev-1", (KEY.public_key(),), 1 << 20, features=True)
VERSIONS = ("2", "3", "4")  # older, the cached one, newer


def release(version: str, rollback: bool) -> tuple[Release, dict[str, Any]]:
    rel = Release(
        "r-1",
        "fleet-a",
        SET,
        version,
        Artifact.from_blob(b"bundle"),
        kind="features",
        rollback=rollback,
        seq=1,
        expires_at=time.time() + 3600 if rollback else None,
    )
    return rel, sign(rel.to_dict(), KEY)


def admits(version: str, rollback: bool, current: str | None = CACHED) -> bool:
    rel, doc = release(version, rollback)
    try:
        ADMISSION.admit(rel, doc, current, lambda key: None, time.time())
    except VersionNotNewer:
        return False
    return True


def topic_admits(version: str, rollback: bool, pending: str) -> bool:
    rel, _ = release(version, rollback)
    try:
        Admission.check_features_topic(rel, SET, "all", "all", pending)
    except VersionNotNewer:
        return False
    return True


def cached() -> SetInfo:
    return SetInfo(
        SET, CACHED, "snapshot", None, 10, 100, ("x",), "float32", None, "reject", "asset_id", {},
        None, None, None, None, DATA, "", 0.0, 1,
    )  # fmt: skip


def applies(version: str, rollback: bool, kind: str, data: str) -> bool | None:
    """plan()'s answer: True (applies), None (a no-op), False (VersionNotNewer)."""
    info = BundleInfo(
        SET, version, kind, (FeatureSpec("x"),), None, "reject", 10, 0, data,
        base_version=CACHED if kind == "delta" else None,
    )  # fmt: skip
    try:
        return None if plan(cached(), info, allow_downgrade=rollback).noop else True
    except VersionNotNewer:
        return False


GRID = list(itertools.product(VERSIONS, (False, True), ("snapshot", "delta"), (True, False)))


@pytest.mark.parametrize(("version", "rollback", "kind", "same_data"), GRID)
def test_admission_never_refuses_what_the_cache_would_apply(
    version: str, rollback: bool, kind: str, same_data: bool
) -> None:
    data = DATA if same_data else OTHER
    if applies(version, rollback, kind, data):
        assert admits(version, rollback)
    if not admits(version, rollback) and not same_data:
        assert applies(version, rollback, kind, data) is False


@pytest.mark.parametrize(
    ("version", "rollback", "admitted", "snapshot", "delta"),
    [
        ("4", False, True, True, True),  # newer: everywhere
        ("3", False, False, False, False),  # the cached version, other data: nowhere
        ("2", False, False, False, False),  # older, not a rollback
        ("2", True, True, True, False),  # signed rollback: an older snapshot only (a delta needs its base)
        ("3", True, True, False, False),  # signed rollback to the cached version: other data never
    ],
)
def test_the_rollback_nuance(version: str, rollback: bool, admitted: bool, snapshot: bool, delta: bool) -> None:
    assert admits(version, rollback) is admitted
    assert applies(version, rollback, "snapshot", OTHER) is snapshot
    assert applies(version, rollback, "delta", OTHER) is delta


@pytest.mark.parametrize(("version", "rollback"), list(itertools.product(VERSIONS, (False, True))))
def test_pending_check_is_the_admission_rule(version: str, rollback: bool) -> None:
    # a signed rollback is not refused for a newer version queued or running (it supersedes it)
    assert topic_admits(version, rollback, pending=CACHED) is admits(version, rollback)
