"""The feature cache on real SQLite under concurrency: readers never see a mix of versions while a writer applies."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from edge_agent.errors import EdgeError
from edge_agent.features.cache import DB_FILE, FeatureCache
from tests.support.feature_cache import make


# -- concurrency ---------------------------------------------------------------------
def test_readers_never_see_mixed_versions_during_applies(tmp_path: Path) -> None:
    """Readers loop over entities while a writer applies snapshots and deltas whose values encode the version.

    "Mixed" means: one get_many (one read transaction) returning rows of different versions, or a row
    whose values are not those of the version it reports.
    """
    n_ent, versions = 3000, 16
    entities = [f"asset-{i:05d}" for i in range(n_ent)]
    bundles = []
    for v in range(1, versions + 1):
        if v % 2:  # odd: snapshot; even: delta rewriting every row
            bundles.append(make(tmp_path, str(v), {e: [v, v, v] for e in entities}, ts=float(v)))
        else:
            bundles.append(
                make(tmp_path, str(v), {e: [v, v, v] for e in entities}, kind="delta", base=str(v - 1), ts=float(v))
            )
    cache = FeatureCache(tmp_path / DB_FILE)
    cache.apply(bundles[0])
    stop = threading.Event()
    reads = [0]
    reads_lock = threading.Lock()
    problems: list[str] = []
    seen: set[str] = set()

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                pick = [entities[i] for i in rng.integers(0, n_ent, 40)]
                rows = cache.get_many("maint", pick)
                vs = {r.version for r in rows if r is not None}
                if None in rows or len(vs) != 1 or any(r.row_version != r.version for r in rows):
                    problems.append(f"mixed read: {sorted(vs)}")
                for r in rows:
                    if r is not None and not (r.values == float(r.row_version)).all():
                        problems.append(f"{r.entity}: values {r.values.tolist()} under version {r.row_version}")
                one = cache.get("maint", pick[0])
                if (
                    one is None
                    or not (one.values == float(one.row_version)).all()
                    or one.event_ts != float(one.row_version)
                ):
                    problems.append(f"single read inconsistent: {one!r}")
                seen.update(vs)
                with reads_lock:
                    reads[0] += 1
        except EdgeError as exc:  # pragma: no cover - reported below
            problems.append(repr(exc))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for b in bundles[1:]:
            with reads_lock:
                start = reads[0]
            cache.apply(b)
            # Let readers observe every version (progress-based, not time-based).
            for _ in range(20000):
                with reads_lock:
                    if reads[0] >= start + 8 or problems:
                        break
                threading.Event().wait(0.001)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    cache.close()
    assert not problems, problems[:5]
    assert len(seen) >= versions // 2, sorted(seen)
