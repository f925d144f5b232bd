"""The outbox on real SQLite: the bound's drop order, counted drops, and what survives a reopen."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from prometheus_client import CollectorRegistry

from edge_agent.telemetry import ModelPolicy, Telemetry
from edge_agent.telemetry.outbox import CHUNK, Outbox, Row
from edge_agent.wire.telemetry import decode_batch, encode_rows


def _pred(i: int, inputs: bool = False) -> Row:
    body = {"model": "m", "request_id": f"r{i}", "outputs": {"y": [i]}}
    if inputs:
        body["inputs"] = {"x": {"shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}}
    return Row("prediction", float(i), json.dumps(body), model="m", request_id=f"r{i}", has_inputs=inputs)


def _row(kind: str, i: int) -> Row:
    return Row(kind, float(i), json.dumps({"type": "x", "model": "m", "request_id": f"r{i}", "label": 1}))


def test_rows_bound_drops_predictions_oldest_first_then_protected_kinds(tmp_path: Path) -> None:
    drops: dict[str, int] = {}
    box = Outbox(tmp_path / "t.db", max_rows=10, on_drop=lambda k, n: drops.__setitem__(k, drops.get(k, 0) + n))
    box.append([_pred(i) for i in range(6)] + [_row("feedback", 6), _row("event", 7)])
    box.append([_pred(i) for i in range(8, 14)])  # 14 rows: the 4 oldest predictions go
    kept = box.read_after(0, 10**9)
    assert [r[0] for r in kept] == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert drops == {"prediction": 4} and box.dropped() == {"prediction": 4}

    box.append([_row("feedback", 100 + i) for i in range(12)])  # only protected rows would remain: hard cap
    kinds = [r[1] for r in box.read_after(0, 10**9)]
    assert len(kinds) == 10 and "prediction" not in kinds and kinds.count("feedback") == 10
    assert box.dropped() == {"prediction": 12, "event": 1, "feedback": 3}
    box.close()
    assert stat.S_IMODE(os.stat(tmp_path / "t.db").st_mode) == 0o600
    reopened = Outbox(tmp_path / "t.db", max_rows=10)
    assert reopened.stats().rows == 10 and reopened.dropped()["feedback"] == 3


def test_bytes_bound_strips_oldest_inputs_before_dropping_predictions(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "t.db", max_bytes=4096)
    box.append([_pred(i, inputs=True) for i in range(16)])
    rows = box.read_after(0, 10**9)
    assert len(rows) == 16, "no prediction dropped while stripping inputs was enough"
    with_inputs = ["inputs" in json.loads(r[3]) for r in rows]
    assert with_inputs == sorted(with_inputs), "the oldest samples went first"
    assert box.dropped()["inputs"] == with_inputs.count(False) > 0
    assert box.stats().bytes <= 4096
    box.append([_pred(100 + i) for i in range(200)])
    assert box.dropped()["prediction"] > 0 and box.stats().bytes <= 4096


def test_ack_deletes_only_up_to_the_ack_and_seqs_never_repeat(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "t.db")
    assert box.append([_pred(i) for i in range(5)]) == 5
    assert box.ack(3) == 3 and [r[0] for r in box.read_after(0, 10**9)] == [4, 5]
    assert box.ack(2) == 0  # an old ack changes nothing
    box.ack(5)
    box.close()
    box = Outbox(tmp_path / "t.db")
    assert box.acked_seq() == 5 and box.append([_pred(9)]) == 6


def test_a_batch_covers_dropped_seqs_and_reports_drops(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "t.db", max_rows=3)
    box.append([_pred(i) for i in range(5)])  # seqs 1, 2 dropped
    rows = box.read_after(0, 10**9)
    batch = decode_batch(encode_rows("dev-1", "f", 1, rows, box.dropped()))
    assert (batch.first_seq, batch.last_seq) == (1, 5) and [r.seq for r in batch.records] == [3, 4, 5]
    assert batch.dropped == {"prediction": 2} and not batch.rejects


def test_feedback_survives_a_full_outbox_and_is_counted_in_metrics(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    tel = Telemetry(
        tmp_path, registry=registry, policy=lambda m: ModelPolicy(), flush_interval_s=1, max_rows=5, max_bytes=None
    )
    tel.outbox.append([_row("feedback", 0)] + [_pred(i) for i in range(1, 20)])
    assert [r[1] for r in tel.outbox.read_after(0, 10**9)].count("feedback") == 1
    assert registry.get_sample_value("edgefleet_outbox_dropped_total", {"kind": "prediction"}) == 15
    tel.stop()


def test_a_large_append_keeps_order_in_few_statements(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "t.db")
    statements: list[str] = []
    box._db.set_trace_callback(statements.append)
    n = 3 * CHUNK + 77  # three full statements, then 64 + 8 + 4 + 1
    assert box.append([Row("event", float(i), f'{{"i":{i}}}') for i in range(n)]) == n
    inserts = [s for s in statements if s.startswith("INSERT INTO records")]
    assert len(inserts) == 3 + bin(77).count("1")  # not one per row: each step hands the agent's GIL away
    rows = box.read_after(0, 10**9, limit_rows=n)
    assert [json.loads(r[3])["i"] for r in rows] == list(range(n))  # seq order is append order
    assert [r[0] for r in rows] == list(range(1, n + 1))
    box.close()
