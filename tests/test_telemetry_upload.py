"""Store-and-forward end to end: real agents, real mosquitto, the real ``cloud_batch.ingest`` into Parquet.

Every number is counted in the store: rows per (device, seq) and per request id, so a lost record and a
duplicated one both fail the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_batch.fleetops.keys import generate_keys
from tests.broker import Broker
from tests.support.telemetry import AgentProcess, Ingest, label_many, predict_many, stored, wait_until


@pytest.fixture
def trust(tmp_path: Path) -> Path:
    return generate_keys(tmp_path / "keys")[1]


@pytest.fixture
def down_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "mosquitto")  # its port is reserved; it is started by the test
    yield b
    b.stop()


def test_broker_down_restart_then_exactly_once(tmp_path: Path, down_broker: Broker, trust: Path) -> None:
    agent = AgentProcess(tmp_path / "data", down_broker.url, trust, sample_inputs=0.2).start()
    try:
        ids = predict_many(agent, 6000)
        label_many(agent, ids[:300])
        agent.stop()  # restarted once while the broker is down
        agent.start()
        later = predict_many(agent, 4000, seed=1)
        label_many(agent, ids[300:400] + later[:100])
        ids += later
        before = agent.telemetry()["outbox"]
        assert before["acked_seq"] == 0 and before["rows"] >= 10_500

        down_broker.start()
        with Ingest(down_broker, tmp_path / "store") as ingest:
            wait_until(lambda: agent.telemetry()["outbox"]["rows"] == 0, 120, "the outbox to drain")
            predictions = stored(ingest.store, "prediction")
            feedback = stored(ingest.store, "feedback")
            events = stored(ingest.store, "event")
    finally:
        agent.stop()

    rids = [p["request_id"] for p in predictions]
    assert len(rids) == 10_000 and set(rids) == set(ids), "every prediction exactly once"
    labelled = [f["request_id"] for f in feedback]
    assert len(labelled) == 500 and set(labelled) == set(ids[:400] + later[:100])
    sampled = sum("inputs" in p for p in predictions)
    assert 1700 < sampled < 2300, sampled  # 20% of 10,000 kept their inputs
    assert sum(e["type"] == "restart" for e in events) == 2
    assert all(p["inputs"]["pixels"]["shape"] == [1, 8, 8, 1] for p in predictions if "inputs" in p)


def test_kill9_while_uploading_loses_and_duplicates_nothing(tmp_path: Path, trust: Path) -> None:
    broker = Broker(tmp_path / "mosquitto").start()
    agent = AgentProcess(tmp_path / "data", broker.url, trust, sample_inputs=1.0, max_bps=80_000)
    try:
        agent.start()
        ids = predict_many(agent, 2000)
        wait_until(lambda: agent.telemetry()["outbox"]["last_seq"] >= 2001, 30, "every prediction committed")
        # Ingest starts only now: with no ack until then, the whole outbox (~560 kB packed, ~7 s at 80 kB/s) is
        # still to upload, however slowly the predictions went (an ingest that kept pace left nothing to kill).
        with Ingest(broker, tmp_path / "store") as ingest:
            wait_until(lambda: agent.telemetry()["outbox"]["acked_seq"] > 0, 60, "the first acked batch")
            mid = agent.telemetry()["outbox"]
            assert 0 < mid["acked_seq"] < mid["last_seq"], "killed while uploading"
            agent.kill9()
            agent.start()
            wait_until(lambda: agent.telemetry()["outbox"]["rows"] == 0, 120, "the outbox to drain")
            predictions = stored(ingest.store, "prediction")
    finally:
        agent.stop()
        broker.stop()
    rids = [p["request_id"] for p in predictions]
    assert len(rids) == 2000 and set(rids) == set(ids)
