"""Prediction packs built per flush (``telemetry.rows``): expanded by the cloud into the records a per-record agent sends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cloud_batch.ingest.labeled import labeled_rows
from cloud_batch.ingest.store import TelemetryStore
from edge_agent.models.serving import ModelServer
from edge_agent.telemetry.ids import IdIndex, IdSource
from edge_agent.telemetry.outbox import Outbox, Row
from edge_agent.telemetry.recorder import ModelPolicy, Recorder
from edge_agent.telemetry.rows import PACK_INPUT_BYTES, Item, output_text, prediction_rows
from edge_agent.wire.model.manifest import Manifest
from edge_agent.wire.telemetry import (
    TelemetryBatch,
    TelemetryRecord,
    decode_batch,
    encode_batch,
    encode_rows,
    sample_array,
)
from edge_agent.wire.telemetry.pack import MAX_PACK, expand, tensor_text
from edge_agent.wire.topics import telemetry_topic


def _items(server: ModelServer, n: int, sampled: set[int]) -> tuple[Manifest, list[Item]]:
    model = server.get("digits")
    xs = np.random.default_rng(3).random((n, 1, 8, 8, 1)).astype(np.float32) * 16
    items: list[Item] = []
    for i, x in enumerate(xs):
        out = model.predict({"pixels": x})
        entity: Any = {0: None, 1: "asset-\u00e9", 2: 7}[i % 3]
        items.append((model.manifest, f'r"{i}', 0.000123 * (i + 1), 1e9 + i, {"pixels": x}, out, entity, i in sampled))
    return model.manifest, items


def _records(rows: list[Row]) -> list[TelemetryRecord]:
    """``rows`` as the cloud reads them: one batch through the wire codec (packs expanded)."""
    seq, wire = 0, []
    for row in rows:
        seq += row.n
        wire.append((seq, row.kind, row.ts, row.body))
    return list(decode_batch(encode_rows("d1", "f", 1, wire, {})).records)


def test_packs_carry_top_k_latency_entity_and_exact_sampled_inputs(model_server: ModelServer) -> None:
    manifest, items = _items(model_server, 40, sampled={3, 17, 39})
    rows, left_out = prediction_rows(items)
    assert left_out == 0 and [(r.kind, r.n, r.has_inputs) for r in rows] == [("predictions", 40, 3)]
    assert json.loads(rows[0].request_id or "") == [item[1] for item in items]  # what find_prediction searches
    records = _records(rows)
    assert [r.seq for r in records] == list(range(1, 41)) and {r.kind for r in records} == {"prediction"}
    for rec, item in zip(records, items, strict=True):
        body = rec.body
        _, rid, latency, ts, inputs, outputs, entity, sampled = item
        probs = outputs["probs"][0].astype(np.float64)
        top = body["outputs"]["probs"]["top_k"]
        assert [c for c, _ in top] == list(np.argsort(-probs, kind="stable")[:3])
        assert np.allclose([s for _, s in top], probs[[c for c, _ in top]], rtol=1e-5, atol=1e-7)
        assert (body["model"], body["version"], body["request_id"]) == ("digits", manifest.version, rid)
        assert body["latency_ms"] == round(latency * 1000, 3) and rec.ts == ts
        assert body.get("entity_id") == entity
        assert sampled == ("inputs" in body)
        if sampled:
            tensor = body["inputs"]["pixels"]
            assert tensor["datatype"] == "FP32" and tensor["shape"] == [1, 8, 8, 1]
            assert np.array_equal(sample_array(tensor), inputs["pixels"])  # lossless, unlike decimal text


def test_packs_split_by_model_shape_size_and_sampled_bytes(model_server: ModelServer) -> None:
    manifest, items = _items(model_server, 600, sampled=set(range(300, 600)))
    batch = model_server.get("digits").predict({"pixels": np.zeros((2, 8, 8, 1), np.float32)})
    items.insert(5, (manifest, "batch-of-2", 0.001, 2e9, {}, batch, None, False))
    rows, _ = prediction_rows(items)
    assert sum(r.n for r in rows) == 601 and max(r.n for r in rows) <= MAX_PACK
    assert [r.n for r in rows if "batch-of-2" in (r.request_id or "")] == [1], "outputs of another shape: own pack"
    assert all(r.has_inputs * 256 <= PACK_INPUT_BYTES for r in rows), "a pack's sampled bytes are bounded"
    records = _records(rows)
    assert sorted(r.body["request_id"] for r in records) == sorted(item[1] for item in items)
    assert {r.seq for r in records} == set(range(1, 602))
    two = next(r.body for r in records if r.body["request_id"] == "batch-of-2")
    assert len(two["outputs"]["probs"]["top_k"]) == 2, "one top-k per row of a batch"


def _expand(column: str, n: int) -> list[object]:
    pack = {"model": "m", "version": "1", "n": n, "ids": [str(i) for i in range(n)],
            "ts": json.loads(tensor_text(np.zeros(n))), "latency_ms": json.loads(tensor_text(np.zeros(n, np.float32))),
            "outputs": {"o": json.loads(column)}}  # fmt: skip
    return [body["outputs"]["o"] for _, _, body in expand(n, pack)]


def test_every_output_shape_expands_to_valid_json_and_non_finite_values_become_null() -> None:
    probs = np.array([[[0.1, 0.7, 0.2]], [[np.nan, 0.5, 0.4]]], np.float32)
    assert _expand(output_text(probs, True), 2) == [
        {"top_k": [[1, 0.7], [2, 0.2], [0, 0.1]]},
        {"top_k": [[1, 0.5], [2, 0.4], [0, None]]},
    ]
    per_row = np.arange(20, dtype=np.float32).reshape(2, 2, 5)  # a batch of 2 rows per prediction
    want = {"top_k": [[[4, 14.0], [3, 13.0], [2, 12.0]], [[4, 19.0], [3, 18.0], [2, 17.0]]]}
    assert _expand(output_text(per_row, True), 2)[1] == want
    small = np.array([[1.5, np.inf], [2.25, 3.0]])
    assert _expand(output_text(small, False), 2) == [[1.5, None], [2.25, 3.0]]
    assert _expand(output_text(np.array([4, 5], np.int64), False), 2) == [4, 5]
    assert _expand(output_text(np.zeros((1, 1, 2)), False), 1) == [[[0.0, 0.0]]]


def test_labeled_training_rows_read_the_sampled_bytes_back(model_server: ModelServer, tmp_path: Path) -> None:
    _, items = _items(model_server, 6, sampled={1, 4})
    rows, _ = prediction_rows(items)
    records = _records(rows)
    records += [
        TelemetryRecord(7 + k, "feedback", 2e9, {"model": "digits", "request_id": items[i][1], "label": k})
        for k, i in enumerate((1, 2, 4))
    ]
    with TelemetryStore(tmp_path / "store", "f") as store:
        store.commit([(telemetry_topic("f", "d1"), encode_batch(TelemetryBatch("d1", "f", 1, 9, tuple(records))))])
    table = {r["request_id"]: r for r in labeled_rows(tmp_path / "store", "digits").to_pylist()}
    assert set(table) == {items[1][1], items[4][1]}  # item 2 is labeled but its inputs were not sampled
    for i in (1, 4):
        assert table[items[i][1]]["pixels"] == items[i][4]["pixels"].astype(np.float64).ravel().tolist()
        assert table[items[i][1]]["pixels_shape"] == [1, 8, 8, 1]


def test_the_recent_id_index_keeps_the_newest_ids_after_the_outbox_let_go(
    tmp_path: Path, model_server: ModelServer
) -> None:
    model = model_server.get("digits")
    box = Outbox(tmp_path / "t.db")
    recorder = Recorder(box, lambda m: ModelPolicy(), index_size=100)
    x = np.zeros((1, 8, 8, 1), np.float32)
    out = model.predict({"pixels": x})
    for start in (0, 120, 240):
        for i in range(start, start + 120):
            recorder.prediction(model.manifest, f"r{i}", 0.001, {"pixels": x}, out)
        recorder.flush()
    assert box.ack(box.stats().last_seq) == 360  # uploaded: only the in-memory index remembers them
    assert [recorder.known(f"r{i}") for i in (259, 260, 359)] == [None, "digits", "digits"]
    box.close()


def test_generated_ids_are_indexed_without_a_string_per_request_and_client_ids_stay_bounded() -> None:
    ids = IdSource()
    index = IdIndex(ids, size=100)
    for i in range(250):
        index.add(ids(), "digits" if i % 2 else "maintenance")
    index.add("client-1", "digits")
    assert index.get(f"{ids.prefix}-250") == "digits" and index.get(f"{ids.prefix}-151") == "maintenance"
    assert index.get(f"{ids.prefix}-150") is None, "overwritten by 250: older than the newest 100"
    for spoof in (f"{ids.prefix}-251", f"{ids.prefix}-x", "00000000-250", f"{ids.prefix}-{'9' * 40}"):
        assert index.get(spoof) is None, spoof
    index.add(f"{ids.prefix}-999", "digits")  # not issued yet: a client's id, kept as a string
    assert index.get(f"{ids.prefix}-999") == "digits" and index.get("client-1") == "digits"
    for i in range(150):
        index.add(f"c{i}", "digits")
    index.trim()
    assert index.get("client-1") is None and index.get("c149") == "digits" and index.get("c50") == "digits"
    assert index.get("c49") is None
