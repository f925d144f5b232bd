"""The V2 inference API on a real uvicorn server, driven by the real tritonclient HTTP client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton

from edge_agent.http.app import create_app
from edge_agent.inference.runtime import quantize
from edge_agent.models.serving import ModelServer
from edge_agent.models.store import ModelStore
from edge_agent.wire.model.manifest import Manifest
from tests.apiserver import ApiServer, digits_data, infer_body


# -- fixtures (model_server and api come from conftest.py) ------------------------------
@pytest.fixture
def client(api: ApiServer) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(api.url, network_timeout=30)
    yield c
    c.close()


@pytest.fixture
def manifest(store: ModelStore) -> Manifest:
    return store.manifest("digits", "1")


@pytest.fixture
def out_name(manifest: Manifest) -> str:
    return manifest.outputs[0].name


def _infer(
    client: triton.InferenceServerClient,
    x: np.ndarray,
    out_name: str,
    *,
    binary_in: bool,
    binary_out: bool,
    datatype: str = "FP32",
    **kw: Any,
) -> triton.InferResult:
    inp = triton.InferInput("pixels", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary_in)
    return client.infer("digits", [inp], outputs=[triton.InferRequestedOutput(out_name, binary_data=binary_out)], **kw)


# -- tests ------------------------------------------------------------------------------------
def test_server_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "edgefleet"
    assert meta["version"]
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata(client: triton.InferenceServerClient, manifest: Manifest, out_name: str) -> None:
    meta = client.get_model_metadata("digits")
    assert meta["name"] == "digits"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "tflite"
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 8, 8, 1]}]
    assert meta["outputs"] == [{"name": out_name, "datatype": "FP32", "shape": [-1, 10]}]
    params = meta["parameters"]
    assert params["active_version"] == "1" and params["ready"] is True
    q = manifest.inputs[0].quantization
    assert q is not None
    assert params["inputs"]["pixels"] == {
        "native_datatype": manifest.inputs[0].native_datatype,
        "quantization": {"scale": q.scale, "zero_point": q.zero_point},
    }
    assert params["labels"] == manifest.labels
    assert client.get_model_metadata("digits", "1") == meta


def test_model_ready(client: triton.InferenceServerClient) -> None:
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert not client.is_model_ready("digits", "7")
    assert not client.is_model_ready("nope")


@pytest.mark.parametrize("binary_in,binary_out", [(False, False), (True, True), (True, False), (False, True)])
def test_infer_matches_in_process(
    client: triton.InferenceServerClient, model_server: ModelServer, out_name: str, binary_in: bool, binary_out: bool
) -> None:
    x, _ = digits_data()
    sample = x[:1]
    expected = model_server.get("digits").predict({"pixels": sample})[out_name]
    result = _infer(client, sample, out_name, binary_in=binary_in, binary_out=binary_out)
    got = result.as_numpy(out_name)
    assert got.dtype == np.float32 and got.shape == (1, 10)
    np.testing.assert_array_equal(got, expected)
    resp = result.get_response()
    assert resp["model_name"] == "digits" and resp["model_version"] == "1"


def test_batched_inference(client: triton.InferenceServerClient, model_server: ModelServer, out_name: str) -> None:
    x, _ = digits_data()
    batch = x[10:15]
    expected = model_server.get("digits").predict({"pixels": batch})[out_name]
    for binary in (False, True):
        got = _infer(client, batch, out_name, binary_in=binary, binary_out=binary).as_numpy(out_name)
        assert got.shape == (5, 10)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("inline_below_s", [0.0, 1.0], ids=["worker-thread", "inline"])
def test_big_batches_and_both_execution_paths(model_server: ModelServer, out_name: str, inline_below_s: float) -> None:
    """Big bodies are decoded off the event loop; predict runs inline or in a thread: same answers."""
    x, _ = digits_data()
    big = x[:1500]  # 384 kB of FP32: above the off-loop threshold
    model_server.get("digits").max_batch = 1500  # above the default runtime.max_batch (64), as a config would
    expected = model_server.get("digits").predict({"pixels": big})[out_name]
    with ApiServer(create_app(model_server, inline_below_s=inline_below_s)) as api:
        c = triton.InferenceServerClient(api.url, network_timeout=30)
        try:
            for binary in (True, False):
                got = _infer(c, big, out_name, binary_in=binary, binary_out=binary).as_numpy(out_name)
                np.testing.assert_array_equal(got, expected)
            small = _infer(c, x[:3], out_name, binary_in=True, binary_out=True).as_numpy(out_name)
            np.testing.assert_array_equal(small, expected[:3])
        finally:
            c.close()


def test_versioned_url_and_request_id(client: triton.InferenceServerClient, out_name: str) -> None:
    x, _ = digits_data()
    result = _infer(client, x[:2], out_name, binary_in=True, binary_out=True, model_version="1", request_id="req-42")
    resp = result.get_response()
    assert resp["model_version"] == "1"
    assert resp["id"] == "req-42"
    assert result.as_numpy(out_name).shape == (2, 10)


def test_all_outputs_when_none_requested(client: triton.InferenceServerClient, manifest: Manifest) -> None:
    x, _ = digits_data()
    inp = triton.InferInput("pixels", [3, 8, 8, 1], "FP32")
    inp.set_data_from_numpy(x[:3], binary_data=True)
    result = client.infer("digits", [inp])  # tritonclient then asks for binary_data_output
    for spec in manifest.outputs:
        assert result.as_numpy(spec.name).shape == (3, 10)


def test_raw_quantized_input_passes_through(
    client: triton.InferenceServerClient, manifest: Manifest, out_name: str
) -> None:
    x, _ = digits_data()
    batch = x[20:28]
    spec = manifest.inputs[0]
    assert spec.quantization is not None
    raw = quantize(batch, spec.quantization, np.dtype(spec.dtype))
    datatype = spec.native_datatype
    via_fp32 = _infer(client, batch, out_name, binary_in=True, binary_out=True).as_numpy(out_name)
    for binary in (False, True):
        via_raw = _infer(client, raw, out_name, binary_in=binary, binary_out=binary, datatype=datatype)
        np.testing.assert_array_equal(via_raw.as_numpy(out_name), via_fp32)


def test_quantized_output_parameter(
    api: ApiServer, manifest: Manifest, out_name: str, client: triton.InferenceServerClient
) -> None:
    """``"quantized": true`` on an output returns its raw integers; they dequantize to the FP32 answer."""
    x, _ = digits_data()
    spec = manifest.output(out_name)
    assert spec is not None and spec.quantization is not None
    body = infer_body(x[:4], outputs=[{"name": out_name, "parameters": {"quantized": True}}])
    status, _, data = api.request("POST", "/v2/models/digits/infer", body)
    assert status == 200, data
    out = json.loads(data)["outputs"][0]
    assert out["datatype"] == spec.native_datatype and out["shape"] == [4, 10]
    q = np.array(out["data"], dtype=np.float32).reshape(4, 10)
    real = (q - spec.quantization.zero_point) * np.float32(spec.quantization.scale)
    expected = _infer(client, x[:4], out_name, binary_in=True, binary_out=True).as_numpy(out_name)
    np.testing.assert_array_equal(real.astype(np.float32), expected)


def test_nested_json_data(api: ApiServer, client: triton.InferenceServerClient, out_name: str) -> None:
    x, _ = digits_data()
    body = {"inputs": [{"name": "pixels", "shape": [2, 8, 8, 1], "datatype": "FP32", "data": x[:2].tolist()}]}
    status, headers, data = api.request("POST", "/v2/models/digits/infer", body)
    assert status == 200 and headers["content-type"] == "application/json"
    out = json.loads(data)["outputs"][0]
    expected = _infer(client, x[:2], out_name, binary_in=True, binary_out=True).as_numpy(out_name)
    np.testing.assert_array_equal(np.array(out["data"], np.float32).reshape(out["shape"]), expected)


def test_compressed_request(client: triton.InferenceServerClient, out_name: str) -> None:
    x, _ = digits_data()
    plain = _infer(client, x[:3], out_name, binary_in=True, binary_out=True).as_numpy(out_name)
    for algorithm in ("gzip", "deflate"):
        got = _infer(client, x[:3], out_name, binary_in=True, binary_out=True, request_compression_algorithm=algorithm)
        np.testing.assert_array_equal(got.as_numpy(out_name), plain)


def test_predictions_correct_on_sklearn_digits(
    client: triton.InferenceServerClient, manifest: Manifest, out_name: str, model_server: ModelServer
) -> None:
    model_server.get("digits").max_batch = 100  # one batch of 100, above the default runtime.max_batch (64)
    x, y = digits_data()
    held = slice(len(x) - 100, len(x))  # the tail of the data set
    probs = _infer(client, x[held], out_name, binary_in=True, binary_out=True).as_numpy(out_name)
    assert probs.shape == (100, 10)
    predicted = probs.argmax(axis=1)
    if manifest.labels:
        predicted = np.array([int(manifest.labels[i]) for i in predicted])
    accuracy = float((predicted == y[held]).mean())
    assert accuracy >= 0.9, accuracy
    # JSON gives the same answers as binary.
    probs_json = _infer(client, x[held][:10], out_name, binary_in=False, binary_out=False).as_numpy(out_name)
    np.testing.assert_array_equal(probs_json, probs[:10])


def test_agent_status(api: ApiServer, model_server: ModelServer) -> None:
    status, headers, data = api.request("GET", "/agent/status")
    assert status == 200 and headers["content-type"] == "application/json"
    doc = json.loads(data)
    assert doc["models"]["digits"]["version"] == "1"
    with ApiServer(create_app(model_server, status=lambda: {"custom": True, "path": Path("/x")})) as other:
        status, _, data = other.request("GET", "/agent/status")
        assert status == 200 and json.loads(data) == {"custom": True, "path": "/x"}


def test_ready_only_after_initial_sync(store: ModelStore) -> None:
    srv = ModelServer(store)
    with ApiServer(create_app(srv)) as api:
        c = triton.InferenceServerClient(api.url)
        try:
            assert c.is_server_live()
            assert not c.is_server_ready()
            assert not c.is_model_ready("digits")
            srv.sync()
            assert c.is_server_ready()
            assert c.is_model_ready("digits")
        finally:
            c.close()
