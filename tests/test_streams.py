"""Camera streams (#12) with real OpenCV, a real model, a real broker and the real HTTP server.

A digits clip rendered from scikit-learn's digits runs through a ``[[streams]]`` entry: the
predicted classes match the true labels, and MQTT, ``/latest`` and the SSE feed agree.
"""

from __future__ import annotations

import http.client
import io
import json
import signal
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry
from sklearn.datasets import load_digits

from edge_agent.cli.main import main
from edge_agent.http.app import create_app
from edge_agent.models.serving import ModelServer
from edge_agent.models.store import ModelStore
from edge_agent.streams.manager import StreamManager
from edge_agent.streams.video import progress_line, terminal_progress
from edge_agent.wire.topics import stream_results_topic
from tests.apiserver import ApiServer
from tests.support.env import MODELS
from tests.support.streams import get_json, stream_config, subscribe_ready
from tests.support.video import digit_frame, digits_clip, write_clip
from tests.support.wait import wait_for


def test_digits_clip_is_classified_and_mqtt_matches_latest(tmp_path: Path, model_server: ModelServer, mk_link) -> None:
    clip = tmp_path / "digits.avi"
    labels = digits_clip(clip, n=80)
    cfg = stream_config(source=str(clip), model="digits", policy="every", loop=False,
                        publish={"mqtt": True, "min_interval_ms": 0})  # fmt: skip
    device, listener = mk_link(), mk_link()
    got: list[dict] = []
    # The topic as docs/vision.md spells it, not as the code builds it.
    subscribe_ready(listener, device, "edgefleet/v1/fleets/f1/devices/dev1/streams/cam/results", got)
    registry = CollectorRegistry()
    manager = StreamManager([cfg], model_server, registry)
    manager.attach(device, "f1", "dev1")
    with ApiServer(create_app(model_server, streams=manager)) as api:
        manager.start()
        try:
            stream = manager.get("cam")
            wait_for(lambda: stream.state == "ended", 60, "the clip to end")
            status, latest = get_json(api.url, "/agent/streams/cam/latest")
            assert status == 200
            wait_for(lambda: got and got[-1]["frame"] == latest["frame"], 10, "the last MQTT result")
            _, listing = get_json(api.url, "/agent/streams")
            # The SSE feed starts with the newest result.
            conn = http.client.HTTPConnection(*api.url.split(":"), timeout=10)
            conn.request("GET", "/agent/streams/cam/events")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("content-type") == "text/event-stream"
            assert resp.readline() == b"event: result\n"
            sse = json.loads(resp.readline().removeprefix(b"data: "))
            conn.close()
        finally:
            manager.stop()
    s = listing["streams"][0]
    assert s["id"] == "cam" and s["state"] == "ended" and s["frames"]["processed"] == len(labels)
    assert s["frames"]["dropped"] == 0  # the every policy never drops
    correct = sum(r["result"]["classes"][0]["label"] == str(labels[r["frame"] - 1]) for r in got)
    assert len(got) == len(labels) and correct / len(got) >= 0.95, f"{correct}/{len(got)} correct"
    latest.pop("age_ms"), sse.pop("age_ms")
    assert got[-1] == latest == sse
    text = registry.get_sample_value("edgefleet_stream_frames_total", {"stream": "cam", "outcome": "processed"})
    assert text == len(labels)
    for histogram in ("edgefleet_stream_frame_age_seconds_count", "edgefleet_stream_latency_seconds_count"):
        assert registry.get_sample_value(histogram, {"stream": "cam"}) == len(labels)
    assert registry.get_sample_value("edgefleet_stream_source_state", {"stream": "cam", "state": "stopped"}) == 1


def test_a_clip_ends_only_after_its_last_frame_was_processed(tmp_path: Path, model_server: ModelServer) -> None:
    """``ended`` means every frame was handled: CI once saw a stream report it with the last frame still queued."""
    import threading

    clip = tmp_path / "digits.avi"
    digits_clip(clip, n=3)
    manager = StreamManager([stream_config(source=str(clip), model="digits", policy="every", loop=False)],
                            model_server, CollectorRegistry())  # fmt: skip
    stream = manager.get("cam")
    docs: list[dict] = []
    seen_while_held: list[str] = []
    release = threading.Event()

    def hold(doc: dict) -> None:  # keeps the inference thread on frame 2 until the reader has reached the end
        if doc["frame"] == 2:
            wait_for(stream.capture.ended.is_set, 30, "the reader to reach the end of the clip")
            seen_while_held.append(stream.state)
            release.wait(30)

    stream.subscribe(docs.append)
    stream.subscribe(hold)  # both before the start: frames 1 and 2 take microseconds
    manager.start()
    try:
        wait_for(lambda: bool(seen_while_held), 60, "frame 2 to be held")
        assert seen_while_held == ["running"], "frame 3 is still queued: not ended yet"
        release.set()
        wait_for(lambda: stream.state == "ended", 60, "the clip to end")
        assert [d["frame"] for d in docs] == [1, 2, 3]
    finally:
        release.set()
        manager.stop()


def test_mqtt_results_are_rate_limited_and_filtered_by_score(
    tmp_path: Path, model_server: ModelServer, mk_link
) -> None:
    clip = tmp_path / "digits.avi"
    digits_clip(clip, n=30)
    device, listener = mk_link(), mk_link()
    got: dict[str, list[dict]] = {"slow": [], "picky": [], "quiet": []}
    for sid, sink in got.items():
        subscribe_ready(listener, device, stream_results_topic("f1", "dev1", sid), sink)
    configs = [
        stream_config(id="slow", source=str(clip), model="digits", policy="every", loop=False,
                      publish={"min_interval_ms": 600_000}),
        stream_config(id="picky", source=str(clip), model="digits", policy="every", loop=False,
                      publish={"min_interval_ms": 0, "min_score": 1.01}),
        stream_config(id="quiet", source=str(clip), model="digits", policy="every", loop=False,
                      publish={"mqtt": False, "min_interval_ms": 0}),
    ]  # fmt: skip
    manager = StreamManager(configs, model_server, CollectorRegistry())
    manager.attach(device, "f1", "dev1")
    manager.start()
    try:
        wait_for(lambda: all(s["state"] == "ended" for s in manager.status()), 60, "the clips to end")
        wait_for(lambda: got["slow"], 10, "the one message of the rate-limited stream")
    finally:
        manager.stop()
    assert len(got["slow"]) == 1 and got["picky"] == [] and got["quiet"] == []
    assert [s["published"] for s in manager.status()] == [1, 0, 0]  # quiet: mqtt = false publishes nothing
    assert [s["frames"]["processed"] for s in manager.status()] == [30, 30, 30]


class FakeTerminal(io.StringIO):
    """A stderr that says it is a terminal: the progress bar is drawn only on one."""

    def isatty(self) -> bool:
        return True


def test_predict_video_on_the_digits_clip_and_its_bad_inputs(tmp_path: Path, store, capsys, monkeypatch) -> None:
    clip = tmp_path / "digits.avi"
    labels = digits_clip(clip, n=30)
    out = tmp_path / "r.jsonl"
    data = ["--data-dir", str(store.root.parent)]
    tty = FakeTerminal()
    with monkeypatch.context() as m:
        m.setattr(sys, "stderr", tty)
        assert main(["predict", "digits", "--video", str(clip), "--every", "3", "--out", str(out), *data]) == 0
    # A bar redrawn in place once per processed frame (10 of 30 with --every 3), its line ended before the summary.
    bar = tty.getvalue()
    assert bar.count("\r") == 10 and "\rframes [###" + "-" * 27 + "]  1/10  10%\r" in bar, bar
    assert bar.endswith("\rframes [" + "#" * 30 + f"] 10/10 100%\n10 frames -> {out}\n"), bar
    assert terminal_progress(30, 3, io.StringIO()) is None  # not a terminal (a pipe, a log): no bar
    err, lines = FakeTerminal(), FakeTerminal()
    with monkeypatch.context() as m:  # the lines go to the terminal: no bar drawn over them
        m.setattr(sys, "stderr", err)
        m.setattr(sys, "stdout", lines)
        assert main(["predict", "digits", "--video", str(clip), "--every", "3", *data]) == 0
    assert err.getvalue() == "" and len(lines.getvalue().splitlines()) == 10
    assert progress_line(7, 0) == "frames 7"  # a container that does not say its length
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["frame"] for x in lines] == list(range(0, 30, 3))
    assert sum(x["result"]["classes"][0]["label"] == str(labels[x["frame"]]) for x in lines) >= 0.95 * len(lines)
    capsys.readouterr()
    cases = {
        ("maintenance", str(clip), "1"): "maintenance is not an image model",
        ("digits", str(tmp_path / "none.avi"), "1"): "video file not found",
        ("digits", str(out), "1"): "cannot open video r.jsonl",
        ("digits", str(clip), "0"): "--every must be at least 1",
    }
    ModelStore(store.root.parent).install_dir(MODELS / "maintenance" / "1")
    for (model, video, every), message in cases.items():
        assert main(["predict", model, "--video", video, "--every", every, *data]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err


def test_predict_video_killed_mid_run_leaves_no_partial_output(tmp_path: Path, store) -> None:
    clip = tmp_path / "long.avi"
    write_clip(clip, [digit_frame(d) for d in load_digits().data[:100]] * 15, fps=25)  # 1500 frames
    out, part = tmp_path / "r.jsonl", tmp_path / ".r.jsonl.part"
    cmd = [str(Path(sys.executable).with_name("edge-agent")), "predict", "digits", "--video", str(clip), "--out",
           str(out), "--data-dir", str(store.root.parent)]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    wait_for(lambda: part.exists() and part.stat().st_size > 0, 60, "the first lines")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not out.exists()  # killed while writing: nothing under the output's name
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    assert len(out.read_text().splitlines()) == 1500 and not part.exists()
