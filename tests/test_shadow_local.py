"""`edge-agent models shadow NAME VERSION` on an air-gapped agent: a real `edge-agent run` without a broker.

Versions 2 (the same model) and 3 (one that predicts other classes) are installed beside the
active version 1 while a client keeps sending requests. Shadowing 3 is rejected with its
figures (exit 1) and 3 never answers; shadowing 2 promotes it: it serves, passes its health
window and is marked good (exit 0).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from edge_agent.models.store import ModelStore
from edge_agent.models.taps import ModelTaps
from edge_agent.update.shadow import local
from edge_agent.update.shadow.verdict import ShadowHost
from tests.support.env import free_port
from tests.support.ota import relabel
from tests.support.shadow import Traffic, digits_body, skewed

BIN = Path(sys.executable).parent


def shadow(data_dir: Path, version: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / "edge-agent"), "models", "shadow", "digits", version, "--data-dir", str(data_dir)]
    cmd += ["--rate", "1", "--min-samples", "40", "--window-s", "30", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env.update(EDGEFLEET_MODELS_DIR="", EDGEFLEET_WATCH_INTERVAL_S="0.2")
    return env


def test_a_local_shadow_rejects_a_disagreeing_version_and_promotes_an_agreeing_one(
    tmp_path: Path, digits_dir: Path
) -> None:
    data_dir, port = tmp_path / "data", free_port()
    store = ModelStore(data_dir)
    for d in (digits_dir, relabel(digits_dir, tmp_path / "v2", "2"), skewed(digits_dir, tmp_path / "v3", "3")):
        store.install_dir(d)
    assert store.active("digits") == "1"
    agent = [str(BIN / "edge-agent"), "run", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(agent, env=_env(), stderr=subprocess.DEVNULL)
    try:
        with Traffic("127.0.0.1", port, digits_body(digits_dir, rows=16)) as traffic:
            deadline = time.monotonic() + 60
            while len(traffic.versions) < 10:
                assert proc.poll() is None and time.monotonic() < deadline, "the agent never answered"
                time.sleep(0.05)
            rejected = shadow(data_dir, "3")
            assert rejected.returncode == 1, rejected.stderr
            assert "rejected: shadow rejected: agreement" in rejected.stdout, rejected.stdout
            assert "samples, agreement" in rejected.stdout and "Traceback" not in rejected.stderr
            assert traffic.answered_by() == {"1"} and store.active("digits") == "1"
            promoted = shadow(data_dir, "2", "--promote-if", "agreement>=0.99,latency<=20", "--health-window-s", "1")
            assert promoted.returncode == 0, promoted.stdout + promoted.stderr
            assert "promoted: shadow passed" in promoted.stdout and ", promote" in promoted.stdout
            assert "; health window passed: " in promoted.stdout  # served and watched before the verdict
            assert "2" in store.state("digits").good  # marked good after its health window
            while traffic.versions.count("2") < 5:
                assert time.monotonic() < deadline + 60, "version 2 never answered"
                time.sleep(0.05)
        assert "3" not in traffic.versions
        first2 = traffic.versions.index("2")
        assert set(traffic.versions[:first2]) == {"1"} and set(traffic.versions[first2:]) == {"2"}
        bad = shadow(data_dir, "9")
        assert bad.returncode == 1 and bad.stderr.startswith("error: digits 9 is not installed"), bad.stderr
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_local_promotion_that_breaches_its_health_window_is_rolled_back(tmp_path: Path, digits_dir: Path) -> None:
    """After the shadow passed: the error rate breaches the window, so the previous version is active again.

    The served model's call counters are a fake at the health seam (the window itself is proven on a
    real agent by `test_health_signals.py`); the store and the saved request are real.
    """
    data_dir = tmp_path / "data"
    store = ModelStore(data_dir)
    for d in (digits_dir, relabel(digits_dir, tmp_path / "v2", "2")):
        store.install_dir(d)
    calls = iter(range(0, 10_000, 10))

    def health(name: str) -> tuple[str | None, int, int]:
        n = next(calls)
        return store.active(name), n, n // 2  # half of the calls fail

    host = ShadowHost(ModelTaps(), None, health=health)
    policy = {"shadow_rate": 1.0, "health_window_s": 30.0}
    req = local.ShadowRequest("digits", "2", policy, state="health_check", previous="1", reason="shadow passed: ...")
    done = local.LocalShadows(data_dir, store, host, poll_s=0.01).watch_health(req)
    assert done.state == "rolled_back" and store.active("digits") == "1", done
    assert (done.reason or "").startswith("health window: ") and "calls failed" in (done.reason or ""), done.reason
    saved = local.load(data_dir, "digits")
    assert saved is not None and saved.state == "rolled_back"
