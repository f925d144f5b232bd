"""Dynamic batching (#13 section 4): coalesced invokes, each response exactly its own rows, a bad request fails alone."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from edge_agent.config import load_config
from edge_agent.errors import ConfigError, RequestError
from edge_agent.http.app import create_app
from edge_agent.inference.batching import Batcher, BatchPolicy
from edge_agent.inference.runtime import LoadedModel
from edge_agent.inference.stats import InferenceStats
from edge_agent.models.serving import ModelServer
from edge_agent.models.store import ModelStore
from edge_agent.wire.model.manifest import Manifest
from tests.apiserver import ApiServer
from tests.support.serving import call, distinct_batches, infer_rows, running_agent

BATCHING_ENV = {
    "EDGEFLEET_MODELS__DIGITS__BATCHING__MAX_BATCH_SIZE": "16",
    "EDGEFLEET_MODELS__DIGITS__BATCHING__MAX_QUEUE_DELAY_US": "20000",  # wide: concurrent requests must meet
}


def _reference(digits_dir: Path) -> LoadedModel:
    return LoadedModel(digits_dir / "model.tflite", Manifest.load(digits_dir / "manifest.json"))


def test_concurrent_requests_share_invokes_and_get_exactly_their_rows(tmp_path: Path, digits_dir: Path) -> None:
    requests = distinct_batches(160)
    ref = _reference(digits_dir)
    expected = [ref.predict({"pixels": x})[ref.manifest.outputs[0].name] for x in requests]
    bad = {i: x[:, :, :, 0] for i, x in enumerate(requests) if i % 10 == 3}  # wrong shape: rank 3, not 4
    with running_agent(tmp_path / "data", "127.0.0.1", BATCHING_ENV) as port:

        def one(i: int) -> tuple[int, object]:
            return infer_rows(port, bad.get(i, requests[i]))

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(len(requests))))
        status, stats = call(port, "GET", "/v2/models/digits/versions/1/stats")
    for i, (code, out) in enumerate(results):
        if i in bad:
            assert code == 400 and "shape" in out["error"], out  # type: ignore[index]
            continue
        assert code == 200, out
        assert isinstance(out, np.ndarray) and out.shape == expected[i].shape
        np.testing.assert_allclose(out, expected[i], atol=1e-6)
    assert status == 200
    s = stats["model_stats"][0]
    good = sum(len(x) for i, x in enumerate(requests) if i not in bad)
    assert s["inference_count"] == good and s["inference_stats"]["success"]["count"] == len(requests) - len(bad)
    assert s["inference_stats"]["fail"]["count"] == len(bad)
    assert s["execution_count"] < len(requests) - len(bad)  # requests were coalesced ...
    assert max(b["batch_size"] for b in s["batch_stats"]) > 3  # ... into batches larger than any one request
    assert all(b["batch_size"] <= 16 for b in s["batch_stats"])


def test_batching_is_off_by_default(tmp_path: Path) -> None:
    assert load_config(env={}).batching() == {}
    with running_agent(tmp_path / "data", "127.0.0.1") as port:
        for x in distinct_batches(6):
            assert infer_rows(port, x)[0] == 200
        s = call(port, "GET", "/v2/models/digits/stats")[1]["model_stats"][0]
    assert s["execution_count"] == 6 and s["inference_stats"]["queue"]["ns"] == 0


def test_a_hot_swap_gets_a_new_batcher(model_server: ModelServer, store: ModelStore, v2: Path) -> None:
    app = create_app(model_server, batching={"digits": BatchPolicy(4, 1000)})
    x = distinct_batches(1, seed=3)[0]
    with ApiServer(app) as api:
        assert infer_rows(api.port, x)[0] == 200
        first = app.path.batching.get(model_server.get("digits"))  # type: ignore[union-attr]
        store.install_dir(v2)
        store.activate("digits", "2")
        model_server.sync()
        code, out = infer_rows(api.port, x)
        second = app.path.batching.get(model_server.get("digits"))  # type: ignore[union-attr]
        status, doc = call(api.port, "GET", "/v2/models/digits/versions/2/stats")
    assert code == 200 and first is not None and second is not None and second is not first
    assert first.model.version == "1" and second.model.version == "2"
    ref = _reference(v2)
    np.testing.assert_allclose(out, ref.predict({"pixels": x})[ref.manifest.outputs[0].name], atol=1e-6)  # type: ignore[arg-type]
    assert status == 200 and doc["model_stats"][0]["execution_count"] == 1


class _PoisonedModel(LoadedModel):
    """The real runtime, except that an invoke holding a row whose first pixel is the int8 maximum raises
    (the corner pixel of every real digits image is 0, i.e. -128)."""

    def run_native(self, feeds: dict[str, np.ndarray], raw_outputs: frozenset[str] | set[str]) -> dict[str, np.ndarray]:
        if (feeds["pixels"].reshape(len(feeds["pixels"]), -1)[:, 0] == 127).any():
            raise RequestError("poisoned row")
        return super().run_native(feeds, raw_outputs)


def test_a_failing_request_in_a_batch_fails_alone(digits_dir: Path) -> None:
    manifest = Manifest.load(digits_dir / "manifest.json")
    model = _PoisonedModel(digits_dir / "model.tflite", manifest)
    ref = _reference(digits_dir)
    stats = InferenceStats()
    batcher = Batcher(model, BatchPolicy(max_batch_size=32, max_queue_delay_us=200_000), stats)
    requests = distinct_batches(12, seed=1)
    poisoned = model.to_native({"pixels": requests[5]})["pixels"].copy()
    poisoned.reshape(len(poisoned), -1)[:, 0] = 127
    futures = [
        batcher.submit({"pixels": poisoned} if i == 5 else {"pixels": x}, frozenset()) for i, x in enumerate(requests)
    ]
    out_name = manifest.outputs[0].name
    for i, fut in enumerate(futures):
        if i == 5:
            with pytest.raises(RequestError, match="poisoned"):
                fut.result(timeout=30)
            continue
        outputs, queued, infer_s = fut.result(timeout=30)
        np.testing.assert_allclose(outputs[out_name], ref.predict({"pixels": requests[i]})[out_name], atol=1e-6)
        assert queued >= 0 and infer_s > 0
    batcher.close()
    snap = stats.snapshot()[0]
    executed_rows = sum(size * phases["compute_infer"].count for size, phases in snap.batches.items())
    assert executed_rows == sum(len(x) for i, x in enumerate(requests) if i != 5)  # each good row ran exactly once


def test_raw_outputs_are_per_request_within_one_batch(digits_dir: Path) -> None:
    model = _reference(digits_dir)
    out = model.manifest.outputs[0]
    assert out.quantization is not None  # the shipped digits output is int8: raw and real differ
    batcher = Batcher(model, BatchPolicy(max_batch_size=8, max_queue_delay_us=200_000))
    x = distinct_batches(2, seed=2)
    raw_f = batcher.submit({"pixels": x[0]}, frozenset({out.name}))
    real_f = batcher.submit({"pixels": x[1]}, frozenset())
    raw, real = raw_f.result(timeout=30)[0][out.name], real_f.result(timeout=30)[0][out.name]
    batcher.close()
    assert raw.dtype == np.dtype(out.dtype) and real.dtype == np.float32
    np.testing.assert_allclose(real, model.predict({"pixels": x[1]})[out.name], atol=1e-6)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size: 0 is outside"),
        ({"max_queue_delay_us": -1}, "max_queue_delay_us: -1 is outside"),
        ({"max_queue_delay_us": "soon"}, "expected an integer"),
        ({"max_batch_size": 4, "preferred_batch_sizes": [8]}, "preferred_batch_sizes: 8 is outside 1..4"),
        ({"max_batch_size": True}, "expected an integer"),
        ({"max_batch": 4}, "unknown config key models.digits.batching.max_batch"),
    ],
)
def test_bad_batching_config_names_the_key(tmp_path: Path, table: Mapping[str, object], message: str) -> None:
    lines = [f"{k} = {_toml(v)}" for k, v in table.items()]
    path = tmp_path / "agent.toml"
    path.write_text("[models.digits.batching]\n" + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, env={})


def test_batching_config_from_toml_and_env(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[models.mobilenet.batching]\nmax_batch_size = 8\npreferred_batch_sizes = [8, 4]\n")
    cfg = load_config(path, env={})
    assert cfg.batching() == {"mobilenet": BatchPolicy(8, 100, (4, 8))}
    env = {"EDGEFLEET_MODELS__DIGITS__BATCHING__MAX_QUEUE_DELAY_US": "250"}
    assert load_config(env=env).batching() == {"digits": BatchPolicy(8, 250, ())}


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return str(v)
