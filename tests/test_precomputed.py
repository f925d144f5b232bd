"""Precomputed-first serving over HTTP: real agent app and uvicorn, real SQLite cache, bundles from the cloud's builder.

``maintenance_scored`` declares ``precomputed`` answers in ``maintenance_scores``; the rig's score
bundles hold the model's own answers for the golden assets, so a precomputed answer must equal the
live one bit for bit. The cache's clock is injected: ages are exact. Manifest validation of the
declaration is in ``test_precomputed_manifest.py``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.http.app import create_app
from edge_agent.http.metrics import Metrics
from edge_agent.telemetry import ModelPolicy, Telemetry
from tests.apiserver import ApiServer
from tests.support.join import SET as ASSET_SET
from tests.support.precomputed import (
    ASSET,
    DECLARATION,
    ENTITIES,
    LIVE,
    MAX_AGE,
    OUT,
    SCORED,
    SCORES,
    Rig,
    body,
    probs,
    score_bundle,
)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


@pytest.fixture
def api(rig: Rig) -> Iterator[ApiServer]:
    with ApiServer(create_app(rig.server, features=rig.cache)) as server:
        yield server


def infer(api: ApiServer, payload: dict[str, Any], model: str = SCORED) -> tuple[int, dict[str, Any]]:
    status, _, raw = api.request("POST", f"/v2/models/{model}/infer", payload)
    return status, json.loads(raw)


def sources(api: ApiServer) -> dict[str, float]:
    _, _, text = api.request("GET", "/metrics")
    return {
        s.labels["source"]: s.value
        for fam in text_string_to_metric_families(text.decode())
        if fam.name == "edgefleet_infer_source"
        for s in fam.samples
        if s.name.endswith("_total") and s.labels["model"] == SCORED
    }


def test_a_fresh_row_is_answered_from_the_cache_without_the_interpreter(rig: Rig, api: ApiServer) -> None:
    rig.publish("1", age=120.0)
    model = rig.server.get(SCORED)
    calls = model.calls
    for i, entity in enumerate(ENTITIES):
        status, resp = infer(api, body(entity_id=entity))
        assert status == 200, resp
        assert resp["parameters"] == {
            "source": "precomputed",
            "precomputed": {"set": SCORES, "version": "1", "age_s": 120.0},
        }
        assert resp["model_name"] == SCORED and resp["outputs"][0]["shape"] == [1, 1]
        np.testing.assert_array_equal(probs(resp), rig.expected(LIVE[i : i + 1], ASSET[i : i + 1])[:, 0])
    # Precomputed first even when the live inputs come along; a batch of entities is one answer.
    status, resp = infer(api, body(LIVE[:1], entity_id="asset-0"))
    assert status == 200 and resp["parameters"]["source"] == "precomputed"
    order = [3, 0, 3, 7]
    status, resp = infer(api, body(entity_ids=[ENTITIES[i] for i in order]))
    assert status == 200 and resp["parameters"]["source"] == "precomputed"
    np.testing.assert_array_equal(probs(resp), rig.live_probs[order])
    assert model.calls == calls  # no interpreter ran
    assert sources(api) == {"precomputed": len(ENTITIES) + 2}


def test_a_stale_row_runs_live_with_inputs_and_is_409_without(rig: Rig, api: ApiServer) -> None:
    rig.publish("1", np.full(len(ENTITIES), 0.5, np.float32), age=MAX_AGE + 1)
    model = rig.server.get(SCORED)
    calls = model.calls
    status, resp = infer(api, body(LIVE[2:3], entity_id="asset-2"))
    assert status == 200, resp
    assert resp["parameters"]["source"] == "live"
    assert resp["parameters"]["precomputed"] == {"set": SCORES, "miss": "stale"}
    assert resp["parameters"]["features"][ASSET_SET]["version"] == "1"  # the live path joined asset_features
    np.testing.assert_array_equal(probs(resp), rig.expected(LIVE[2:3], ASSET[2:3])[:, 0])
    assert model.calls == calls + 1
    status, resp = infer(api, body(entity_id="asset-2"))
    assert status == 409
    assert resp["error"].startswith(
        "model 'maintenance_scored' has no precomputed answer for entity 'asset-2' fresh enough: its row in "
        f"feature set 'maintenance_scores' (version 1) is {MAX_AGE + 1:.1f}s old, over max_age_s 3600"
    )
    assert "send input(s) ['live'] to run it live" in resp["error"]
    # The same row is fresh again one second earlier: max_age_s is the limit, inclusive.
    rig.now -= 1
    status, resp = infer(api, body(entity_id="asset-2"))
    assert status == 200 and resp["parameters"]["source"] == "precomputed" and probs(resp)[0] == 0.5
    assert sources(api) == {"live": 1, "precomputed": 1}


def test_the_sets_own_ttl_also_makes_a_row_stale(rig: Rig, api: ApiServer) -> None:
    rig.publish("1", age=200.0, ttl_s=100.0)  # under max_age_s, over the set's ttl
    status, resp = infer(api, body(entity_id="asset-1"))
    assert status == 409 and "or the set's ttl 100s" in resp["error"]


def test_a_missing_entity_runs_live_with_inputs_and_is_404_without(rig: Rig, api: ApiServer) -> None:
    rig.publish("1", rig.live_probs[:5])  # asset-5 .. asset-7 not scored
    status, resp = infer(api, body(LIVE[6:7], entity_id="asset-6"))
    assert status == 200, resp
    assert resp["parameters"]["source"] == "live" and resp["parameters"]["precomputed"]["miss"] == "missing"
    np.testing.assert_array_equal(probs(resp), rig.live_probs[6:7])
    status, resp = infer(api, body(entity_id="asset-6"))
    assert status == 404
    assert resp["error"] == (
        "model 'maintenance_scored' has no precomputed answer for entity 'asset-6' in feature set "
        "'maintenance_scores'; send input(s) ['live'] to run it live"
    )
    # One unscored entity in a batch: the whole batch runs live (one source per answer).
    status, resp = infer(api, body(LIVE[[0, 6]], entity_ids=["asset-0", "asset-6"]))
    assert status == 200 and resp["parameters"]["source"] == "live"
    np.testing.assert_array_equal(probs(resp), rig.live_probs[[0, 6]])


def test_no_scores_cached_yet_runs_live_or_is_503(rig: Rig, api: ApiServer) -> None:
    status, resp = infer(api, body(LIVE[:1], entity_id="asset-0"))
    assert status == 200 and resp["parameters"]["precomputed"] == {"set": SCORES, "miss": "not_cached"}
    status, resp = infer(api, body(entity_id="asset-0"))
    assert status == 503 and "feature set 'maintenance_scores' is not cached on this device" in resp["error"]
    # Without an entity the request is a plain live one, still labelled.
    status, resp = infer(api, {"inputs": body(LIVE[:1])["inputs"] + [_asset(ASSET[:1])]})
    assert status == 200 and resp["parameters"] == {
        "source": "live",
        "precomputed": {"set": SCORES, "miss": "no_entity"},
    }


def _asset(rows: np.ndarray) -> dict[str, Any]:
    return {"name": "asset_features", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}


def test_a_joined_model_and_a_precomputed_model_side_by_side(rig: Rig, api: ApiServer) -> None:
    rig.publish("1", np.full(len(ENTITIES), 0.25, np.float32))
    status, _, meta = api.request("GET", f"/v2/models/{SCORED}")
    assert status == 200 and json.loads(meta)["parameters"]["precomputed"] == DECLARATION
    assert "precomputed" not in json.loads(api.request("GET", "/v2/models/maintenance")[2])["parameters"]
    for i, entity in enumerate(ENTITIES):
        status, joined = infer(api, body(LIVE[i : i + 1], entity_id=entity), model="maintenance")
        assert status == 200 and "source" not in joined["parameters"]  # a model without precomputed: as before
        assert joined["parameters"]["features"][ASSET_SET]["version"] == "1"
        np.testing.assert_array_equal(probs(joined), rig.live_probs[i : i + 1])
        status, scored = infer(api, body(LIVE[i : i + 1], entity_id=entity))
        assert status == 200 and scored["parameters"]["source"] == "precomputed" and probs(scored)[0] == 0.25


def test_bad_requests_to_a_precomputed_model_are_4xx(rig: Rig, api: ApiServer) -> None:
    rig.publish("1")
    cases = [
        (body(LIVE[:2], entity_id="asset-0"), 400, "input 'live' has a batch of 2 but the request names 1 entity"),
        (body(entity_id=""), 400, "parameters.entity_id must be a non-empty string"),
        (body(entity_id="asset-0", entity_ids=["asset-1"]), 400, "not both"),
        ({**body(entity_id="asset-0"), "outputs": [{"name": "nope"}]}, 400, "unknown output 'nope'"),
        (body(entity_ids=["asset-0"] * 100_000), 400, "batch size 100000 is over"),
        (body(), 400, "name the entity in parameters.entity_id"),
    ]
    for payload, code, message in cases:
        status, resp = infer(api, payload)
        assert status == code and message in resp["error"], (payload.get("parameters"), resp)


def test_raw_quantized_outputs_are_the_live_integers(rig: Rig, api: ApiServer) -> None:
    rig.publish("1")
    payload = {**body(entity_id="asset-4"), "outputs": [{"name": OUT, "parameters": {"quantized": True}}]}
    status, pre = infer(api, payload)
    assert status == 200 and pre["parameters"]["source"] == "precomputed"
    live = {**body(LIVE[4:5]), "outputs": payload["outputs"]}
    live["inputs"].append(_asset(ASSET[4:5]))
    status, ran = infer(api, live)
    assert status == 200 and ran["parameters"]["precomputed"]["miss"] == "no_entity"
    assert pre["outputs"][0]["datatype"] == ran["outputs"][0]["datatype"] == "INT16"
    assert pre["outputs"][0]["data"] == ran["outputs"][0]["data"]


def test_a_new_bundle_switches_every_answer_at_once(rig: Rig, api: ApiServer) -> None:
    """Requests for all assets while versions 2..13 are applied: each answer is one version's rows, never a mix."""
    table = {str(v): (np.arange(len(ENTITIES), dtype=np.float32) + 16 * v) / 1024 for v in range(1, 14)}
    rig.publish("1", table["1"])
    # The bundles are built before the race, so the applies follow each other as fast as they can.
    paths = [score_bundle(rig.reg, rig.tmp, v, table[v], scored_at=rig.now - 1) for v in map(str, range(2, 14))]
    done, answered = threading.Event(), threading.Event()
    seen: list[tuple[str, np.ndarray]] = []

    def ask() -> None:
        while not done.is_set():
            status, resp = infer(api, body(entity_ids=ENTITIES))
            assert status == 200, resp
            seen.append((resp["parameters"]["precomputed"]["version"], probs(resp)))
            answered.set()

    reader = threading.Thread(target=ask)
    reader.start()
    try:
        # The applies start once the reader is answered (version 1): on a loaded host its first request
        # could otherwise come after all twelve, and the race would not be run.
        assert answered.wait(60), "the reader got no answer"
        for path in paths:
            rig.cache.apply(path)
    finally:
        done.set()
        reader.join()
    ask_once = infer(api, body(entity_ids=ENTITIES))[1]
    seen.append((ask_once["parameters"]["precomputed"]["version"], probs(ask_once)))
    for version, values in seen:
        np.testing.assert_array_equal(values, table[version], err_msg=f"mixed answer under version {version}")
    assert seen[-1][0] == "13" and len({v for v, _ in seen}) >= 2


def test_a_large_body_takes_the_worker_thread_path_precomputed_first_too(rig: Rig, api: ApiServer) -> None:
    rig.publish("1")
    payload = body(entity_id="asset-3", note="x" * 300_000)  # over OFFLOAD_BODY_BYTES: infer_sync in a thread
    status, resp = infer(api, payload)
    assert status == 200 and resp["parameters"]["source"] == "precomputed"
    np.testing.assert_array_equal(probs(resp), rig.live_probs[3:4])
    status, resp = infer(api, body(LIVE[:1], entity_id="asset-3", note="x" * 300_000), model="maintenance")
    assert status == 200 and "source" not in resp["parameters"]


def test_precomputed_answers_have_ids_that_take_feedback(rig: Rig, tmp_path: Path) -> None:
    metrics = Metrics()
    tel = Telemetry(
        tmp_path / "tel", registry=metrics.registry, policy=lambda m: ModelPolicy(True, 1.0), flush_interval_s=0.05,
        max_rows=None, max_bytes=None,
    )  # fmt: skip
    tel.start()
    try:
        rig.publish("1")
        with ApiServer(create_app(rig.server, features=rig.cache, metrics=metrics, telemetry=tel)) as api:
            status, resp = infer(api, body(entity_id="asset-5"))
            assert status == 200 and resp["parameters"]["source"] == "precomputed" and resp["id"]
            status, _, out = api.request("POST", f"/v2/models/{SCORED}/feedback", {"id": resp["id"], "label": 1.0})
            assert status == 200, out
            tel.flush()
    finally:
        tel.stop()
