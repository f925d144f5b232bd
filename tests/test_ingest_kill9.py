"""kill -9 of ``cloud-batch ingest`` at each step of a commit: the final store has no duplicate and no loss.

The crash is real: ``EDGEFLEET_INGEST_KILL_AT`` makes the ingest process SIGKILL itself at that
point of its first commit (a crash point, not a mock), against a real mosquitto and real files.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from cloud_batch.ingest.consumer import IngestOptions, run_ingest
from tests.broker import Broker
from tests.support.env import PYTHON
from tests.support.telemetry_device import StandInDevice, stored

FLEET = "f1"
TOTAL = 60


@pytest.mark.parametrize("point", ["before_ledger", "after_ledger", "after_write", "after_mqtt_ack"])
def test_kill9_at_every_commit_step_loses_and_duplicates_nothing(broker: Broker, tmp_path: Path, point: str) -> None:
    store = tmp_path / "store"
    run_ingest(IngestOptions(FLEET, broker.url, store, idle_exit_s=0.3))  # the persistent session exists
    device = StandInDevice(broker.url, FLEET, "dev1", total=TOTAL, per_batch=10)
    try:
        device.upload()  # queued by the broker for the offline ingest
        env = {**os.environ, "EDGEFLEET_INGEST_KILL_AT": f"{point}:1"}
        cmd = ["-m", "cloud_batch.cli.main", "ingest", "--fleet", FLEET, "--broker", broker.url, "--store", str(store)]
        proc = subprocess.run(
            [PYTHON, *cmd, "--idle-exit-s", "5", "--no-progress"], env=env, capture_output=True, timeout=60
        )
        assert proc.returncode == -9, proc.stderr.decode()[-2000:]
        assert not any(name.endswith(".parquet") for _, _, files in os.walk(store) for name in files) or point in (
            "after_write",
            "after_mqtt_ack",
        )
        # Restart: first what the broker redelivers (unacked messages of the session), then device re-sends.
        again = run_ingest(IngestOptions(FLEET, broker.url, store, idle_exit_s=1.0))
        if point in ("before_ledger", "after_ledger", "after_write"):
            assert again.messages > 0, "the broker did not redeliver the unacked messages"
        if point in ("after_ledger", "after_write"):
            assert again.rows == 0 and again.duplicates == TOTAL  # committed before the crash: all skipped
        stop = threading.Event()
        follow = threading.Thread(
            target=run_ingest, args=(IngestOptions(FLEET, broker.url, store, follow=True),), kwargs={"stop": stop}
        )
        follow.start()
        try:
            device.sync(timeout_s=30, resend_s=1.0)
        finally:
            stop.set()
            follow.join(30)
    finally:
        device.close()
    rows = stored(store)
    assert sorted(rows) == [("dev1", s) for s in range(1, TOTAL + 1)]
    hidden = [n for _, _, files in os.walk(store) for n in files if n.endswith(".pending")]
    assert hidden == []
