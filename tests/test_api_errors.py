"""Every client mistake gets a precise JSON error with the right status, and the server keeps serving."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import RequestError
from edge_agent.http.app import create_app
from edge_agent.inference.modelpack import build_version_dir
from edge_agent.models.serving import ModelServer
from edge_agent.models.store import ModelStore
from edge_agent.wire import kserve_v2 as v2
from edge_agent.wire.model.manifest import Manifest, TensorSpec
from tests.apiserver import ApiServer, digits_data, infer_body

INFER = "/v2/models/digits/infer"


@pytest.fixture
def out_name(store: ModelStore) -> str:
    return store.manifest("digits", "1").outputs[0].name


def error_of(status_headers_body: tuple[int, dict[str, str], bytes], expected_status: int) -> str:
    """Assert the status and a JSON ``{"error": str}`` body; return the message."""
    status, headers, body = status_headers_body
    assert status == expected_status, (status, body)
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert isinstance(doc.get("error"), str) and doc["error"], doc
    return doc["error"]


def sample(n: int = 1) -> np.ndarray:
    return digits_data()[0][:n]


def binary_request(
    arrays: list[tuple[str, np.ndarray, str]],
    *,
    sizes: list[int] | None = None,
    extra: bytes = b"",
    header_length: int | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A binary-tensor-data request; ``sizes``/``extra``/``header_length`` let a test lie about the layout."""
    inputs, blobs = [], []
    for i, (name, arr, datatype) in enumerate(arrays):
        raw = arr.tobytes()
        size = len(raw) if sizes is None else sizes[i]
        inputs.append(
            {"name": name, "shape": list(arr.shape), "datatype": datatype, "parameters": {"binary_data_size": size}}
        )
        blobs.append(raw)
    head = json.dumps({"inputs": inputs}).encode()
    hl = len(head) if header_length is None else header_length
    return head + b"".join(blobs) + extra, {"Inference-Header-Content-Length": str(hl)}


# -- malformed bodies -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body,needle",
    [
        (b'{"inputs": [', "not valid JSON"),
        (b"\xff\xfe garbage", "JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"{}", "'inputs'"),
        (b'{"inputs": []}', "'inputs'"),
        (b'{"inputs": [3]}', "inputs[0]"),
        (b'{"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}', "'name'"),
        (b'{"inputs": [{"name": "pixels", "datatype": "FP32", "data": [1]}]}', "'shape'"),
        (b'{"inputs": [{"name": "pixels", "shape": [1, -8, 8, 1], "datatype": "FP32", "data": [1]}]}', "'shape'"),
        (b'{"inputs": [{"name": "pixels", "shape": [1, 8, 8, 1], "data": [1]}]}', "'datatype'"),
        (b'{"inputs": [{"name": "pixels", "shape": [1, 8, 8, 1], "datatype": "FP32"}]}', "'data'"),
        (
            b'{"inputs": [{"name": "pixels", "shape": [1, 8, 8, 1], "datatype": "FP32", "data": 5}]}',
            "'data' must be a list",
        ),
        (b'{"id": 5, "inputs": [{"name": "pixels", "shape": [1], "datatype": "FP32", "data": [1]}]}', "'id'"),
        (
            b'{"parameters": {"binary_data_output": "yes"}, "inputs": [{"name": "pixels", "shape": [1], "datatype": "FP32", "data": [1]}]}',
            "binary_data_output",
        ),
    ],
)
def test_malformed_body(api: ApiServer, body: bytes, needle: str) -> None:
    message = error_of(api.request("POST", INFER, body, {"Content-Type": "application/json"}), 400)
    assert needle in message


def test_wrong_shape(api: ApiServer) -> None:
    x = sample(1)
    for bad in (x.reshape(1, 8, 8), x.reshape(1, 64, 1, 1), np.zeros((1, 8, 8, 2), np.float32)):
        message = error_of(api.request("POST", INFER, infer_body(bad)), 400)
        assert "shape" in message and "[-1, 8, 8, 1]" in message
    assert "empty" in error_of(api.request("POST", INFER, infer_body(np.zeros((0, 8, 8, 1), np.float32))), 400)


@pytest.mark.parametrize(
    "datatype,needle",
    [
        ("INT32", "datatype INT32 not accepted"),
        ("FP64", "datatype FP64 not accepted"),
        ("BYTES", "BYTES is not supported"),
        ("FP8", "unknown datatype"),
    ],
)
def test_wrong_datatype(api: ApiServer, datatype: str, needle: str) -> None:
    body = infer_body(sample(1).astype(np.int32), datatype=datatype)
    assert needle in error_of(api.request("POST", INFER, body), 400)


def test_json_values_must_fit_the_datatype(api: ApiServer) -> None:
    base = infer_body(sample(1))
    for data, needle in ((["a"] * 64, "strings"), ([None] * 64, "null"), ([[1.0, 2.0], [3.0]], "ragged")):
        base["inputs"][0]["data"] = data
        if needle == "ragged":
            base["inputs"][0]["shape"] = [3]
        assert needle in error_of(api.request("POST", INFER, base), 400)
    raw = infer_body(sample(1), datatype="INT8")
    raw["inputs"][0]["data"] = [300] * 64
    assert "range" in error_of(api.request("POST", INFER, raw), 400)
    raw["inputs"][0]["data"] = [1.5] * 64
    assert "non-integer" in error_of(api.request("POST", INFER, raw), 400)


def test_unknown_input_and_output(api: ApiServer, out_name: str) -> None:
    message = error_of(api.request("POST", INFER, infer_body(sample(1), name="image")), 400)
    assert "unknown input 'image'" in message and "pixels" in message
    twice = infer_body(sample(1))
    twice["inputs"] = twice["inputs"] * 2
    assert "twice" in error_of(api.request("POST", INFER, twice), 400)
    body = infer_body(sample(1), outputs=[{"name": "logits"}])
    message = error_of(api.request("POST", INFER, body), 400)
    assert "unknown output 'logits'" in message and out_name in message


def test_missing_input_is_named() -> None:
    """With a two-input model the codec names the missing one (checked against the manifest)."""
    spec = TensorSpec("a", "float32", (-1, 2))
    manifest = Manifest(
        name="pair",
        version="1",
        sha256="0" * 64,
        size=1,
        inputs=[spec, TensorSpec("b", "float32", (-1, 2))],
        outputs=[TensorSpec("y", "float32", (-1, 1))],
    )
    body = json.dumps({"inputs": [{"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}).encode()
    with pytest.raises(RequestError, match="missing input 'b'"):
        v2.decode_request(body, None, manifest)


def test_data_length_mismatch(api: ApiServer) -> None:
    body = infer_body(sample(1))
    body["inputs"][0]["data"] = body["inputs"][0]["data"][:63]
    message = error_of(api.request("POST", INFER, body), 400)
    assert "63 values" in message and "64" in message


def test_binary_sizes_must_add_up(api: ApiServer) -> None:
    x = sample(2)
    # binary_data_size disagrees with the shape
    body, headers = binary_request([("pixels", x, "FP32")], sizes=[100])
    assert "binary_data_size 100" in error_of(api.request("POST", INFER, body, headers), 400)
    # bytes left over after the declared inputs
    body, headers = binary_request([("pixels", x, "FP32")], extra=b"\0" * 8)
    assert "size mismatch" in error_of(api.request("POST", INFER, body, headers), 400)
    # body shorter than declared
    body, headers = binary_request([("pixels", x, "FP32")])
    assert "too short" in error_of(api.request("POST", INFER, body[:-4], headers), 400)
    # header length past the end of the body, negative, or not a number
    for hl in (str(len(body) + 1), "-1", "abc"):
        headers = {"Inference-Header-Content-Length": hl}
        assert "Inference-Header-Content-Length" in error_of(api.request("POST", INFER, body, headers), 400)
    # binary data but no header length
    assert "Inference-Header-Content-Length" in error_of(api.request("POST", INFER, body), 400)
    # a correct one works
    body, headers = binary_request([("pixels", x, "FP32")])
    status, _, data = api.request("POST", INFER, body, headers)
    assert status == 200, data


# -- size limits ------------------------------------------------------------------------------
def test_body_over_limit_rejected_from_content_length(api: ApiServer) -> None:
    """A body over 8 MiB gets a 413 from its Content-Length (it is never buffered); the connection stays usable."""
    conn = api.connect()
    try:
        conn.request("POST", INFER, body=b" " * (9 * 1024 * 1024), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 413
        assert "over the 8388608-byte limit" in json.loads(resp.read())["error"]
        conn.request("POST", INFER, body=json.dumps(infer_body(sample(1))).encode())
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
    finally:
        conn.close()


def test_body_over_limit_while_streaming(model_server: ModelServer) -> None:
    """A chunked body (no Content-Length) is cut off once it passes the limit."""
    with ApiServer(create_app(model_server, max_body_bytes=4096)) as small:
        conn = small.connect()
        try:
            conn.request(
                "POST",
                INFER,
                body=iter([b" " * 1000] * 10),
                encode_chunked=True,
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            assert resp.status == 413
            assert "4096-byte limit" in json.loads(resp.read())["error"]
        finally:
            conn.close()
        # A body under the limit is fine.
        status, _, data = small.request("POST", INFER, infer_body(sample(1)))
        assert status == 200, data


def test_compressed_body_limits(model_server: ModelServer) -> None:
    with ApiServer(create_app(model_server, max_body_bytes=4096)) as small:
        bomb = gzip.compress(b" " * 100_000)
        assert len(bomb) < 4096
        error_of(small.request("POST", INFER, bomb, {"Content-Encoding": "gzip"}), 413)
        small_gz = gzip.compress(json.dumps(infer_body(sample(1))).encode())
        assert "truncated" in error_of(small.request("POST", INFER, small_gz[:-20], {"Content-Encoding": "gzip"}), 400)
        error_of(small.request("POST", INFER, b"not gzip", {"Content-Encoding": "gzip"}), 400)
        assert "br" in error_of(small.request("POST", INFER, b"{}", {"Content-Encoding": "br"}), 415)


# -- models, versions, routes -----------------------------------------------------------------
def test_unknown_model_version_route_and_method(api: ApiServer) -> None:
    body = infer_body(sample(1))
    assert "unknown model 'nope'" in error_of(api.request("POST", "/v2/models/nope/infer", body), 404)
    assert "no version '9'" in error_of(api.request("POST", "/v2/models/digits/versions/9/infer", body), 404)
    error_of(api.request("POST", "/v2/models/digits/versions/abc/infer", body), 404)
    error_of(api.request("POST", "/v2/models/..%2F..%2Fetc/infer", body), 404)
    error_of(api.request("GET", "/v2/models/nope"), 404)
    error_of(api.request("GET", "/v2/models/nope/ready"), 404)
    error_of(api.request("GET", "/v2/models/digits/versions/9"), 404)
    error_of(api.request("GET", "/v2/models/digits/versions/9/ready"), 404)
    error_of(api.request("GET", "/v2/models/digits/explain"), 404)
    error_of(api.request("GET", "/v2/models/"), 404)
    error_of(api.request("GET", "/nothing/here"), 404)
    status, headers, _ = api.request("GET", INFER)
    assert status == 405 and headers["allow"] == "POST"
    error_of(api.request("GET", INFER), 405)
    error_of(api.request("POST", "/v2/health/live", b"{}"), 405)
    error_of(api.request("DELETE", "/v2/models/digits"), 405)
    error_of(api.request("PUT", "/metrics", b""), 405)


def test_inactive_installed_version_is_503(
    api: ApiServer, store: ModelStore, digits_dir: Path, tmp_path: Path, out_name: str
) -> None:
    v1 = store.manifest("digits", "1")
    build_version_dir(
        digits_dir / v1.file,
        tmp_path / "v2",
        name="digits",
        version="2",
        rename_inputs=_renames(digits_dir / v1.file, v1, "inputs"),
        rename_outputs=_renames(digits_dir / v1.file, v1, "outputs"),
        labels=v1.labels,
    )
    store.install_dir(tmp_path / "v2")
    assert store.active("digits") == "1"
    message = error_of(api.request("POST", "/v2/models/digits/versions/2/infer", infer_body(sample(1))), 503)
    assert "not active" in message
    error_of(api.request("GET", "/v2/models/digits/versions/2/ready"), 503)
    # Its metadata is still there (read from the store), marked not ready.
    status, _, data = api.request("GET", "/v2/models/digits/versions/2")
    assert status == 200
    meta = json.loads(data)
    assert meta["versions"] == ["1", "2"] and meta["parameters"]["ready"] is False
    assert meta["outputs"][0]["name"] == out_name


def _renames(tflite: Path, manifest: Manifest, kind: str) -> dict[str, str]:
    """Map the names the model file carries onto the shipped manifest's names (same order)."""
    from edge_agent.inference.runtime import inspect_model

    ins, outs = inspect_model(tflite)
    specs = ins if kind == "inputs" else outs
    declared = manifest.inputs if kind == "inputs" else manifest.outputs
    return {s.name: d.name for s, d in zip(specs, declared, strict=True) if s.name != d.name}


def test_not_ready_server_is_503(store: ModelStore) -> None:
    srv = ModelServer(store)
    with ApiServer(create_app(srv)) as api:
        error_of(api.request("GET", "/v2/health/ready"), 503)
        assert "loading" in error_of(api.request("POST", INFER, infer_body(sample(1))), 503)
        error_of(api.request("GET", "/v2/models/digits/ready"), 503)
        srv.sync()
        status, _, _ = api.request("GET", "/v2/health/ready")
        assert status == 200
        status, _, data = api.request("POST", INFER, infer_body(sample(1)))
        assert status == 200, data


def test_unexpected_failure_is_a_json_500(model_server: ModelServer) -> None:
    def broken_status() -> dict[str, Any]:
        raise ZeroDivisionError("boom")

    with ApiServer(create_app(model_server, status=broken_status)) as api:
        message = error_of(api.request("GET", "/agent/status"), 500)
        assert message.startswith("internal error:") and "boom" in message
        status, _, _ = api.request("GET", "/v2/health/live")
        assert status == 200


def test_errors_keep_the_connection_and_the_server_serving(
    api: ApiServer, model_server: ModelServer, out_name: str
) -> None:
    x, _ = digits_data()
    conn = api.connect()
    try:
        bad_bodies = [
            b"{",
            b"[]",
            json.dumps(infer_body(x[:1], datatype="INT32")).encode(),
            json.dumps(infer_body(x[:1].reshape(1, 64))).encode(),
        ]
        for bad in bad_bodies:
            conn.request("POST", INFER, body=bad)
            resp = conn.getresponse()
            assert resp.status == 400 and "error" in json.loads(resp.read())
        conn.request("POST", "/v2/models/nope/infer", body=b"{}")
        resp = conn.getresponse()
        assert resp.status == 404
        resp.read()
        # Same keep-alive connection, now a good request: a correct prediction.
        conn.request("POST", INFER, body=json.dumps(infer_body(x[:5])).encode())
        resp = conn.getresponse()
        assert resp.status == 200
        out = json.loads(resp.read())["outputs"][0]
    finally:
        conn.close()
    probs = np.array(out["data"], np.float32).reshape(out["shape"])
    expected = model_server.get("digits").predict({"pixels": x[:5]})[out_name]
    np.testing.assert_array_equal(probs, expected)
