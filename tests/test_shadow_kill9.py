"""kill -9 while shadowing, and the cloud's side: `cloud-batch release --shadow` and `rollout status`.

A real `edge-agent run` process (MQTT, OTA, HTTP) serves digits 1 to a client that never
stops. `cloud-batch release --shadow` publishes version 2; as soon as the agent's update
record on disk says ``shadowing`` the agent is killed with SIGKILL. The store still points at
version 1 and the restarted agent serves version 1, resumes shadowing with the figures saved
with the record before the kill (and what was left of the window), promotes version 2 and
commits it. The client's answers come from version 1 and then from
version 2, never from 2 before the promotion. `cloud-batch rollout status` shows the
device's shadow figures.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from cloud_batch.cli.main import main as cloud_batch
from edge_agent.models.store import ModelStore
from tests.broker import Broker
from tests.support.env import free_port
from tests.support.ota import relabel
from tests.support.shadow import Traffic, digits_body
from tests.support.wait import wait_for

BIN = Path(sys.executable).parent
FLEET = "shadow-k9"


def record_state(data_dir: Path) -> dict | None:
    try:
        return json.loads((data_dir / "updates" / "digits.json").read_text())
    except (OSError, ValueError):
        return None


def _saved_samples(data_dir: Path) -> int:
    """Samples in the shadow figures saved with the update record (what a restart resumes from)."""
    saved = ((record_state(data_dir) or {}).get("details") or {}).get("shadow_state") or {}
    return int((saved.get("figures") or {}).get("samples", 0))


def _saved_or_decided(data_dir: Path) -> bool:
    """Figures saved with the record, or the shadow over without them (the test then fails at once)."""
    return _saved_samples(data_dir) > 0 or (record_state(data_dir) or {}).get("state") != "shadowing"


def test_kill9_while_shadowing_resumes_and_never_serves_the_candidate_unpromoted(
    tmp_path: Path, broker: Broker, digits_dir: Path
) -> None:
    keys = tmp_path / "keys"
    assert cloud_batch(["keys", "generate", "--out", str(keys)]) == 0
    registry = tmp_path / "registry"
    relabel(digits_dir, registry / "digits" / "1", "1")
    relabel(digits_dir, registry / "digits" / "2", "2")
    data_dir, port = tmp_path / "data", free_port()
    ModelStore(data_dir).install_dir(digits_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env.update(EDGEFLEET_MODELS_DIR="", EDGEFLEET_WATCH_INTERVAL_S="0.2")
    agent = [str(BIN / "edge-agent"), "run", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}"]
    agent += ["--broker", broker.url, "--fleet", FLEET, "--device-id", "cam-1", "--trust", str(keys / "signing.pub")]

    def start() -> subprocess.Popen:
        return subprocess.Popen(agent, env=env, stderr=subprocess.DEVNULL)

    proc = start()
    try:
        with Traffic("127.0.0.1", port, digits_body(digits_dir)) as traffic:
            wait_for(lambda: len(traffic.versions) >= 20, 90, "digits 1 to answer", proc=proc)
            release = ["release", "digits", "--version", "2", "--fleet", FLEET, "--registry", str(registry)]
            release += ["--key", str(keys / "signing.key"), "--broker", broker.url, "--health-window-s", "0.5"]
            # A window long enough that a starved shadow process (SCHED_IDLE under a loaded CI) still saves figures
            # before it closes: a 4 s window once closed first, and the decided record keeps no figures to resume.
            release += ["--shadow", "--shadow-rate", "1", "--shadow-min-samples", "1000000", "--shadow-window-s", "20"]
            assert cloud_batch([*release, "--promote-if", "agreement>=0.98,latency<=20", "--no-progress"]) == 0
            wait_for(lambda: (record_state(data_dir) or {}).get("state") == "shadowing", 90, "shadowing", proc=proc)
            wait_for(lambda: _saved_or_decided(data_dir), 90, "figures saved with the record", proc=proc)
            assert _saved_samples(data_dir) > 0, f"decided before any figures were saved: {record_state(data_dir)}"
            os.kill(proc.pid, signal.SIGKILL)
            saved = _saved_samples(data_dir)
            proc.wait(10)
            assert ModelStore(data_dir).active("digits") == "1"  # what the restarted agent serves first
            served_at_kill = len(traffic.versions)
            proc = start()
            wait_for(lambda: (record_state(data_dir) or {}).get("state") == "committed", 90, "the commit", proc=proc)
            wait_for(lambda: traffic.versions.count("2") >= 5, 90, "digits 2 to answer", proc=proc)
        record = record_state(data_dir)
        assert record is not None
        states = [s for s, _ in record["history"]]
        assert states.count("shadowing") == 2 and states[-3:] == ["activating", "health_check", "committed"], states
        assert record["details"]["shadow"]["verdict"] == "promote", record["details"]
        assert record["details"]["shadow"]["samples"] >= saved  # resumed with the figures saved before the kill
        assert "shadow_state" not in record["details"]  # decided: what a restart resumes from is gone
        assert "shadow passed" in (record["reason"] or "")
        first2 = traffic.versions.index("2")
        assert first2 > served_at_kill  # version 1 answered after the restart, before the promotion
        assert set(traffic.versions[:first2]) == {"1"} and set(traffic.versions[first2:]) == {"2"}
        out = io.StringIO()
        status = ["rollout", "status", "digits", "--fleet", FLEET, "--broker", broker.url, "--registry", str(registry)]
        with contextlib.redirect_stdout(out):
            assert cloud_batch([*status, "--key", str(keys / "signing.key")]) == 0
        assert "cam-1: committed: shadow " in out.getvalue() and ", promote" in out.getvalue(), out.getvalue()
    finally:
        proc.terminate()
        proc.wait(30)
