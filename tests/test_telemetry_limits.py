"""Per-model telemetry limits: TOML overrides, outbox quotas, the max_bps token bucket, per-model flush intervals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.app import open_telemetry
from edge_agent.config import load_config
from edge_agent.errors import ConfigError
from edge_agent.http.metrics import Metrics
from edge_agent.models.serving import ModelServer
from edge_agent.telemetry import ModelPolicy
from edge_agent.telemetry.bound import Quota
from edge_agent.telemetry.outbox import Outbox, Row
from edge_agent.telemetry.pacing import Pacing
from edge_agent.telemetry.recorder import Recorder
from edge_agent.telemetry.rows import record_bytes
from tests.broker import Broker
from tests.support.telemetry import AgentProcess, outbox_records, predict_many, wait_until

TOML = """
[telemetry]
max_rows = 1000
flush_interval_ms = 200
[telemetry.models.digits]
sample_inputs = 0.5
max_rows = 50
max_bytes = 65536
max_bps = 2000
flush_interval_ms = 50
[telemetry.models.maintenance]
enabled = false
"""


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_toml_per_model_limits_are_parsed_and_bad_ones_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(TOML)
    t = load_config(path, env={}).telemetry
    assert t.policy("digits") == ModelPolicy(True, 0.5, max_bps=2000.0, flush_interval_s=0.05)
    assert t.policy("maintenance").enabled is False and t.policy("other") == ModelPolicy(True, 0.0)
    assert t.quotas() == {"digits": Quota(50, 65536)} and t.paced() and t.min_flush_interval_s() == 0.05
    from_env = load_config(None, env={"EDGEFLEET_TELEMETRY__MODELS__DIGITS__MAX_ROWS": "7"}).telemetry
    assert from_env.quotas() == {"digits": Quota(7, None)} and not from_env.paced()
    env = {"EDGEFLEET_TELEMETRY__MODELS": "x"}  # a table is expected, not text
    with pytest.raises(ConfigError, match=r"telemetry\.models"):
        load_config(path, env=env)
    for bad, message in [
        ("max_rows = 0", "telemetry.models.digits.max_rows must be at least 1"),
        ("max_bytes = 100", "telemetry.models.digits.max_bytes must be at least 4096"),
        ("max_bps = -1", "telemetry.models.digits.max_bps must be positive"),
        ("flush_interval_ms = 0", "telemetry.models.digits.flush_interval_ms must be positive"),
        ("sample_inputs = 2", "telemetry.models.digits.sample_inputs must be between 0 and 1"),
        ("max_rows = 'many'", "telemetry.models.digits.max_rows"),
        ("resend_timeout_s = 3", "unknown keys \\['resend_timeout_s'\\]"),
    ]:
        path.write_text(f"[telemetry.models.digits]\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(path, env={})


def _pred(model: str, i: int, inputs: bool = False) -> Row:
    body = {"model": model, "request_id": f"{model}-{i}", "outputs": {"y": [i]}}
    if inputs:
        body["inputs"] = {"x": {"shape": [64], "datatype": "FP32", "b64": "A" * 344}}
    return Row("prediction", float(i), json.dumps(body), model, f"{model}-{i}", inputs)


def test_a_model_quota_sheds_only_that_models_rows_in_the_drop_order(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "t.db", max_rows=100, quotas={"a": Quota(max_rows=5), "c": Quota(max_bytes=4096)})
    box.append([_pred("a", i) for i in range(4)] + [Row("feedback", 9.0, '{"label":1}', "a")])
    box.append([_pred("a", i) for i in range(4, 10)] + [_pred("b", i) for i in range(10)])
    rows = box.read_after(0, 10**9)
    a_rows = [json.loads(r[3]).get("request_id", r[1]) for r in rows if '"a-' in r[3] or r[1] == "feedback"]
    assert a_rows == ["feedback", "a-6", "a-7", "a-8", "a-9"], "a's oldest predictions went, its feedback stayed"
    assert sum('"b-' in r[3] for r in rows) == 10 and box.dropped() == {"prediction": 6}
    box.append([_pred("c", i, inputs=True) for i in range(12)])
    c_bodies = [json.loads(r[3]) for r in box.read_after(0, 10**9) if '"c-' in r[3]]
    assert len(c_bodies) == 12 and box.usage.of("c")[1] <= 4096, "stripping c's inputs was enough"
    stripped = ["inputs_dropped" in b for b in c_bodies]
    assert stripped == sorted(stripped, reverse=True) and box.dropped()["inputs"] == sum(stripped) > 0
    box.close()
    reopened = Outbox(tmp_path / "t.db", quotas={"a": Quota(max_rows=5)})
    assert reopened.usage.of("a")[0] == 5 and reopened.stats().rows == 5 + 10 + 12
    assert reopened.ack(rows[-1][0]) > 0 and reopened.usage.of("a")[0] == 0
    reopened.close()


def _queue(recorder: Recorder, server: ModelServer, n: int, start: int = 0) -> None:
    model = server.get("digits")
    xs = np.random.default_rng(start).random((n, 1, 8, 8, 1)).astype(np.float32)
    for i, x in enumerate(xs):
        recorder.prediction(model.manifest, f"r{start + i}", 0.001, {"pixels": x}, model.predict({"pixels": x}))


def _spent(queued: list[Any], kept: list[dict[str, Any]]) -> tuple[int, int]:
    """Bytes the bucket let through for ``kept`` (of ``queued``), checked to be samples first; and how many went stripped."""
    by_id = {item[1]: item for item in queued}
    with_inputs = ["inputs" in b for b in kept]
    assert with_inputs == sorted(with_inputs, reverse=True) and with_inputs[0], "samples go only once they stop fitting"
    spent = sum(record_bytes(by_id[b["request_id"]], "inputs" in b) for b in kept)
    lean = record_bytes(queued[0], False)
    assert spent <= 5000 < spent + lean, "the bucket held one second: 5000 bytes, spent to the last record"
    return spent, with_inputs.count(False)


def test_max_bps_token_bucket_strips_inputs_then_drops_and_refills(tmp_path: Path, model_server: ModelServer) -> None:
    clock = Clock()
    policy = ModelPolicy(True, 1.0, max_bps=5000.0)
    pacing = Pacing(lambda m: None, lambda m: policy.max_bps, default_interval_s=0.25, tick_s=0.25, clock=clock)
    box = Outbox(tmp_path / "t.db")
    recorder = Recorder(box, lambda m: policy, pacing=pacing)
    _queue(recorder, model_server, 60)
    queued = list(recorder._queue)
    recorder.flush()
    kept = [b for _, _, b in outbox_records(box)]
    _, stripped = _spent(queued, kept)
    assert box.dropped() == {"prediction": 60 - len(kept), **({"inputs": stripped} if stripped else {})}
    clock.now += (record_bytes(queued[0], False) + 10) / 5000  # a little more than one record without its inputs
    _queue(recorder, model_server, 2, start=60)
    recorder.flush()
    last = outbox_records(box)[-1][2]
    assert last["request_id"] == "r60" and "inputs" not in last, "the sample went, the prediction fit"
    assert box.dropped() == {"prediction": 60 - len(kept) + 1, "inputs": stripped + 1}
    clock.now += 1.0  # a second refills the bucket
    _queue(recorder, model_server, 60, start=100)
    queued = list(recorder._queue)
    recorder.flush()
    _spent(queued, [b for _, _, b in outbox_records(box) if int(b["request_id"][1:]) >= 100])
    box.close()


def test_a_model_flush_interval_keeps_its_predictions_queued_until_due(
    tmp_path: Path, model_server: ModelServer
) -> None:
    clock = Clock()
    intervals = {"digits": 1.0}
    pacing = Pacing(intervals.get, lambda m: None, default_interval_s=0.1, tick_s=0.1, clock=clock)
    box = Outbox(tmp_path / "t.db")
    recorder = Recorder(box, lambda m: ModelPolicy(), pacing=pacing)
    _queue(recorder, model_server, 5)
    assert recorder.flush(force=False) == 5  # never committed before: due
    _queue(recorder, model_server, 3, start=5)
    clock.now += 0.5
    assert recorder.flush(force=False) == 0 and recorder.pending() == 3 and recorder.known("r6") == "digits"
    clock.now += 0.46  # within half a tick of the interval: due
    assert recorder.flush(force=False) == 3 and recorder.pending() == 0
    _queue(recorder, model_server, 2, start=8)
    assert recorder.flush() == 2, "an explicit flush (feedback, shutdown) commits everything"
    assert [b["request_id"] for _, _, b in outbox_records(box)] == [f"r{i}" for i in range(10)]
    box.close()


def test_the_agent_wires_the_per_model_limits_of_its_config(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(TOML)
    cfg = load_config(path, env={}, overrides={"data_dir": str(tmp_path / "data")})
    tel = open_telemetry(cfg, Metrics())
    assert tel is not None
    try:
        assert tel.outbox.quotas == {"digits": Quota(50, 65536)} and tel.outbox.max_rows == 1000
        assert tel.recorder.pacing is not None and tel.flush_interval_s == 0.05  # the writer wakes for digits
        assert tel.recorder.policy("digits").max_bps == 2000.0
    finally:
        tel.stop()


def test_a_running_agent_keeps_a_model_within_its_quota_and_its_flush_interval(
    tmp_path: Path, key_files: tuple[Path, Path]
) -> None:
    broker = Broker(tmp_path / "mosquitto")  # never started: everything stays in the outbox
    agent = AgentProcess(tmp_path / "data", broker.url, key_files[1], sample_inputs=1.0)
    agent.env.update(EDGEFLEET_TELEMETRY__MODELS__DIGITS__MAX_ROWS="40", EDGEFLEET_TELEMETRY__MAX_ROWS="1000")
    # digits' own flush interval, end to end: the device-wide one (10 min) would commit nothing within the test.
    agent.env.update(
        EDGEFLEET_TELEMETRY__FLUSH_INTERVAL_MS="600000", EDGEFLEET_TELEMETRY__MODELS__DIGITS__FLUSH_INTERVAL_MS="50"
    )
    agent.start()
    try:
        predict_many(agent, 300)
        wait_until(lambda: agent.telemetry()["outbox"]["dropped"].get("prediction", 0) >= 260, 30, "digits shed")
        outbox = agent.telemetry()["outbox"]
    finally:
        agent.stop()
    assert outbox["dropped"]["prediction"] == 260 and outbox["rows"] == 40 + 1, outbox  # + the restart event
