"""Inference ids and feedback labels over real HTTP, a real TFLite digits model and the real SQLite outbox."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.http.app import create_app
from edge_agent.http.metrics import Metrics
from edge_agent.models.serving import ModelServer
from edge_agent.telemetry import ModelPolicy, Telemetry
from tests.apiserver import ApiServer, digits_data, infer_body
from tests.support.telemetry import outbox_records


def _telemetry(data_dir: Path, metrics: Metrics) -> Telemetry:
    return Telemetry(
        data_dir,
        registry=metrics.registry,
        policy=lambda name: ModelPolicy(True, 0.5),
        flush_interval_s=0.05,
        max_rows=None,
        max_bytes=None,
    )


@pytest.fixture
def served(tmp_path: Path, model_server: ModelServer) -> Iterator[tuple[ApiServer, Telemetry]]:
    metrics = Metrics()
    tel = _telemetry(tmp_path / "data", metrics)
    tel.start()
    with ApiServer(create_app(model_server, metrics=metrics, telemetry=tel)) as api:
        yield api, tel
    tel.stop()


def _predict(api: ApiServer, **extra: object) -> str:
    x, _ = digits_data()
    status, _, body = api.request("POST", "/v2/models/digits/infer", infer_body(x[:1], **extra))
    assert status == 200, body
    return str(json.loads(body)["id"])


def _feedback(api: ApiServer, body: object) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, out = api.request("POST", "/v2/models/digits/feedback", raw, {"Content-Type": "application/json"})
    return status, json.loads(out)


def test_ids_and_feedback_rules(served: tuple[ApiServer, Telemetry]) -> None:
    api, tel = served
    generated = _predict(api)
    assert _predict(api, id="client-7") == "client-7"
    assert generated != _predict(api)

    status, out = _feedback(api, {"id": generated, "label": 3})
    assert status == 200 and out["items"] == [{"id": generated, "label": 3, "label_name": "3"}]
    status, out = _feedback(api, {"id": generated, "label": "4"})
    assert status == 409 and "replace" in out["error"]
    assert _feedback(api, {"id": generated, "label": "4", "replace": True})[0] == 200
    assert _feedback(api, {"items": [{"id": "client-7", "label": 1}, {"id": "nope", "label": 1}]})[0] == 404
    assert _feedback(api, {"id": "client-7", "label": 2})[0] == 200  # the failed batch wrote nothing

    for bad in (10, -1, 1.5, True, None, "cat", [1]):
        status, out = _feedback(api, {"id": "client-7", "label": bad, "replace": True})
        assert status == 400, (bad, out)
        assert "label" in out["error"]
    for body in (b"{not json", b"[1]", {"id": generated}, {"label": 1}, {"items": []}, {"id": 5, "label": 1},
                 {"id": generated, "label": 1, "extra": 1}, {"id": generated, "label": 1, "replace": "yes"}):  # fmt: skip
        status, out = _feedback(api, body)
        assert status == 400 and out["error"], body
    status, _, out = api.request("POST", "/v2/models/nosuch/feedback", json.dumps({"id": "x", "label": 1}).encode())
    assert status == 404 and json.loads(out)["error"]
    status, _, _ = api.request("GET", "/v2/models/digits/feedback")
    assert status == 405

    tel.flush()
    kinds = [kind for _, kind, _ in outbox_records(tel.outbox)]
    assert kinds.count("prediction") == 3 and kinds.count("feedback") == 3


def test_feedback_after_restart_finds_the_prediction_in_the_outbox(tmp_path: Path, model_server: ModelServer) -> None:
    metrics = Metrics()
    tel = _telemetry(tmp_path / "d", metrics)
    with ApiServer(create_app(model_server, metrics=metrics, telemetry=tel)) as api:
        rid = _predict(api)
    tel.stop()  # commits the queue

    metrics = Metrics()
    tel = _telemetry(tmp_path / "d", metrics)
    try:
        with ApiServer(create_app(model_server, metrics=metrics, telemetry=tel)) as api:
            assert _feedback(api, {"id": rid, "label": 7})[0] == 200
            assert _feedback(api, {"id": rid, "label": 7})[0] == 409  # the label index survived too
    finally:
        tel.stop()


def test_cli_feedback_uses_the_same_rules(
    served: tuple[ApiServer, Telemetry], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_agent.cli.main import main

    api, tel = served
    rid = _predict(api)
    tel.flush()
    data = ["--data-dir", str(tmp_path / "data")]
    assert main(["feedback", "digits", rid, "7", "--json", *data]) == 0
    assert json.loads(capsys.readouterr().out) == {"id": rid, "label": 7, "label_name": "7"}
    assert main(["feedback", "digits", rid, "8", *data]) == 1  # 409: already labelled
    assert "replace" in capsys.readouterr().err
    assert main(["feedback", "digits", rid, "8", "--replace", *data]) == 0
    assert main(["feedback", "digits", rid, "cat", "--replace", *data]) == 1
    assert main(["feedback", "digits", "unknown-id", "1", *data]) == 1
    assert main(["feedback", "nosuch", rid, "1", *data]) == 1
