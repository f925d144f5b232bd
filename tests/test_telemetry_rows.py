"""Prediction rows built per flush (``telemetry.rows``): the same records as a per-record encoder, valid JSON always."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cloud_batch.ingest.labeled import labeled_rows
from cloud_batch.ingest.store import TelemetryStore
from edge_agent.models.serving import ModelServer
from edge_agent.telemetry.ids import IdIndex, IdSource
from edge_agent.telemetry.outbox import Outbox
from edge_agent.telemetry.recorder import ModelPolicy, Recorder
from edge_agent.telemetry.rows import Item, output_texts, prediction_rows
from edge_agent.wire.model.manifest import Manifest
from edge_agent.wire.telemetry import TelemetryBatch, TelemetryRecord, encode_batch, sample_array
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


def test_rows_carry_top_k_latency_entity_and_exact_sampled_inputs(model_server: ModelServer) -> None:
    manifest, items = _items(model_server, 40, sampled={3, 17, 39})
    rows, left_out = prediction_rows(items)
    assert left_out == 0 and len(rows) == 40
    for row, item in zip(rows, items, strict=True):
        body = json.loads(row.body)
        _, rid, latency, ts, inputs, outputs, entity, sampled = item
        probs = outputs["probs"][0].astype(np.float64)
        top = body["outputs"]["probs"]["top_k"]
        assert [c for c, _ in top] == list(np.argsort(-probs, kind="stable")[:3])
        assert np.allclose([s for _, s in top], probs[[c for c, _ in top]], rtol=1e-5, atol=1e-7)
        assert (body["model"], body["version"], body["request_id"]) == ("digits", manifest.version, rid)
        assert body["latency_ms"] == round(latency * 1000, 3) and (row.ts, row.request_id) == (ts, rid)
        assert body.get("entity_id") == entity
        assert row.has_inputs == sampled == ("inputs" in body)
        if sampled:
            tensor = body["inputs"]["pixels"]
            assert tensor["datatype"] == "FP32" and tensor["shape"] == [1, 8, 8, 1]
            assert np.array_equal(sample_array(tensor), inputs["pixels"])  # lossless, unlike decimal text


def test_every_output_shape_renders_valid_json_and_non_finite_values_become_null() -> None:
    probs = np.array([[[0.1, 0.7, 0.2]], [[np.nan, 0.5, 0.4]]], np.float32)
    assert [json.loads(t) for t in output_texts(probs, True)] == [
        {"top_k": [[1, 0.7], [2, 0.2], [0, 0.1]]},
        {"top_k": [[1, 0.5], [2, 0.4], [0, None]]},
    ]
    per_row = np.arange(20, dtype=np.float32).reshape(2, 2, 5)  # a batch of 2 rows per prediction
    want = {"top_k": [[[4, 14.0], [3, 13.0], [2, 12.0]], [[4, 19.0], [3, 18.0], [2, 17.0]]]}
    assert json.loads(output_texts(per_row, True)[1]) == want
    small = np.array([[1.5, np.inf], [2.25, 3.0]])
    assert [json.loads(t) for t in output_texts(small, False)] == [[1.5, None], [2.25, 3.0]]
    assert [json.loads(t) for t in output_texts(np.array([4, 5], np.int64), False)] == [4, 5]
    assert [json.loads(t) for t in output_texts(np.zeros((1, 1, 2)), False)] == [[[0.0, 0.0]]]


def test_labeled_training_rows_read_the_sampled_bytes_back(model_server: ModelServer, tmp_path: Path) -> None:
    _, items = _items(model_server, 6, sampled={1, 4})
    rows, _ = prediction_rows(items)
    records = [TelemetryRecord(i + 1, "prediction", r.ts, json.loads(r.body)) for i, r in enumerate(rows)]
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
