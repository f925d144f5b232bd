"""Exactly-once telemetry ingest: the store's commit rule on real Parquet + SQLite, the session on real mosquitto."""

from __future__ import annotations

import json
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_batch.errors import StoreError
from cloud_batch.ingest.consumer import IngestOptions, run_ingest
from cloud_batch.ingest.ledger import add_range, contiguous, gaps
from cloud_batch.ingest.store import TelemetryStore
from edge_agent.wire.telemetry import MAX_BATCH_BYTES
from edge_agent.wire.topics import telemetry_topic
from tests.broker import Broker
from tests.support.telemetry_device import StandInDevice, payload, stored

FLEET = "f1"


def msg(device: str, first: int, last: int, **kw: dict[str, int]) -> tuple[str, bytes]:
    return telemetry_topic(FLEET, device), payload(FLEET, device, first, last, **kw)


def test_ranges_merge_and_report_gaps() -> None:
    r: list[list[int]] = []
    for lo, hi in [(5, 7), (1, 2), (10, 12), (3, 4), (11, 15)]:
        add_range(r, lo, hi)
    assert r == [[1, 7], [10, 15]]
    assert contiguous(r) == 7
    assert gaps(r) == [(8, 9)]
    assert contiguous([[2, 5]]) == 0 and gaps([[2, 5]]) == [(1, 1)]


def test_commit_is_exactly_once_across_redelivery_and_resend(tmp_path: Path) -> None:
    with TelemetryStore(tmp_path / "s", FLEET) as store:
        first = store.commit([msg("d1", 1, 20), msg("d2", 1, 5)])
        assert (first.rows, first.duplicates) == (25, 0)
        assert first.acks == {(FLEET, "d1"): 20, (FLEET, "d2"): 5}
        # the same message again (broker redelivery) and a re-batched overlapping re-send
        again = store.commit([msg("d1", 1, 20), msg("d1", 11, 30)])
        assert (again.rows, again.duplicates) == (10, 30)
        assert again.acks == {(FLEET, "d1"): 30}
        gap = store.commit([msg("d2", 9, 12)])
        assert gap.acks == {(FLEET, "d2"): 5}  # 6..8 never came: the ack stays below the gap
    rows = stored(tmp_path / "s")
    assert len(rows) == len(set(rows)) == 30 + 5 + 4
    with TelemetryStore(tmp_path / "s", FLEET) as store:  # reopened: the ledger still dedups
        assert store.commit([msg("d1", 25, 35)]).rows == 5
        assert store.ledger.devices["d2"].ranges == [[1, 5], [9, 12]]


def test_batch_covering_dropped_rows_advances_the_ack(tmp_path: Path) -> None:
    """A batch covers first_seq..last_seq: rows the device dropped inside it are not a gap."""
    with TelemetryStore(tmp_path / "s", FLEET) as store:
        store.commit([msg("d1", 1, 3)])
        topic, data = msg("d1", 4, 9, dropped={"prediction": 2})
        from edge_agent.wire.telemetry import decode_batch, encode_batch

        b = decode_batch(data)
        holed = encode_batch(
            type(b)(b.device_id, b.fleet, 4, 9, tuple(r for r in b.records if r.seq not in (5, 6)), b.dropped)
        )
        result = store.commit([(topic, holed)])
        assert result.rows == 4 and result.acks == {(FLEET, "d1"): 9}
        assert store.ledger.devices["d1"].dropped == {"prediction": 2}


def test_bad_input_is_counted_and_good_rows_of_the_same_batch_are_kept(tmp_path: Path) -> None:
    good_topic, good = msg("d1", 1, 4)
    doc = json.loads(zlib.decompress(good))
    doc["records"][1]["kind"] = "nope"  # seq 2: unknown kind
    doc["records"][2]["body"] = 7  # seq 3: body is not an object; seqs 1 and 4 are fine
    mixed = zlib.compress(json.dumps(doc).encode())
    with TelemetryStore(tmp_path / "s", FLEET) as store:
        result = store.commit(
            [
                (good_topic, b"\x00" * (MAX_BATCH_BYTES + 1)),  # oversized
                (good_topic, b"not zlib at all"),  # not zlib
                (good_topic, zlib.compress(b'{"schema_version": 1, "records": [')),  # bad JSON
                (telemetry_topic(FLEET, "d2"), good),  # batch of d1 on d2's topic
                (good_topic, mixed),
            ]
        )
        assert result.rejected == 6, result.reasons
        assert result.rows == 2
        assert any("nope" in r for r in result.reasons)
        assert any("not zlib" in r for r in result.reasons)
        assert result.acks == {(FLEET, "d1"): 4}  # rejected records are final: never re-sent, not a gap
        assert len(store.ledger.rejections()) == 6
    assert sorted(stored(tmp_path / "s")) == [("d1", 1), ("d1", 4)]


def test_second_writer_and_a_file_are_refused(tmp_path: Path) -> None:
    with TelemetryStore(tmp_path / "s", FLEET), pytest.raises(StoreError, match="in use"):
        TelemetryStore(tmp_path / "s", FLEET)
    with TelemetryStore(tmp_path / "s", FLEET) as store:  # released on close
        assert store.commit([msg("d1", 1, 2)]).rows == 2
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        TelemetryStore(tmp_path / "file")


@pytest.fixture
def small_broker(tmp_path: Path) -> Iterator[Broker]:
    """mosquitto that queues at most 20 messages for an offline session (devices send far more)."""
    b = Broker(tmp_path / "mosquitto")
    b.conf.write_text(b.conf.read_text().replace("max_queued_messages 100000", "max_queued_messages 20"))
    b.start()
    yield b
    b.stop()


def test_ingest_down_longer_than_the_broker_queues_still_ends_exact(small_broker: Broker, tmp_path: Path) -> None:
    store = tmp_path / "store"
    options = IngestOptions(FLEET, small_broker.url, store, idle_exit_s=0.5)
    run_ingest(options)  # creates the persistent session, then exits: ingest is now down
    devices = [StandInDevice(small_broker.url, FLEET, f"dev{i}", total=400, per_batch=10) for i in range(3)]
    try:
        assert sum(d.upload() for d in devices) == 120  # 120 batches for a session that queues 20
        drained = run_ingest(options)  # ingest returns: it gets what the broker kept
        assert 0 < drained.messages <= 40
        assert sum(d.acked for d in devices) < 3 * 400, "the broker kept everything: the test proves nothing"
        stop = threading.Event()
        follow = threading.Thread(
            target=run_ingest, args=(IngestOptions(FLEET, small_broker.url, store, follow=True),), kwargs={"stop": stop}
        )
        follow.start()
        try:
            for d in devices:
                d.sync(timeout_s=60, resend_s=1.0)
        finally:
            stop.set()
            follow.join(30)
    finally:
        for d in devices:
            d.close()
    rows = stored(store)
    assert len(rows) == len(set(rows)) == 3 * 400
    assert {s for d, s in rows if d == "dev1"} == set(range(1, 401))
