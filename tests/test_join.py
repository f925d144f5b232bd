"""Request-time feature joins on the shipped maintenance model: real SQLite cache, real runtime, real HTTP server.

The cache holds the golden samples' ``asset_features`` rows as entities ``asset-0`` … ``asset-7``,
written in *reversed* feature order (the join must reorder them into the manifest's column order).
A request names the entity and sends only ``live``; the answer must be the one the model gives
for both inputs sent explicitly. The cache's clock is injected, so ages and TTLs are exact.
The manifest's ``feature_joins`` declaration is checked in ``test_join_manifest.py``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.features.cache import DB_FILE, FeatureCache
from edge_agent.http.app import create_app
from edge_agent.models.serving import ModelServer
from edge_agent.models.store import ModelStore
from edge_agent.wire.bundle import FeatureSpec, write_bundle
from edge_agent.wire.model.manifest import MANIFEST_FILE
from tests.apiserver import ApiServer
from tests.support.join import FEATURES, MAINT, SET

T0 = 1_800_000_000.0
TTL = 3600.0
OUT = "failure_prob"

with np.load(MAINT / "golden.npz") as _g:
    LIVE, ASSET, GOLDEN_OUT = _g["in:live"], _g["in:asset_features"], _g["out:failure_prob"]
ENTITIES = [f"asset-{i}" for i in range(len(ASSET))]


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def snapshot(
    tmp: Path,
    version: str,
    *,
    policy: str = "reject",
    order: list[str] | None = None,
    ttl_s: float | None = TTL,
    entities: list[str] = ENTITIES,
    ts: float = T0 - 100,
) -> Path:
    """The golden rows as a bundle whose columns follow ``order`` (default: reversed manifest order)."""
    order = order or FEATURES[::-1]
    cols = [FEATURES.index(f) for f in order]
    path = tmp / f"bundle-{version}"
    write_bundle(
        path,
        SET,
        version,
        "snapshot",
        entities,
        ts,
        ASSET[: len(entities)][:, cols],
        [FeatureSpec(f, "float32") for f in order],
        ttl_s=ttl_s,
        stale_policy=policy,
    )
    return path


def live_body(rows: np.ndarray, **params: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [{"name": "live", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]
    }
    if params:
        body["parameters"] = params
    return body


def explicit_body(live: np.ndarray, asset: np.ndarray) -> dict[str, Any]:
    body = live_body(live)
    body["inputs"].append(
        {"name": "asset_features", "shape": list(asset.shape), "datatype": "FP32", "data": asset.ravel().tolist()}
    )
    return body


def with_default(tmp: Path, default: list[float]) -> Path:
    """Maintenance version 2: the same model, its join declaring a default row for unknown assets."""
    out = tmp / "maintenance-2"
    shutil.copytree(MAINT, out)
    raw = json.loads((out / MANIFEST_FILE).read_text())
    raw["version"] = "2"
    raw["feature_joins"]["asset_features"]["default"] = default
    (out / MANIFEST_FILE).write_text(json.dumps(raw))
    return out


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = ModelStore(tmp / "data")
        self.store.install_dir(MAINT)
        self.server = ModelServer(self.store)
        self.server.sync()
        self.clock = Clock()
        self.cache = FeatureCache(tmp / "data" / DB_FILE, clock=self.clock)
        self.cache.apply(snapshot(tmp, "3"))

    def infer(self, api: ApiServer, body: dict[str, Any], model: str = "maintenance") -> tuple[int, dict[str, Any]]:
        status, _, raw = api.request("POST", f"/v2/models/{model}/infer", body)
        return status, json.loads(raw)

    def expected(self, live: np.ndarray, asset: np.ndarray) -> np.ndarray:
        return self.server.get("maintenance").predict({"live": live, "asset_features": asset})[OUT]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.server.stop()
    r.cache.close()


@pytest.fixture
def api(rig: Rig) -> Iterator[ApiServer]:
    with ApiServer(create_app(rig.server, features=rig.cache)) as server:
        yield server


def output(resp: dict[str, Any]) -> np.ndarray:
    (out,) = resp["outputs"]
    assert out["name"] == OUT
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


# -- the join --------------------------------------------------------------------------------
def test_a_joined_request_answers_like_both_inputs_sent_explicitly(rig: Rig, api: ApiServer) -> None:
    for i, entity in enumerate(ENTITIES):
        status, joined = rig.infer(api, live_body(LIVE[i : i + 1], entity_id=entity))
        assert status == 200, joined
        status, plain = rig.infer(api, explicit_body(LIVE[i : i + 1], ASSET[i : i + 1]))
        assert status == 200, plain
        np.testing.assert_array_equal(output(joined), output(plain))
        np.testing.assert_array_equal(output(joined), rig.expected(LIVE[i : i + 1], ASSET[i : i + 1]))
        np.testing.assert_allclose(output(joined), GOLDEN_OUT[i : i + 1], atol=1e-3)
        assert joined["parameters"] == {
            "features": {SET: {"version": "3", "age_s": 100.0, "stale": False, "default": False}},
            "feature_stale": False,
            "feature_default": False,
        }
        assert "parameters" not in plain  # a request carrying every input is served exactly as before


def test_a_batch_of_entities_joins_one_row_each(rig: Rig, api: ApiServer) -> None:
    order = [5, 0, 5, 7]  # duplicates are fine: one row per named entity
    status, joined = rig.infer(api, live_body(LIVE[order], entity_ids=[ENTITIES[i] for i in order]))
    assert status == 200, joined
    np.testing.assert_array_equal(output(joined), rig.expected(LIVE[order], ASSET[order]))
    assert joined["parameters"]["features"][SET]["version"] == "3"
    # A bigger batch reads the cache off the event loop (api.JOIN_INLINE_ENTITIES): same answers.
    many = [i % len(ENTITIES) for i in range(50)]
    status, joined = rig.infer(api, live_body(LIVE[many], entity_ids=[ENTITIES[i] for i in many]))
    assert status == 200, joined
    np.testing.assert_array_equal(output(joined), rig.expected(LIVE[many], ASSET[many]))


def test_age_and_version_follow_the_cache(rig: Rig, api: ApiServer) -> None:
    rig.clock.t = T0 + 1000
    status, resp = rig.infer(api, live_body(LIVE[:1], entity_id="asset-0"))
    assert status == 200 and resp["parameters"]["features"][SET] == {
        "version": "3",
        "age_s": 1100.0,
        "stale": False,
        "default": False,
    }
    # A new version with yet another column order: the index map is rebuilt, the answer is the same.
    rig.cache.apply(snapshot(rig.tmp, "4", order=FEATURES[5:] + FEATURES[:5], ts=T0 + 900))
    status, resp = rig.infer(api, live_body(LIVE[:1], entity_id="asset-0"))
    assert status == 200 and resp["parameters"]["features"][SET]["version"] == "4"
    assert resp["parameters"]["features"][SET]["age_s"] == 100.0
    np.testing.assert_array_equal(output(resp), rig.expected(LIVE[:1], ASSET[:1]))


def test_an_unknown_entity_is_404_naming_entity_and_set(rig: Rig, api: ApiServer) -> None:
    status, resp = rig.infer(api, live_body(LIVE[:1], entity_id="asset-999"))
    assert status == 404
    assert resp["error"] == (
        "entity 'asset-999' is not in feature set 'asset_features' (version 3) and model "
        "'maintenance' declares no default for input 'asset_features'"
    )
    status, resp = rig.infer(api, live_body(LIVE[:2], entity_ids=["asset-1", "asset-999"]))
    assert status == 404 and "'asset-999'" in resp["error"]


def test_an_unknown_entity_gets_the_manifest_default_and_a_flag(rig: Rig, api: ApiServer) -> None:
    default = [float(v) for v in ASSET.mean(axis=0)]
    rig.store.install_dir(with_default(rig.tmp, default))
    rig.store.activate("maintenance", "2")
    rig.server.sync()
    status, resp = rig.infer(api, live_body(LIVE[:1], entity_id="asset-new"))
    assert status == 200, resp
    assert resp["model_version"] == "2"
    assert resp["parameters"] == {
        "features": {SET: {"version": "3", "age_s": None, "stale": False, "default": True}},
        "feature_stale": False,
        "feature_default": True,
    }
    np.testing.assert_array_equal(output(resp), rig.expected(LIVE[:1], np.asarray([default], np.float32)))
    # Mixed batch: the known entity is joined, the unknown one defaulted.
    status, resp = rig.infer(api, live_body(LIVE[:2], entity_ids=["asset-0", "asset-new"]))
    assert status == 200 and resp["parameters"]["feature_default"] is True
    assert resp["parameters"]["features"][SET]["age_s"] == 100.0
    both = np.stack([ASSET[0], default]).astype(np.float32)
    np.testing.assert_array_equal(output(resp), rig.expected(LIVE[:2], both))


def test_stale_features_are_refused_under_reject(rig: Rig, api: ApiServer) -> None:
    rig.clock.t = T0 + TTL  # age TTL + 100 s
    status, resp = rig.infer(api, live_body(LIVE[:1], entity_id="asset-2"))
    assert status == 409
    assert resp["error"] == (
        "features of entity 'asset-2' in set 'asset_features' (version 3) are stale: age 3700.0s "
        "> ttl 3600s and the set's stale_policy is reject"
    )
    # The client can still send the input itself.
    status, resp = rig.infer(api, explicit_body(LIVE[:1], ASSET[2:3]))
    assert status == 200


def test_stale_features_are_served_and_flagged_under_serve(rig: Rig, api: ApiServer) -> None:
    rig.cache.apply(snapshot(rig.tmp, "4", policy="serve"))
    rig.clock.t = T0 + TTL
    status, resp = rig.infer(api, live_body(LIVE[2:3], entity_id="asset-2"))
    assert status == 200, resp
    assert resp["parameters"] == {
        "features": {SET: {"version": "4", "age_s": 3700.0, "stale": True, "default": False}},
        "feature_stale": True,
        "feature_default": False,
    }
    np.testing.assert_array_equal(output(resp), rig.expected(LIVE[2:3], ASSET[2:3]))


def test_a_joined_input_the_client_sends_wins(rig: Rig, api: ApiServer) -> None:
    mine = ASSET[3:4] * 1.5
    body = explicit_body(LIVE[:1], mine)
    body["parameters"] = {"entity_id": "asset-0"}  # named, but the client sent the input: no lookup
    status, resp = rig.infer(api, body)
    assert status == 200 and "parameters" not in resp
    np.testing.assert_array_equal(output(resp), rig.expected(LIVE[:1], mine))
    body["parameters"] = {"entity_id": "asset-does-not-exist"}
    assert rig.infer(api, body)[0] == 200


@pytest.mark.parametrize(
    "body,error",
    [
        (
            live_body(LIVE[:1]),
            "model 'maintenance' fills input 'asset_features' from feature set 'asset_features': name "
            "the entity in parameters.entity_id (or entity_ids), or send the input",
        ),
        (live_body(LIVE[:2], entity_id="asset-0"), "input 'live' has a batch of 2 but the request names 1 entity"),
        (live_body(LIVE[:1], entity_id=17), "parameters.entity_id must be a non-empty string"),
        (live_body(LIVE[:1], entity_id=""), "parameters.entity_id must be a non-empty string"),
        (live_body(LIVE[:1], entity_ids=[]), "parameters.entity_ids must be a non-empty list"),
        (live_body(LIVE[:1], entity_ids=["a", None]), "parameters.entity_ids[1] must be a non-empty string"),
        (live_body(LIVE[:1], entity_id="a", entity_ids=["a"]), "not both"),
    ],
)
def test_malformed_entity_parameters_are_400(rig: Rig, api: ApiServer, body: dict[str, Any], error: str) -> None:
    status, resp = rig.infer(api, body)
    assert status == 400 and error in resp["error"], resp


def test_a_set_the_cache_lacks_is_503(rig: Rig, api: ApiServer) -> None:
    rig.cache.delete_set(SET)
    status, resp = rig.infer(api, live_body(LIVE[:1], entity_id="asset-0"))
    assert status == 503
    assert "feature set 'asset_features' is not cached on this device yet" in resp["error"]
    # A set that lacks one of the model's features cannot feed it either.
    rig.cache.apply(snapshot(rig.tmp, "5", order=FEATURES[1:]))
    status, resp = rig.infer(api, live_body(LIVE[:1], entity_id="asset-0"))
    assert status == 503 and "lacks feature(s) ['temperature_mean_24h']" in resp["error"]


def test_an_agent_without_a_feature_cache_still_serves_explicit_inputs(rig: Rig) -> None:
    with ApiServer(create_app(rig.server)) as api:
        assert rig.infer(api, explicit_body(LIVE[:1], ASSET[:1]))[0] == 200
        status, resp = rig.infer(api, live_body(LIVE[:1], entity_id="asset-0"))
        assert status == 503 and "has no feature cache" in resp["error"]


def test_metadata_shows_the_joined_inputs(rig: Rig, api: ApiServer) -> None:
    status, _, raw = api.request("GET", "/v2/models/maintenance")
    assert status == 200
    meta = json.loads(raw)
    assert [i["name"] for i in meta["inputs"]] == ["asset_features", "live"]  # the model's contract is unchanged
    params = meta["parameters"]
    assert params["inputs"]["asset_features"]["joined_from"] == SET
    assert "joined_from" not in params["inputs"]["live"]
    assert params["feature_joins"] == {
        "asset_features": {
            "set": SET,
            "features": FEATURES,
            "default": None,
            "cached_version": "3",
            "entity_parameters": ["entity_id", "entity_ids"],
        }
    }


def test_join_outcomes_are_counted(rig: Rig, api: ApiServer) -> None:
    rig.infer(api, live_body(LIVE[:1], entity_id="asset-0"))
    rig.infer(api, live_body(LIVE[:1], entity_id="asset-0"))
    rig.infer(api, live_body(LIVE[:1], entity_id="nobody"))
    rig.clock.t = T0 + TTL
    rig.infer(api, live_body(LIVE[:1], entity_id="asset-0"))
    _, _, body = api.request("GET", "/metrics")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
    }

    def joins(outcome: str) -> float | None:
        return samples.get(
            ("edgefleet_feature_joins_total", (("model", "maintenance"), ("outcome", outcome), ("set", SET)))
        )

    assert (joins("hit"), joins("missing"), joins("stale_rejected")) == (2, 1, 1)
    assert samples[("edgefleet_errors_total", (("model", "maintenance"), ("reason", "feature_missing")))] == 1
    assert samples[("edgefleet_errors_total", (("model", "maintenance"), ("reason", "feature_stale")))] == 1
    assert samples[("edgefleet_requests_total", (("code", "409"), ("model", "maintenance"), ("version", "1")))] == 1


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_names_the_entity_in_parameters(rig: Rig, api: ApiServer, binary: bool) -> None:
    client = triton.InferenceServerClient(api.url, network_timeout=30)
    try:
        live = triton.InferInput("live", [1, 4], "FP32")
        live.set_data_from_numpy(LIVE[6:7], binary_data=binary)
        result = client.infer(
            "maintenance",
            [live],
            parameters={"entity_id": "asset-6"},
            outputs=[triton.InferRequestedOutput(OUT, binary_data=binary)],
        )
        np.testing.assert_array_equal(result.as_numpy(OUT), rig.expected(LIVE[6:7], ASSET[6:7]))
        params = result.get_response()["parameters"]
        assert params["features"][SET]["version"] == "3" and params["feature_stale"] is False
        with pytest.raises(triton.InferenceServerException, match="asset-missing"):
            client.infer("maintenance", [live], parameters={"entity_id": "asset-missing"})
        meta = client.get_model_metadata("maintenance")
        assert meta["parameters"]["inputs"]["asset_features"]["joined_from"] == SET
    finally:
        client.close()
