"""The V2 repository and statistics extensions and Triton's metric names (#13 section 5), through tritonclient."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from edge_agent.http.app import create_app
from edge_agent.http.ext.repository import control_allowed
from edge_agent.models.serving import ModelServer
from edge_agent.models.store import ModelStore
from tests.apiserver import ApiServer
from tests.support.ota import relabel
from tests.support.serving import call, distinct_batches, running_agent

NV_SERIES = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
)


@pytest.fixture
def control(store: ModelStore, v2: Path) -> Iterator[tuple[ApiServer, triton.InferenceServerClient, ModelServer]]:
    """digits 1 (active) and 2 installed; the API on loopback with repository control on; a tritonclient."""
    store.install_dir(v2)
    server = ModelServer(store)
    server.sync()
    with ApiServer(create_app(server, repository_control=True)) as api:
        client = triton.InferenceServerClient(api.url, network_timeout=60)
        yield api, client, server
        client.close()
    server.stop()


def _infer(client: triton.InferenceServerClient, x: np.ndarray) -> triton.InferResult:
    inp = triton.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    return client.infer("digits", [inp])


def test_repository_index_load_and_unload_through_tritonclient(control, store: ModelStore) -> None:
    api, client, server = control
    assert "model_repository" in client.get_server_metadata()["extensions"]
    index = client.get_model_repository_index()
    assert {(r["name"], r["version"], r["state"]) for r in index} >= {
        ("digits", "1", "READY"),
        ("digits", "2", "UNAVAILABLE"),
    }
    # tritonclient names a version in its config, the Triton way; the store's atomic pointer moves, then the swap
    client.load_model("digits", config=json.dumps({"version_policy": {"specific": {"versions": [2]}}}))
    assert store.active("digits") == "2" and server.get("digits").version == "2"
    assert _infer(client, distinct_batches(1)[0]).get_response()["model_version"] == "2"
    # plain parameters.version
    assert call(api.port, "POST", "/v2/repository/models/digits/load", {"parameters": {"version": "1"}})[0] == 200
    assert store.active("digits") == "1" and client.get_model_metadata("digits")["parameters"]["active_version"] == "1"
    client.unload_model("digits")
    assert not client.is_model_ready("digits")
    with pytest.raises(InferenceServerException, match="unloaded") as err:
        _infer(client, distinct_batches(1)[0])
    assert err.value.status() == "503"
    assert {r["state"] for r in client.get_model_repository_index() if r["name"] == "digits"} == {"UNAVAILABLE"}
    server.sync()  # the store watcher must not bring an unloaded model back
    assert not client.is_model_ready("digits")
    client.load_model("digits")
    assert client.is_model_ready("digits") and server.get("digits").version == "1"


@pytest.mark.parametrize(
    ("path", "body", "code", "message"),
    [
        ("/v2/repository/models/digits/load", {"parameters": {"version": "9"}}, 404, "no installed version '9'"),
        ("/v2/repository/models/digits/load", {"parameters": {"version": "x/y"}}, 400, "invalid version"),
        (
            "/v2/repository/models/digits/load",
            {"parameters": {"file:1/model.tflite": "AAAA"}},
            400,
            "cannot be uploaded",
        ),
        ("/v2/repository/models/nope/load", {}, 404, "unknown model 'nope'"),
        ("/v2/repository/models/nope/unload", {}, 404, "unknown model 'nope'"),
        ("/v2/repository/models/digits/load", {"parameters": {"version": True}}, 400, "expected a version string"),
        ("/v2/repository/models/digits/load", {"parameters": {"config": "{"}}, 400, "model config"),
        ("/v2/repository/models/digits/swap", {}, 404, "no route"),
    ],
)
def test_repository_bad_requests_are_clear_4xx(control, path: str, body: dict, code: int, message: str) -> None:
    api, _, server = control
    status, doc = call(api.port, "POST", path, body)
    assert status == code and message in doc["error"], doc
    assert server.get("digits").version == "1"
    assert call(api.port, "GET", "/v2/repository/index")[0] == 405


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(control, store: ModelStore, tmp_path: Path) -> None:
    _, client, server = control
    broken = relabel(store.version_dir("digits", "1"), tmp_path / "v3", "3")
    (broken / "model.tflite").write_bytes(b"not a tflite model" * 64)
    store.install_dir(broken, verify=False)  # as if the file rotted on disk after its install
    with pytest.raises(InferenceServerException, match="version '3' failed to load") as err:
        client.load_model("digits", config=json.dumps({"version_policy": {"specific": {"versions": ["3"]}}}))
    assert err.value.status() == "400"
    assert store.active("digits") == "1" and server.get("digits").version == "1"  # the pointer was put back
    index = {r["version"]: r for r in client.get_model_repository_index()}
    assert index["1"]["state"] == "READY" and index["3"]["reason"].startswith("failed to load")


def test_statistics_through_tritonclient_match_the_nv_metrics(control) -> None:
    api, client, _ = control
    rows = 0
    for x in distinct_batches(5):
        _infer(client, x)
        rows += len(x)
    with pytest.raises(InferenceServerException):
        client.infer("digits", [triton.InferInput("wrong", [1, 8, 8, 1], "FP32").set_data_from_numpy(np.zeros((1, 8, 8, 1), np.float32))])  # fmt: skip
    every = client.get_inference_statistics()
    assert [(s["name"], s["version"]) for s in every["model_stats"]] == [("digits", "1")]
    one = client.get_inference_statistics("digits", "1")["model_stats"][0]
    assert client.get_inference_statistics("digits")["model_stats"][1]["version"] == "2"  # installed, no traffic
    inf = one["inference_stats"]
    assert inf["success"]["count"] == 5 and inf["fail"]["count"] == 1
    assert one["inference_count"] == rows and one["execution_count"] == 5
    for phase in ("success", "compute_input", "compute_infer", "compute_output"):
        assert inf[phase]["ns"] > 0, phase
    assert inf["success"]["ns"] > inf["compute_infer"]["ns"]
    assert one["last_inference"] > 0
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_inference_statistics("nope")
    with pytest.raises(InferenceServerException, match="no version '7'"):
        client.get_inference_statistics("digits", "7")
    status, _, text = api.request("GET", "/metrics")
    body = text.decode()
    assert status == 200
    values = {}
    for name in NV_SERIES:
        m = re.search(rf'^{name}{{model="digits",version="1"}} (\S+)$', body, re.M)
        assert m, name
        values[name] = float(m.group(1))
    assert values["nv_inference_request_success"] == inf["success"]["count"]
    assert values["nv_inference_request_failure"] == inf["fail"]["count"]
    assert values["nv_inference_count"] == one["inference_count"]
    assert values["nv_inference_exec_count"] == one["execution_count"]
    assert values["nv_inference_request_duration_us"] == inf["success"]["ns"] // 1000
    assert values["nv_inference_compute_infer_duration_us"] == inf["compute_infer"]["ns"] // 1000
    assert "edgefleet_requests_total" in body  # the agent's own series stay


def test_repository_control_is_refused_on_a_non_loopback_listener(tmp_path: Path) -> None:
    with running_agent(tmp_path / "a", "0.0.0.0") as port:
        client = triton.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=30)
        for attempt in (
            client.get_model_repository_index,
            lambda: client.load_model("digits"),
            lambda: client.unload_model("digits"),
        ):
            with pytest.raises(InferenceServerException, match="allow_repository_control") as err:
                attempt()
            assert err.value.status() == "403"
        assert client.is_model_ready("digits")  # nothing was unloaded
        assert client.get_inference_statistics("digits")["model_stats"][0]["name"] == "digits"  # stats stay open
        client.close()
    with running_agent(tmp_path / "b", "0.0.0.0", {"EDGEFLEET_ALLOW_REPOSITORY_CONTROL": "true"}) as port:
        status, index = call(port, "POST", "/v2/repository/index")
        assert status == 200 and {"name": "digits", "version": "1", "state": "READY", "reason": ""} in index


@pytest.mark.parametrize(
    ("listen", "allow", "expected"),
    [
        ("127.0.0.1:8080", False, True),
        ("[::1]:8080", False, True),
        ("localhost:8080", False, True),
        ("unix:/run/edgefleet/agent.sock", False, True),
        ("0.0.0.0:8080", False, False),
        ("192.168.1.20:8080", False, False),
        ("0.0.0.0:8080", True, True),
    ],
)
def test_control_allowed(listen: str, allow: bool, expected: bool) -> None:
    assert control_allowed(listen, allow) is expected


def test_repository_refused_by_default_in_create_app(model_server: ModelServer) -> None:
    with ApiServer(create_app(model_server)) as api:
        status, doc = call(api.port, "POST", "/v2/repository/index")
    assert status == 403 and "allow_repository_control" in doc["error"]
