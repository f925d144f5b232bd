"""A real third-party detector (#12): MediaPipe's face detector installed with ``--manifest``, run on a real photo.

``face_detection_short_range.tflite`` from the mediapipe 0.10.14 wheel, with the ``ssd_anchors``
postprocessing of docs/vision.md, on scikit-image's astronaut photo: exactly one face, over the face.
``edge-agent predict --video`` on a clip of the photo and ``cloud-batch score`` on the same clip agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from edge_agent.cli.main import main
from edge_agent.inference.modelpack import verify_version_dir
from edge_agent.inference.postprocess import ssd_anchors, ssd_detections
from edge_agent.models.serving import ModelServer
from edge_agent.models.store import ModelStore
from edge_agent.streams.runner import infer_frame
from edge_agent.streams.video import video_frames
from edge_agent.wire.model.vision import parse_postprocessing
from tests.support.env import MODELS
from tests.support.mediapipe import FACE_FIELDS, astronaut_bgr, face_detector
from tests.support.streams import iou, started_stream, stream_config
from tests.support.video import digits_clip, write_clip
from tests.support.wait import wait_for

# The astronaut's face (eyebrows to chin, cheek to cheek) in the 512x512 photo, measured once by eye.
FACE_BOX = [183.0, 80.0, 272.0, 182.0]
EDGE_AGENT = str(Path(sys.executable).with_name("edge-agent"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The detector installed with ``edge-agent models install --manifest`` into a fresh data dir."""
    tmp = tmp_path_factory.mktemp("face")
    fields = tmp / "face.json"
    fields.write_text(json.dumps(FACE_FIELDS))
    data = tmp / "data"
    r = subprocess.run(
        [EDGE_AGENT, "models", "install", str(face_detector()), "--name", "face_detector",
         "--manifest", str(fields), "--data-dir", str(data)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return data, fields


def _one_face(result: dict) -> list[float]:
    faces = result["detections"]
    assert len(faces) == 1, faces
    assert faces[0]["label"] == "face" and faces[0]["score"] > 0.8
    assert iou(faces[0]["box"], FACE_BOX) >= 0.5, faces[0]["box"]
    return faces[0]["box"]


def test_one_face_on_the_astronaut(installed: tuple[Path, Path]) -> None:
    store = ModelStore(installed[0])
    manifest = store.manifest("face_detector", "1")
    assert manifest.extra["postprocessing"]["kind"] == "ssd_anchors"
    assert manifest.preprocessing["resize"] == "letterbox"
    _one_face(infer_frame(store.load("face_detector", "1"), astronaut_bgr()))
    # The box is in source pixels: the same face cropped by a ROI lands on the same spot.
    roi_result = infer_frame(store.load("face_detector", "1"), astronaut_bgr(), roi=(100, 0, 300, 300))
    assert iou(_one_face(roi_result), FACE_BOX) >= 0.5


def test_a_running_stream_applies_its_roi(installed: tuple[Path, Path], tmp_path: Path) -> None:
    """A ``[[streams]]`` entry with ``roi``: the stream's boxes are ``infer_frame``'s with that ROI, in source pixels."""
    from prometheus_client import CollectorRegistry

    clip = write_clip(tmp_path / "astronaut.avi", [astronaut_bgr()] * 2, fps=10)
    roi = (100, 0, 300, 300)
    server = ModelServer(ModelStore(installed[0]))
    server.sync()
    cfg = stream_config(source=str(clip), model="face_detector", policy="every", loop=False, roi=list(roi))
    manager, stream, docs = started_stream(cfg, server, CollectorRegistry())
    try:
        wait_for(lambda: stream.state == "ended", 60, "the clip to end")
        model = server.get("face_detector")
        frame = next(video_frames(clip))[2]  # the decoded frame (MJPG), as the stream saw it
        with_roi, without = infer_frame(model, frame, roi), infer_frame(model, frame)
    finally:
        manager.stop()
        server.stop()
    assert [d["frame"] for d in docs] == [1, 2] and docs[0]["frame_size"] == [512, 512]
    assert docs[0]["result"] == with_roi != without  # the crop was applied: letterboxed differently, same face
    _one_face(docs[0]["result"])


def test_predict_video_and_the_cloud_give_the_same_boxes(installed: tuple[Path, Path], tmp_path: Path) -> None:
    data, fields = installed
    clip = write_clip(tmp_path / "astronaut.avi", [astronaut_bgr()] * 6, fps=10)
    out = tmp_path / "faces.jsonl"
    r = subprocess.run(
        [EDGE_AGENT, "predict", "face_detector", "--video", str(clip), "--every", "2", "--out", str(out),
         "--data-dir", str(data)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["frame"] for x in lines] == [0, 2, 4]
    device = [_one_face(x["result"]) for x in lines]
    # The cloud registers the same file with the same --manifest and runs the same frames.
    reg = tmp_path / "registry"
    rc = subprocess.run(
        [str(Path(sys.executable).with_name("cloud-batch")), "register", str(face_detector()), "--name",
         "face_detector", "--version", "1", "--registry", str(reg), "--manifest", str(fields)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rc.returncode == 0, rc.stderr
    scores = tmp_path / "faces.parquet"
    rs = subprocess.run(
        [str(Path(sys.executable).with_name("cloud-batch")), "score", "face_detector", "--version", "1",
         "--registry", str(reg), "--input", str(clip), "--output", str(scores), "--workers", "1", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert rs.returncode == 0, rs.stderr
    table = pq.read_table(scores, columns=["frame", "result"]).to_pylist()
    assert [r["frame"] for r in table] == [f"astronaut.avi#{i}" for i in range(6)]
    cloud = [_one_face(json.loads(r["result"])) for r in table[::2]]
    assert cloud == device


def test_bad_manifest_fields_are_refused_before_anything_is_installed(tmp_path: Path, capsys) -> None:
    broken = json.loads(json.dumps(FACE_FIELDS))
    del broken["postprocessing"]["anchors"]["min_scale"]
    cases = {
        "missing option": (broken, "anchors.min_scale: missing postprocessing option"),
        "unknown output": ({"postprocessing": {"kind": "classification", "output": "nope"}}, "postprocessing.output"),
        "identity": ({"sha256": "0" * 64}, "cannot be set"),
        "rename": ({"inputs": {"no_such_tensor": "image"}}, "no tensor ['no_such_tensor']"),
    }
    data = tmp_path / "data"
    for label, (fields, message) in cases.items():
        f = tmp_path / f"{label}.json"
        f.write_text(json.dumps(fields))
        code = main(["models", "install", str(face_detector()), "--name", "face", "--manifest", str(f),
                     "--data-dir", str(data)])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: ") and message in err, (label, err)
    assert ModelStore(data).versions("face") == []


def test_renamed_tensors_keep_their_golden_samples(tmp_path: Path) -> None:
    f = tmp_path / "names.json"
    f.write_text(json.dumps({**FACE_FIELDS, "inputs": {"input": "image"}, "outputs": {"classificators": "scores"}}))
    f2 = json.loads(f.read_text())
    f2["postprocessing"]["scores"] = "scores"
    f.write_text(json.dumps(f2))
    data = tmp_path / "data"
    assert main(["models", "install", str(face_detector()), "--name", "face", "--manifest", str(f),
                 "--data-dir", str(data)]) == 0  # fmt: skip
    store = ModelStore(data)
    m = store.manifest("face", "1")
    assert [t.name for t in m.inputs] == ["image"] and m.inputs[0].tensor == "input"
    verify_version_dir(store.version_dir("face", "1"))  # the golden samples follow the new names and still pass
    _one_face(infer_frame(store.load("face", "1"), astronaut_bgr()))


def test_ssd_decoding_and_both_nms_algorithms_on_known_outputs() -> None:
    """Two overlapping boxes on one anchor cell: hard NMS keeps the better one, weighted NMS their weighted mean."""
    post = parse_postprocessing(FACE_FIELDS["postprocessing"], ["regressors", "classificators"])
    assert post is not None
    anchors = ssd_anchors(post["anchors"])
    assert anchors.shape == (896, 4)  # 16x16x2 + 8x8x6, as MediaPipe's face_detection_short_range
    a = 16 * 8 + 8  # a cell in the middle of the 16x16 layer; a and a + 1 share its centre
    reg = np.zeros((1, 896, 16), np.float32)
    reg[0, a, :4] = [0, 0, 25.6, 25.6]  # a 0.2 x 0.2 box on the anchor's centre
    reg[0, a + 1, :4] = [6.4, 0, 25.6, 25.6]  # the same box 0.05 to the right
    logits = np.full((1, 896, 1), -20.0, np.float32)
    logits[0, a, 0], logits[0, a + 1, 0] = np.log(0.9 / 0.1), np.log(0.6 / 0.4)
    outputs = {"regressors": reg, "classificators": logits}
    cx, cy = anchors[a, :2]
    hard = ssd_detections(outputs, {**post, "nms": {**post["nms"], "weighted": False}}, None, ["face"])
    assert len(hard) == 1 and hard[0]["score"] == pytest.approx(0.9, abs=1e-4)
    np.testing.assert_allclose(hard[0]["box"], [cx - 0.1, cy - 0.1, cx + 0.1, cy + 0.1], atol=0.01)
    weighted = ssd_detections(outputs, post, None, ["face"])
    shift = 0.05 * 0.6 / (0.9 + 0.6)
    np.testing.assert_allclose(weighted[0]["box"], [cx - 0.1 + shift, cy - 0.1, cx + 0.1 + shift, cy + 0.1], atol=0.01)


def test_cloud_scoring_of_a_digits_video_and_its_bad_inputs(tmp_path: Path) -> None:
    from cloud_batch.errors import InputError
    from cloud_batch.score.job import score

    videos = tmp_path / "videos"
    videos.mkdir()
    labels = digits_clip(videos / "a.avi", n=20)
    out = tmp_path / "digits.parquet"
    score(MODELS, "digits", "1", videos, out, workers=1, progress=False)
    rows = pq.read_table(out, columns=["frame", "top_class", "result"]).to_pylist()
    assert [r["frame"] for r in rows] == [f"a.avi#{i}" for i in range(20)]
    assert sum(r["top_class"] == t for r, t in zip(rows, labels, strict=True)) >= 19
    assert all(json.loads(r["result"])["classes"][0]["index"] == r["top_class"] for r in rows)
    (videos / "b.avi").write_bytes(b"not a video at all")
    with pytest.raises(InputError, match=r"1 of 2 videos in .* cannot be decoded: 'b.avi'"):
        score(MODELS, "digits", "1", videos, tmp_path / "x.parquet", workers=1, progress=False)
    with pytest.raises(InputError, match="maintenance is not an image model"):
        score(MODELS, "maintenance", "1", videos / "a.avi", tmp_path / "y.parquet", workers=1, progress=False)
