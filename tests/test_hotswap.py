"""Hot swap under load: activating, rolling back and re-activating versions drops no request."""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton

from edge_agent.http.app import create_app
from edge_agent.http.metrics import Metrics
from edge_agent.models.serving import ModelServer
from edge_agent.models.store import ModelStore
from tests.apiserver import ApiServer, build_v2, digits_data, infer_body

CLIENTS = 8


class Clients:
    """What the load clients saw: (sent, answered, model_version) per answer, monotonic clock; and failures."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.records: list[tuple[float, float, str]] = []
        self.failures: list[str] = []

    def run(self, who: str, k: int, call: Callable[[int], str]) -> None:
        """Client ``k`` sends ``call(sample)`` over the 64 samples until stopped; ``call`` returns the version."""
        i = k
        while not self.stop.is_set():
            i = (i + CLIENTS) % 64
            t0 = time.monotonic()
            try:
                version = call(i)
                with self.lock:
                    self.records.append((t0, time.monotonic(), version))
            except Exception as exc:
                with self.lock:
                    self.failures.append(f"{who} client {k}: {exc!r}")


@pytest.fixture
def watched(store: ModelStore) -> Iterator[ModelServer]:
    """A model server polling the store, as the agent runs it."""
    srv = ModelServer(store)
    srv.sync()
    srv.start(0.05)
    yield srv
    srv.stop()


def wait_serving(srv: ModelServer, version: str, timeout: float = 30) -> float:
    """Block until ``version`` serves; return the monotonic time it was first seen serving."""
    deadline = time.monotonic() + timeout
    while srv.get("digits").version != version:
        assert time.monotonic() < deadline, f"version {version} never started serving"
        time.sleep(0.005)
    return time.monotonic()


def test_hot_swap_under_load_drops_no_request(
    store: ModelStore, watched: ModelServer, digits_dir: Path, tmp_path: Path
) -> None:
    x, _ = digits_data()
    out_name = store.manifest("digits", "1").outputs[0].name
    expected = watched.get("digits").predict({"pixels": x[:64]})[out_name]
    store.install_dir(build_v2(digits_dir, tmp_path / "v2"))
    assert store.active("digits") == "1"

    seen = Clients()

    def check(i: int, probs: np.ndarray) -> None:
        if probs.shape != (1, 10) or not np.array_equal(probs[0], expected[i]):
            raise AssertionError(f"sample {i}: bad prediction {probs!r}")

    def json_client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)

        def call(i: int) -> str:
            conn.request(
                "POST",
                "/v2/models/digits/infer",
                body=json.dumps(infer_body(x[i : i + 1])),
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            doc = json.loads(resp.read())
            assert resp.status == 200, doc
            out = next(o for o in doc["outputs"] if o["name"] == out_name)
            check(i, np.array(out["data"], np.float32).reshape(out["shape"]))
            return str(doc["model_version"])

        try:
            seen.run("json", k, call)
        finally:
            conn.close()

    def binary_client(k: int) -> None:
        client = triton.InferenceServerClient(api.url, network_timeout=30)

        def call(i: int) -> str:
            inp = triton.InferInput("pixels", [1, 8, 8, 1], "FP32")
            inp.set_data_from_numpy(x[i : i + 1], binary_data=True)
            result = client.infer("digits", [inp], outputs=[triton.InferRequestedOutput(out_name, binary_data=True)])
            check(i, result.as_numpy(out_name))
            return str(result.get_response()["model_version"])

        try:
            seen.run("binary", k, call)
        finally:
            client.close()

    phases: list[tuple[float, str]] = []  # (time the version was confirmed serving, version)
    with ApiServer(create_app(watched)) as api:
        threads = [threading.Thread(target=binary_client if k % 2 else json_client, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        try:
            phases.append((time.monotonic(), "1"))
            time.sleep(0.6)
            for action, version in (("activate", "2"), ("rollback", "1"), ("activate", "2")):
                phases.append((time.monotonic(), "?"))  # swap in progress: either version may answer
                if action == "activate":
                    store.activate("digits", version)
                else:
                    assert store.rollback("digits") == version
                phases.append((wait_serving(watched, version), version))
                time.sleep(0.8)
        finally:
            seen.stop.set()
            for t in threads:
                t.join(timeout=60)
        phases.append((time.monotonic(), "end"))

    records = seen.records
    assert not seen.failures, seen.failures[:5]
    assert len(records) > 100
    assert {v for _, _, v in records} == {"1", "2"}
    # A request sent after a version was confirmed serving (and answered before the next swap started)
    # was served by that version.
    for (start, version), (end, _) in itertools.pairwise(phases):
        if version == "?":
            continue
        served = [v for sent, answered, v in records if sent >= start and answered < end]
        assert served, f"no request completed while version {version} served"
        assert set(served) == {version}, (version, sorted(set(served)))
    versions_in_order = [v for _, _, v in sorted(records, key=lambda r: r[1])]
    assert versions_in_order[0] == "1" and versions_in_order[-1] == "2"


def test_in_flight_request_finishes_on_the_old_version(store: ModelStore, digits_dir: Path, tmp_path: Path) -> None:
    x, _ = digits_data()
    out_name = store.manifest("digits", "1").outputs[0].name
    srv = ModelServer(store)
    srv.sync()
    old = srv.get("digits")
    before = old.predict({"pixels": x[:3]})[out_name]
    store.install_dir(build_v2(digits_dir, tmp_path / "v2"))
    metrics = Metrics()
    with ApiServer(create_app(srv, metrics=metrics)) as api:
        # Send the headers and half the body: the server resolves the model as the request arrives
        # (then counts it in flight) and waits for the rest of the body.
        body = json.dumps(infer_body(x[:3])).encode()
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
        conn.putrequest("POST", "/v2/models/digits/infer")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body[: len(body) // 2])
        deadline = time.monotonic() + 30
        while metrics.registry.get_sample_value("edgefleet_inflight_requests") != 1:
            assert time.monotonic() < deadline, "the request never arrived"
            time.sleep(0.005)

        store.activate("digits", "2")
        assert srv.sync() == [("digits", "1", "2")]
        assert srv.get("digits").version == "2"

        conn.send(body[len(body) // 2 :])
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        conn.close()
        assert resp.status == 200, doc
        assert doc["model_version"] == "1"
        np.testing.assert_array_equal(np.array(doc["outputs"][0]["data"], np.float32).reshape(3, 10), before)

        # New requests go to version 2; the reference taken before the swap still predicts.
        status, _, data = api.request("POST", "/v2/models/digits/infer", infer_body(x[:3]))
        assert status == 200 and json.loads(data)["model_version"] == "2"
    np.testing.assert_array_equal(old.predict({"pixels": x[:3]})[out_name], before)
    assert old.version == "1"
