"""Bounded under abuse (#15): batch and value limits, memory back to baseline, slowloris, the four old 500s, permissions.

Each test does the abusive thing for real against a real agent process (``edge-agent run``) or the
real app on uvicorn, and checks the clean 4xx + ``{"error"}`` or the bound it promises.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import resource
import socket
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.apiserver import ApiServer
from tests.support.agent import BIN, UnixHTTPConnection, request, stop, wait_ready
from tests.support.env import MODELS, free_port

INFER = "/v2/models/digits/infer"


def _start(data_dir: Path, listen: str, env: dict[str, str], nofile: int | None = None) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    full.update(EDGEFLEET_MODELS_DIR=str(MODELS), EDGEFLEET_WATCH_INTERVAL_S="0.2", **env)

    def limit_fds() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return subprocess.Popen(
        [str(BIN / "edge-agent"), "run", "--data-dir", str(data_dir), "--listen", listen],
        env=full,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit_fds,
    )


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for {pid}")


def _int8_body(batch: int) -> tuple[bytes, dict[str, str]]:
    raw = np.zeros((batch, 8, 8, 1), np.int8).tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [batch, 8, 8, 1],
                    "datatype": "INT8",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def _post(connect, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    conn = connect()
    try:
        conn.request("POST", INFER, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data[: int(resp.getheader("Inference-Header-Content-Length") or len(data))])
        except ValueError:
            return resp.status, {"raw": data[:200]}
    finally:
        conn.close()


@pytest.fixture
def tcp_agent(tmp_path: Path, request: pytest.FixtureRequest):
    env, nofile = getattr(request, "param", ({}, None))
    port = free_port()
    proc = _start(tmp_path / "data", f"127.0.0.1:{port}", env, nofile)
    connect = functools.partial(http.client.HTTPConnection, "127.0.0.1", port, timeout=30)
    wait_ready(connect, proc)
    yield proc, connect, port
    if proc.poll() is None:
        stop(proc)


# -- batch and value limits ---------------------------------------------------------------
def test_default_limits_refuse_the_big_batch_with_a_4xx(tcp_agent) -> None:
    _, connect, _ = tcp_agent
    assert _post(connect, *_int8_body(64))[0] == 200
    status, out = _post(connect, *_int8_body(65))
    assert status == 400 and "over model 'digits''s limit of 64" in out["error"]
    # 131,000 rows: the review's 2.9 GB request, refused before any interpreter sees it
    body, headers = _int8_body(131_000)
    status, out = _post(connect, body, headers)
    assert status == 413 and "limit is 4194304" in out["error"]


@pytest.mark.parametrize(
    "tcp_agent", [({"EDGEFLEET_RUNTIME__MAX_BATCH": "40000", "EDGEFLEET_RUNTIME__POOL_SIZE": "1"}, None)], indirect=True
)
def test_memory_returns_to_baseline_after_an_oversize_batch(tcp_agent) -> None:
    proc, connect, _ = tcp_agent
    for _ in range(20):
        assert _post(connect, *_int8_body(8))[0] == 200
    baseline = _rss_mb(proc.pid)
    body, headers = _int8_body(40_000)  # ~0.5 GB of interpreter arena for digits
    for _ in range(3):
        status, out = _post(connect, body, headers)
        assert status == 200, out
    peak = _rss_mb(proc.pid, "VmHWM")
    # The batch really grew the process, well past the tolerance below (tflite-runtime: ~+850 MB;
    # ai-edge-litert's XNNPACK path: ~+210 MB).
    assert peak > baseline + 150, (baseline, peak)
    for _ in range(5):
        assert _post(connect, *_int8_body(1))[0] == 200
    # Settled: the telemetry thread commits the three big records on its next flush (every 250 ms), building
    # their rows in this process meanwhile; the lowest of a few samples over the next second is what stays.
    samples = []
    for _ in range(6):
        time.sleep(0.2)
        samples.append(_rss_mb(proc.pid))
    after = min(samples)
    assert after < baseline + 60, f"RSS {samples} MB after, {baseline:.0f} MB before, peak {peak:.0f} MB"


# -- connections ----------------------------------------------------------------------------
@pytest.mark.parametrize("tcp_agent", [({"EDGEFLEET_HTTP__READ_TIMEOUT_S": "2"}, 128)], indirect=True)
def test_slowloris_with_a_low_fd_limit_does_not_starve_clients(tcp_agent) -> None:
    proc, connect, port = tcp_agent
    held = []
    try:
        for _ in range(200):  # more half-open requests than the agent has file descriptors
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            held.append(s)
        t0 = time.monotonic()
        status, out = _post(connect, *_int8_body(1))  # a legitimate client gets through meanwhile
        assert status == 200, out
        assert time.monotonic() - t0 < 2  # served by eviction, not by waiting for the read timeout
        assert request(connect(), "GET", "/agent/status")[0] == 200
        # the oldest slow connections were told why and closed (503 evicted, or 408 after the read timeout)
        s = held[0]
        s.settimeout(5)
        answer = s.recv(4096)
        assert answer.startswith((b"HTTP/1.1 503", b"HTTP/1.1 408")) and b'"error"' in answer
        time.sleep(2.5)  # past the read timeout: every slow connection still open gets a 408
        s = held[-1]
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 408")
    finally:
        for s in held:
            s.close()
    assert _post(connect, *_int8_body(1))[0] == 200
    assert stop(proc) == 0
    err = proc.stderr.read() if proc.stderr else ""
    assert "Too many open files" not in err and "EMFILE" not in err, err[-2000:]


# -- the four old 500s ---------------------------------------------------------------------
@pytest.mark.parametrize("params", ['{"entity_id": "\\ud800"}', '{"entity_ids": ["a", "x\\udfff"]}'])
def test_a_lone_surrogate_entity_id_is_a_400(tcp_agent, params: str) -> None:
    _, connect, _ = tcp_agent  # the shipped maintenance model joins asset_features by entity_id
    conn = connect()
    conn.request("POST", "/v2/models/maintenance/infer", body='{"parameters": ' + params + "}", headers={})
    resp = conn.getresponse()
    out = json.loads(resp.read())
    assert resp.status == 400 and "lone surrogate" in out["error"], out


# -- the four old 500s ---------------------------------------------------------------------
def _json(api: ApiServer, body: bytes) -> tuple[int, dict]:
    status, _, data = api.request("POST", INFER, body, {"Content-Type": "application/json"})
    return status, json.loads(data)


@pytest.mark.parametrize("binary", [False, True])
def test_a_70_dimension_shape_is_a_400(api: ApiServer, binary: bool) -> None:
    shape = [1] * 70
    if binary:
        head = json.dumps(
            {"inputs": [{"name": "pixels", "shape": shape, "datatype": "INT8", "parameters": {"binary_data_size": 1}}]}
        ).encode()
        status, _, data = api.request("POST", INFER, head + b"\0", {"Inference-Header-Content-Length": str(len(head))})
        out = json.loads(data)
    else:
        status, out = _json(
            api,
            json.dumps({"inputs": [{"name": "pixels", "shape": shape, "datatype": "FP32", "data": [1.0]}]}).encode(),
        )
    assert status == 400 and "at most 16" in out["error"]


def test_json_nested_100000_deep_is_a_400(api: ApiServer) -> None:
    status, out = _json(api, b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert status == 400 and "nested" in out["error"]
    data = "[" * 70 + "1.0" + "]" * 70
    status, out = _json(
        api, ('{"inputs": [{"name": "pixels", "shape": [1], "datatype": "FP32", "data": ' + data + "}]}").encode()
    )
    assert status == 400 and "limit is 64" in out["error"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_json_numbers_are_a_400(api: ApiServer, value: str) -> None:
    data = ",".join([value] + ["0"] * 63)
    body = '{"inputs": [{"name": "pixels", "shape": [1, 8, 8, 1], "datatype": "FP32", "data": [' + data + "]}]}"
    status, out = _json(api, body.encode())
    assert status == 400, out
    assert "nan" in out["error"].lower() or "infinity" in out["error"].lower()


def test_non_finite_binary_floats_are_a_400(api: ApiServer) -> None:
    raw = np.zeros((1, 8, 8, 1), "<f4")
    raw[0, 3, 3, 0] = np.nan
    head = json.dumps(
        {
            "inputs": [
                {"name": "pixels", "shape": [1, 8, 8, 1], "datatype": "FP32", "parameters": {"binary_data_size": 256}}
            ]
        }
    ).encode()
    status, _, data = api.request(
        "POST", INFER, head + raw.tobytes(), {"Inference-Header-Content-Length": str(len(head))}
    )
    assert status == 400 and "NaN or infinity" in json.loads(data)["error"]


# -- permissions ----------------------------------------------------------------------------
def test_socket_data_dir_database_and_records_are_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)  # as the review found it
    sock = str(tmp_path / "agent.sock")
    proc = _start(data, f"unix:{sock}", {})
    try:
        wait_ready(lambda: UnixHTTPConnection(sock), proc)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(data / "features.db").st_mode) == 0o600
    finally:
        assert stop(proc) == 0


def test_update_records_are_written_0600(tmp_path: Path) -> None:
    from edge_agent.update.states import RecordStore, UpdateRecord

    records = RecordStore(tmp_path)
    records.save(UpdateRecord("r-1", "digits", "2", {}))
    assert stat.S_IMODE(os.stat(records.path("digits")).st_mode) == 0o600
