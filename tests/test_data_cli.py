"""``cloud-batch data summary`` and ``data labeled`` over a real store (Parquet + ledger), through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cloud_batch.cli.main import main
from cloud_batch.ingest.store import TelemetryStore
from edge_agent.wire.telemetry import TelemetryBatch, TelemetryRecord, encode_batch
from edge_agent.wire.topics import telemetry_topic
from tests.support.telemetry_device import T0, payload

FLEET = "f1"


def extra_batch(device: str, first: int) -> bytes:
    """A relabel (replace) of request r1, a drift summary and an event, from seq ``first``."""
    recs = (
        TelemetryRecord(
            first, "feedback", T0 + 500, {"model": "digits", "request_id": f"{device}-r9", "label": 8, "replace": True}
        ),
        TelemetryRecord(
            first + 1,
            "drift",
            T0 + 501,
            {"model": "digits", "version": "1", "window": 1000, "psi": {"pixels.c0": 0.31}, "output_psi": 0.02},
        ),
        TelemetryRecord(first + 2, "event", T0 + 502, {"type": "restart"}),
    )
    return encode_batch(TelemetryBatch(device, FLEET, first, first + 2, recs, {"prediction": 3}))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    with TelemetryStore(root, FLEET) as s:
        s.commit(
            [
                (telemetry_topic(FLEET, "d1"), payload(FLEET, "d1", 1, 20)),  # labels for r9 and r19
                (telemetry_topic(FLEET, "d1"), extra_batch("d1", 21)),
                (telemetry_topic(FLEET, "d2"), payload(FLEET, "d2", 1, 5)),
                (telemetry_topic(FLEET, "d2"), payload(FLEET, "d2", 9, 10)),  # 6..8 never arrive
                (telemetry_topic(FLEET, "d2"), b"junk"),
            ]
        )
    return root


def test_summary_json(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "summary", "--store", str(store), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    d1, d2 = s["devices"]["d1"], s["devices"]["d2"]
    assert d1["rows"] == {"prediction": 18, "feedback": 3, "drift": 1, "event": 1}
    assert d1["dropped"] == {"prediction": 3} and d1["acked_seq"] == 23
    assert d1["drift"]["digits"]["psi"] == {"pixels.c0": 0.31}
    assert d2["gaps"] == [[6, 8]] and d2["acked_seq"] == 5
    digits = s["models"]["digits"]
    assert digits["predictions"] == 18 + 6 and digits["labeled"] == 2 + 1  # d1 r9, r19; d2 r9
    assert s["rejections"]["count"] == 1


def test_summary_text_shows_drift_and_gaps(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "summary", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "pixels.c0=0.310" in out and "(drift)" in out and "rejected messages/records: 1" in out


def test_labeled_joins_sampled_inputs_with_the_latest_label(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "digits.parquet"
    assert main(["data", "labeled", "digits", "--store", str(store), "--out", str(out)]) == 0
    rows = {r["request_id"]: r for r in pq.read_table(out).to_pylist()}
    # sampled predictions are seq % 5 == 4 (r4, r9, r14, r19); labelled are r9 and r19
    assert set(rows) == {"d1-r9", "d1-r19", "d2-r9"}
    assert rows["d1-r9"]["label"] == 8  # replaced: 9 % 7 = 2 first, then 8
    assert rows["d1-r19"]["label"] == 20 % 7
    assert rows["d1-r9"]["pixels"] == [9.0, 1.5] and rows["d1-r9"]["pixels_shape"] == [1, 2]


def test_bad_store_and_unknown_model_are_clear_errors(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "summary", "--store", str(tmp_path / "nowhere")]) == 2
    assert "not a telemetry store" in capsys.readouterr().err
    assert main(["data", "labeled", "nope", "--store", str(store), "--out", str(tmp_path / "x.parquet")]) == 2
    assert "no labeled predictions" in capsys.readouterr().err
