"""Prediction packs in the outbox and on the wire: the bound trims them record by record, old outboxes migrate,
and the cloud's decoder refuses a bad pack alone."""

from __future__ import annotations

import json
import sqlite3
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.errors import TelemetryRejected
from edge_agent.models.serving import ModelServer
from edge_agent.telemetry.outbox import Outbox, Row
from edge_agent.telemetry.rows import PACK_BYTES, Item, prediction_rows
from edge_agent.wire.telemetry import decode_batch, encode_rows
from edge_agent.wire.telemetry.pack import significant6
from tests.support.telemetry import outbox_records


def _items(server: ModelServer, start: int, n: int, every: int = 0) -> list[Item]:
    model = server.get("digits")
    xs = np.random.default_rng(start).random((n, 1, 8, 8, 1)).astype(np.float32)
    return [
        (model.manifest, f"r{start + i}", 0.001, 1e9 + start + i, {"pixels": x}, model.predict({"pixels": x}),
         None, bool(every) and i % every == 0)
        for i, x in enumerate(xs)
    ]  # fmt: skip


def _pack(server: ModelServer, start: int, n: int, every: int = 0) -> Row:
    rows, _ = prediction_rows(_items(server, start, n, every))
    assert len(rows) == 1 and rows[0].n == n
    return rows[0]


def test_the_bound_trims_the_oldest_pack_and_counts_every_prediction(tmp_path: Path, model_server: ModelServer) -> None:
    box = Outbox(tmp_path / "t.db", max_rows=100)
    box.append([_pack(model_server, 0, 60, every=4), Row("feedback", 1.0, '{"label":1}', "digits", "r1")])
    box.append([_pack(model_server, 60, 60, every=4)])
    box.append([_pack(model_server, 120, 60, every=4)])
    records = outbox_records(box)
    preds = [(seq, b["request_id"]) for seq, kind, b in records if kind == "prediction"]
    # 181 records, 100 allowed: the oldest pack (60) goes whole, the next loses its oldest 21; feedback stays.
    assert box.dropped() == {"prediction": 81} and box.stats().rows == 100
    assert preds == [(83 + i, f"r{81 + i}") for i in range(99)], "the newest 99 predictions, seqs unchanged"
    assert [kind for _, kind, _ in records].count("feedback") == 1
    kept = {b["request_id"]: b for _, kind, b in records if kind == "prediction"}
    assert ["inputs" in kept[f"r{i}"] for i in range(84, 92)] == [True, False, False, False] * 2
    assert box.find_prediction("r80") is None and box.find_prediction("r81") == "digits"
    assert box.ack(box.stats().last_seq) == 100 and box.stats().rows == 0
    box.close()


def test_over_max_bytes_a_pack_gives_up_its_samples_first(tmp_path: Path, model_server: ModelServer) -> None:
    rows = [_pack(model_server, 0, 40, every=1), _pack(model_server, 40, 40, every=1)]
    box = Outbox(tmp_path / "t.db", max_bytes=len(rows[1].body) + 4096)
    box.append(rows)
    records = outbox_records(box)
    assert box.dropped() == {"inputs": 40} and len(records) == 80, "40 samples went, every prediction stayed"
    assert all(b.get("inputs_dropped") and "inputs" not in b for _, _, b in records[:40])
    assert all("inputs" in b and "inputs_dropped" not in b for _, _, b in records[40:])
    box.close()


def test_an_outbox_from_before_packs_migrates_and_keeps_its_seqs(tmp_path: Path, model_server: ModelServer) -> None:
    path = tmp_path / "t.db"
    db = sqlite3.connect(path)
    db.executescript(
        """CREATE TABLE records (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, ts REAL NOT NULL, model TEXT,
            request_id TEXT, has_inputs INTEGER NOT NULL DEFAULT 0, size INTEGER NOT NULL, body TEXT NOT NULL);
        CREATE INDEX records_request ON records(request_id) WHERE request_id IS NOT NULL;
        CREATE INDEX records_inputs ON records(seq) WHERE has_inputs = 1;
        CREATE TABLE labels (request_id TEXT PRIMARY KEY, model TEXT NOT NULL, seq INTEGER NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"""
    )
    body = '{"model":"digits","request_id":"old-1","outputs":{}}'
    db.executemany(
        "INSERT INTO records(kind, ts, model, request_id, has_inputs, size, body) VALUES (?,?,?,?,?,?,?)",
        [("prediction", 1.0, "digits", f"old-{i}", 0, len(body), body) for i in range(1, 8)],
    )
    db.execute("DELETE FROM records WHERE seq <= 5")  # acked: the counter stays at 7
    db.commit()
    db.close()
    box = Outbox(path)
    assert box.stats().rows == 2 and box.stats().last_seq == 7 and box.find_prediction("old-6") == "digits"
    assert box.append([_pack(model_server, 0, 3)]) == 10, "numbered after the highest seq ever used"
    assert [seq for seq, _, _ in outbox_records(box)] == [6, 7, 8, 9, 10] and box.find_prediction("r2") == "digits"
    box.close()


def _wire(rows: list[tuple[int, str, float, str]], first: int = 1) -> bytes:
    return encode_rows("dev-1", "f", first, rows, {})


def test_a_bad_pack_is_refused_alone_and_acked_records_are_not_sent_again(model_server: ModelServer) -> None:
    good, other = _pack(model_server, 0, 5), _pack(model_server, 5, 4)
    doc = json.loads(other.body)
    doc["ids"] = doc["ids"][:3]
    batch = decode_batch(_wire([(5, good.kind, good.ts, good.body), (9, other.kind, other.ts, json.dumps(doc))]))
    assert [r.seq for r in batch.records] == [1, 2, 3, 4, 5]
    assert batch.rejects == ((9, "pack 9: pack ids must be a list of 4 str"),)
    doc = json.loads(_pack(model_server, 5, 4, every=1).body)
    doc["inputs"][0].pop("datatype")
    doc["inputs"].append({"name": "x", "rows": [0], "shape": [1], "data": [1.0]})  # no b64: not a pack's
    for damaged in ({**doc, "inputs": doc["inputs"][:1]}, {**doc, "inputs": doc["inputs"][1:]}):
        batch = decode_batch(_wire([(9, "predictions", 1.0, json.dumps(damaged))]))
        assert not batch.records and len(batch.rejects) == 1 and "pack 9" in batch.rejects[0][1]
    # An ack that fell inside a pack: the batch covers 4.., so seqs 1-3 are not delivered twice.
    batch = decode_batch(_wire([(5, good.kind, good.ts, good.body)], first=4))
    assert [(r.seq, r.body["request_id"]) for r in batch.records] == [(4, "r3"), (5, "r4")]
    overlapping = decode_batch(_wire([(5, good.kind, good.ts, good.body), (7, other.kind, other.ts, other.body)]))
    assert [r.seq for r in overlapping.records] == [1, 2, 3, 4, 5] and "not after 5" in overlapping.rejects[0][1]


_FIELDS = ("n", "ids", "ts", "latency_ms", "outputs", "entity_ids", "inputs", "inputs_dropped", "model")
_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(), st.text(max_size=8),
    st.lists(st.integers(-2, 40), max_size=6), st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
    st.just({"shape": [2], "datatype": "FP32", "b64": "AAAA"}), st.just({"top_k": {"index": 1, "score": 2}}),
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(field=st.sampled_from(_FIELDS), value=_VALUES, seq=st.integers(1, 50))
def test_any_damage_to_a_pack_is_a_reject_never_an_exception(
    model_server: ModelServer, field: str, value: Any, seq: int
) -> None:
    row = _pack(model_server, 0, 6, every=2)
    doc = json.loads(row.body)
    doc[field] = value
    try:
        text = json.dumps(doc, allow_nan=False)
    except ValueError:
        return
    payload = zlib.compress(
        json.dumps({"schema_version": 1, "device_id": "d", "fleet": "f", "first_seq": 1, "last_seq": seq,
                    "dropped": {}, "records": [{"seq": seq, "kind": "predictions", "ts": 1.0, "body": json.loads(text)}]})
        .encode()
    )  # fmt: skip
    try:
        batch = decode_batch(payload)
    except TelemetryRejected:
        return
    assert len(batch.records) + len(batch.rejects) >= 1
    assert all(r.kind == "prediction" and 1 <= r.seq <= seq for r in batch.records)


def test_large_outputs_make_smaller_packs_that_each_fit_a_batch(model_server: ModelServer) -> None:
    manifest = model_server.get("digits").manifest
    rng = np.random.default_rng(5)
    items: list[Item] = [
        (manifest, f"big-{i}", 0.001, 1e9 + i, {}, {"probs": rng.random((1, 200, 10)).astype(np.float32)}, None, False)
        for i in range(30)
    ]
    rows, _ = prediction_rows(items)
    assert sum(r.n for r in rows) == 30 and len(rows) > 1, "30 x 200 rows of top-k do not go in one pack"
    assert all(len(r.body) <= PACK_BYTES + 4096 for r in rows)
    seq = 0
    for row in rows:
        seq += row.n
        batch = decode_batch(_wire([(seq, row.kind, row.ts, row.body)]))  # encode_rows refuses > 128 KiB
        assert all(len(r.body["outputs"]["probs"]["top_k"]) == 200 for r in batch.records)


def test_scores_round_to_six_significant_digits_exactly_as_printf_does() -> None:
    rng = np.random.default_rng(7)
    x = np.concatenate([
        rng.random(20_000).astype(np.float32),
        (rng.standard_normal(20_000) * 10.0 ** rng.integers(-40, 38, 20_000)).astype(np.float32),
        np.array([0.0, -0.0, 1.0, 0.5, 0.7, 123456789.0, 1e-40, 3.4e38], np.float32),
    ])  # fmt: skip
    want = np.array([float(f"{float(v):.6g}") for v in x])
    assert np.array_equal(significant6(x), want)
    odd = significant6(np.array([np.nan, np.inf, -np.inf], np.float32))
    assert np.isnan(odd[0]) and list(odd[1:]) == [np.inf, -np.inf]


def test_id_lookups_follow_new_trimmed_and_acked_packs(tmp_path: Path, model_server: ModelServer) -> None:
    box = Outbox(tmp_path / "t.db", max_rows=100)
    box.append([_pack(model_server, 0, 60)])
    assert box.find_prediction("r0") == "digits" and box.find_prediction("r60") is None  # the id hashes, built
    box.append([_pack(model_server, 60, 60)])  # 120 records, 100 allowed: the first pack loses r0..r19
    assert [box.find_prediction(f"r{i}") for i in (19, 20, 60, 119)] == [None, "digits", "digits", "digits"]
    assert box.ack(60) == 40  # the first pack (seq 60) is stored in the cloud
    assert [box.find_prediction(f"r{i}") for i in (20, 59, 60)] == [None, None, "digits"]
    assert box.find_prediction("never-issued") is None and box.find_prediction('r6"') is None
    box.close()
