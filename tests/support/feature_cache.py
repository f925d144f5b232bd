"""Feature bundles for the feature-cache tests: ``make`` writes a bundle directory and reads it back, as a device would."""

from __future__ import annotations

from pathlib import Path

from edge_agent.wire.bundle import read_bundle
from tests.support.bundles import write_rows

NAMES = ["a", "b", "c"]
T0 = 1_800_000_000.0


def make(
    tmp: Path,
    version: str,
    entities: dict[str, list[float]],
    *,
    kind: str = "snapshot",
    base: str | None = None,
    deleted: tuple[str, ...] = (),
    ts: float | dict[str, float] = T0,
    ttl_s: float | None = 3600,
    policy: str = "reject",
    names: list[str] = NAMES,
    set: str = "maint",
    dtype: str = "float64",
):
    """Write a bundle directory and read it back, as a device would."""
    path = write_rows(
        tmp / f"{set}-{version}-{kind}",
        set,
        version,
        entities,
        names,
        event_ts=ts,
        kind=kind,
        base=base,
        deleted=deleted,
        dtype=dtype,
        ttl_s=ttl_s,
        stale_policy=policy,
    )
    return read_bundle(path)
