"""``[[streams]]`` at config load, the manifest's vision fields, and frame sampling into the outbox (#12).

Every bad stream entry is a ConfigError at load that names the stream and the key; sampled frames
land in the real SQLite outbox as JPEGs, capped per hour and in size.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.datasets import load_digits

from edge_agent.cli.main import main
from edge_agent.config import load_config
from edge_agent.config.streams import SampleConfig
from edge_agent.errors import ConfigError, ManifestError
from edge_agent.streams.outputs import Sampler
from edge_agent.telemetry.outbox import Outbox
from edge_agent.wire.model.manifest import Manifest
from tests.support.mediapipe import FACE_FIELDS
from tests.support.video import digit_frame


def _load(tmp_path: Path, toml: str):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(toml)
    return load_config(cfg, env={})


def test_a_good_stream_entry_loads_with_its_defaults(tmp_path: Path) -> None:
    clip = tmp_path / "a.avi"
    clip.write_bytes(b"x")
    cfg = _load(tmp_path, f'''
[[streams]]
id = "dock-cam"
source = "rtsp://10.0.0.5/stream1"
model = "face_detector"
max_fps = 10
roi = [0, 0, 1280, 720]
publish = {{ mqtt = true, min_interval_ms = 200, min_score = 0.5 }}
sample = {{ rate = 0.01, on_low_confidence = 0.4, max_per_hour = 60 }}

[[streams]]
id = "file"
source = "{clip}"
model = "digits"
policy = "every"

[[streams]]
id = "usb"
source = 0
model = "digits"

[[streams]]
id = "v4l"
source = "/dev/video0"
model = "digits"
''')  # fmt: skip
    dock, file, usb, v4l = cfg.streams
    assert dock.roi == (0, 0, 1280, 720) and dock.policy == "latest" and dock.publish.min_score == 0.5
    assert dock.sample.max_per_hour == 60 and not dock.is_file
    assert file.is_file and file.policy == "every" and usb.source == 0
    # A device path is taken as it is (no camera here: it is not checked at load), and it is not a file.
    assert v4l.source == "/dev/video0" and not v4l.is_file


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('source = "ftp://cam/x"\nmodel = "digits"', "unsupported URL scheme 'ftp'"),
        ('source = "/no/such/clip.avi"\nmodel = "digits"', "video file not found: /no/such/clip.avi"),
        ('source = "rtsp://"\nmodel = "digits"', "has no host"),
        ('source = 0\nmodel = "digits"\npolicy = "newest"', "policy: expected one of ['latest', 'every']"),
        ('source = 0\nmodel = "digits"\nroi = [0, 0, 10]', "roi: expected [x, y, width, height]"),
        ('source = 0\nmodel = "digits"\nmax_fps = -1', "max_fps: must be ≥ 0"),
        ('source = 0\nmodel = "digits"\nsample = { rate = 2.0 }', "rate and on_low_confidence are between 0 and 1"),
        ('source = 0\nmodel = "digits"\npublish = { qos = 1 }', "unknown keys ['qos']"),
        ('source = 0\nmodel = "digits"\nfps = 3', "unknown keys ['fps']"),
        ("source = 0", "missing key 'model'"),
        ('source = 0\nmodel = "a/b"', "invalid model 'a/b'"),
    ],
)
def test_bad_stream_entries_fail_at_load(tmp_path: Path, entry: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, f'[[streams]]\nid = "cam"\n{entry}\n')
    assert message in str(exc.value) and "streams[" in str(exc.value)


def test_duplicate_ids_and_a_bad_config_on_the_command_line(tmp_path: Path, capsys) -> None:
    twice = '[[streams]]\nid = "a"\nsource = 0\nmodel = "m"\n' * 2
    with pytest.raises(ConfigError, match=r"duplicate ids \['a'\]"):
        _load(tmp_path, twice)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[streams]]\nid = "a"\nsource = "gopher://x"\nmodel = "m"\n')
    assert main(["models", "list", "--config", str(bad), "--data-dir", str(tmp_path / "d")]) == 1
    assert capsys.readouterr().err.startswith("error: streams['a'].source: unsupported URL scheme")


def _manifest(**fields) -> dict:
    return {"schema_version": 1, "name": "m", "version": "1", "sha256": "0" * 64, "size": 1,
            "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 128, 128, 3]}],
            "outputs": [{"name": "regressors", "dtype": "float32", "shape": [1, 896, 16]},
                        {"name": "classificators", "dtype": "float32", "shape": [1, 896, 1]}], **fields}  # fmt: skip


def test_manifest_vision_fields_are_validated() -> None:
    Manifest.from_dict(_manifest(**FACE_FIELDS))
    post = FACE_FIELDS["postprocessing"]
    bad = {
        "resize": ({"preprocessing": {**FACE_FIELDS["preprocessing"], "resize": "crop"}}, "preprocessing.resize"),
        "std": ({"preprocessing": {**FACE_FIELDS["preprocessing"], "std": [0]}}, "std: must not be 0"),
        "height": ({"preprocessing": {"kind": "image", "width": 4}}, "preprocessing.height"),
        "kind": ({"postprocessing": {"kind": "yolo"}}, "postprocessing.kind"),
        "strides": (
            {"postprocessing": {**post, "anchors": {**post["anchors"], "strides": [8]}}},
            "anchors.strides: expected num_layers (4) strides",
        ),
        "option": (
            {"postprocessing": {**post, "decode": {"num_coords": 16}}},
            "decode.x_scale: missing postprocessing option",
        ),
    }
    for label, (fields, message) in bad.items():
        with pytest.raises(ManifestError) as exc:
            Manifest.from_dict(_manifest(**fields))
        assert message in str(exc.value), label


def test_sampled_frames_go_to_the_outbox_capped_per_hour_and_in_size(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "telemetry.db")
    now = [1000.0]
    cfg = SampleConfig(rate=0.5, on_low_confidence=0.6, max_per_hour=3, max_bytes=2048)
    sampler = Sampler(cfg, "cam", outbox.append, rng=random.Random(1), clock=lambda: now[0])
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)  # a JPEG far above 2 KiB at full size
    doc = {"model": "digits", "version": "1", "frame": 7, "frame_ts": 1.5, "latency_ms": 3.0,
           "result": {"kind": "classification", "classes": [{"index": 3, "label": "3", "score": 0.3}]}}  # fmt: skip
    assert sampler.offer(noisy, doc, 0.3)  # low confidence: always sampled
    while sampler.sampled < 3:
        sampler.offer(noisy, doc, 0.3)
    assert not sampler.offer(noisy, doc, 0.3) and sampler.capped == 1  # the hour's cap
    now[0] += 3600.0
    assert sampler.offer(digit_frame(load_digits().data[3]), doc, 0.3)  # a new hour
    rows = outbox.read_after(0, 10_000_000)
    assert len(rows) == 4 and all(kind == "prediction" for _, kind, _, _ in rows)
    body = json.loads(rows[-1][3])
    assert body["stream"] == "cam" and body["sample_reason"] == "low_confidence"
    assert body["outputs"] == doc["result"] and body["inputs"]["frame"]["shape"] == [128, 128, 3]
    for _, _, _, text in rows:
        jpeg = base64.b64decode(json.loads(text)["inputs"]["frame"]["jpeg_base64"])
        assert len(jpeg) <= cfg.max_bytes and cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR) is not None
    assert outbox.stats().rows == 4
    outbox.close()


def test_a_random_share_of_confident_frames_is_sampled() -> None:
    """``rate`` draws only for frames that are not low-confidence ones (those are always sampled)."""
    rows: list = []
    cfg = SampleConfig(rate=0.25, on_low_confidence=0.6, max_per_hour=1000)
    sampler = Sampler(cfg, "cam", rows.extend, rng=random.Random(7))
    frame = np.full((16, 16, 3), 200, np.uint8)
    doc = {"model": "digits", "version": "1", "frame": 1, "frame_ts": 1.5, "latency_ms": 3.0, "result": {}}
    scores = [0.3, 0.9, 0.95, None] * 50  # None: nothing detected, as low as it gets
    taken = [sampler.offer(frame, doc, s) for s in scores]
    draws = random.Random(7)
    want = [s is None or s < 0.6 or draws.random() < 0.25 for s in scores]
    assert taken == want and sampler.sampled == len(rows) == sum(want)
    reasons = [json.loads(r.body)["sample_reason"] for r in rows]
    assert reasons.count("low_confidence") == 100
    assert 0 < reasons.count("random") < 100  # a share of the 100 confident frames, not none or all
