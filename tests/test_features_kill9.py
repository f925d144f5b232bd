"""SIGKILL during the apply of a large snapshot: the previous version stays complete, the file stays sound.

A child process applies a 100k-row snapshot over the previous one and is killed with SIGKILL,
either at a random instruction count inside the apply transaction (a SQLite progress handler
sends the signal, so the kill is certain to land mid-apply) or after a random delay (anywhere:
reading the bundle, inserting, committing, checkpointing). After each kill: ``PRAGMA
integrity_check`` is ``ok``, every row belongs to one version — the set's — with that version's
values, and re-applying the bundle (what the agent does after a restart) completes.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from edge_agent.features.cache import DB_FILE, FeatureCache
from tests.support.big_features import one_complete_version, write_big

N = 100_000  # large enough that a delay-timed kill lands mid-apply (timers scaled to the measured apply)

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from edge_agent.wire.bundle import read_bundle
    from edge_agent.features.cache import FeatureCache

    db, bundle, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    b = read_bundle(bundle)
    cache = FeatureCache(db)
    calls = [0]

    def progress():
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return 0

    if kill_at >= 0:
        cache._writer.set_progress_handler(progress, 1000)
    print("applying", flush=True)
    cache.apply(b)
    print("done", calls[0], flush=True)
    """
)


def _bundle(tmp: Path, version: int) -> Path:
    return write_big(tmp / f"b{version}", version, N, compress=False)


def _child(db: Path, bundle: Path, kill_at: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), str(bundle), str(kill_at)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _check(db: Path) -> str:
    """The file is sound and holds exactly one complete version; return it."""
    return one_complete_version(db, N)


def test_kill9_during_snapshot_apply_keeps_the_previous_version(tmp_path: Path) -> None:
    db = tmp_path / DB_FILE
    bundles = {v: _bundle(tmp_path, v) for v in (1, 2)}
    with FeatureCache(db) as cache:
        cache.apply(bundles[1])

    # Calibrate: how many progress callbacks a full apply of this size takes (the apply itself is undone).
    probe_db = tmp_path / "probe" / DB_FILE
    probe_db.parent.mkdir()
    with FeatureCache(probe_db) as cache:
        cache.apply(bundles[1])
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(probe_db), str(bundles[2]), str(10**12)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    apply_s = time.monotonic() - started  # a whole child: start, read, apply, commit
    assert out.returncode == 0, out.stderr
    total = int(out.stdout.split()[-1])
    assert total > 100

    rng = random.Random(1234)
    current, interrupted = 1, 0
    kills = [("progress", rng.randint(1, int(total * 0.97))) for _ in range(4)]
    kills += [("timer", rng.uniform(0.0, apply_s)) for _ in range(3)]
    for how, at in kills:
        target = current + 1
        if target not in bundles:
            bundles[target] = _bundle(tmp_path, target)
        proc = _child(db, bundles[target], int(at) if how == "progress" else -1)
        assert proc.stdout is not None
        if how == "timer":
            assert proc.stdout.readline().strip() == "applying"
            time.sleep(at)
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
        if how == "progress":
            assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""

        version = _check(db)
        assert version in (str(current), str(target))
        if how == "progress":  # killed before COMMIT, for sure
            assert version == str(current)
        if version == str(current):
            interrupted += 1
            # "After restart the new version completes": re-apply the same bundle.
            with FeatureCache(db) as cache:
                res = cache.apply(bundles[target])
            assert (res.version, res.rows, res.previous_version) == (str(target), N, str(current))
            assert _check(db) == str(target)
        current = target
    assert interrupted >= 4
