"""MediaPipe's face detector for the camera tests: fetched once from the mediapipe wheel, cached by version.

``pip download mediapipe==0.10.14`` (no deps, a manylinux cp311 wheel, works from any Python) and
unzip the one ``face_detection_short_range.tflite``; a file lock keeps parallel test workers from
fetching twice. ``FACE_FIELDS`` are the ``--manifest`` fields of docs/vision.md.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

VERSION = "0.10.14"
MEMBER = "mediapipe/modules/face_detection/face_detection_short_range.tflite"
CACHE = Path(os.environ.get("EDGEFLEET_TEST_CACHE", Path(tempfile.gettempdir()) / "edgefleet-test-cache"))

# The worked example of docs/vision.md (MediaPipe's face_detection_short_range graph options).
FACE_FIELDS: dict[str, Any] = {
    "preprocessing": {"kind": "image", "height": 128, "width": 128, "channels": 3, "color": "rgb",
                      "resize": "letterbox", "range": [-1, 1]},
    "postprocessing": {
        "kind": "ssd_anchors",
        "boxes": "regressors",
        "scores": "classificators",
        "labels": ["face"],
        "anchors": {"num_layers": 4, "min_scale": 0.1484375, "max_scale": 0.75, "input_size_height": 128,
                    "input_size_width": 128, "anchor_offset_x": 0.5, "anchor_offset_y": 0.5,
                    "strides": [8, 16, 16, 16], "aspect_ratios": [1.0], "fixed_anchor_size": True},
        "decode": {"num_coords": 16, "box_coord_offset": 0, "x_scale": 128.0, "y_scale": 128.0, "w_scale": 128.0,
                   "h_scale": 128.0, "num_keypoints": 6, "keypoint_coord_offset": 4, "num_values_per_keypoint": 2,
                   "sigmoid_score": True, "score_clipping_thresh": 100.0, "reverse_output_order": True,
                   "min_score_thresh": 0.5},
        "nms": {"iou_threshold": 0.3, "max_detections": 100, "weighted": True},
    },
}  # fmt: skip


def face_detector() -> Path:
    """The cached ``face_detection_short_range.tflite`` (downloaded on first use)."""
    d = CACHE / f"mediapipe-{VERSION}"
    d.mkdir(parents=True, exist_ok=True)
    target = d / Path(MEMBER).name
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            with tempfile.TemporaryDirectory(dir=d) as tmp:
                subprocess.run(
                    [sys.executable, "-m", "pip", "download", f"mediapipe=={VERSION}", "--no-deps",
                     "--only-binary=:all:", "--python-version", "3.11", "--platform", "manylinux_2_17_x86_64",
                     "-d", tmp, "-q"],
                    check=True,
                    timeout=600,
                )  # fmt: skip
                wheel = next(Path(tmp).glob("mediapipe-*.whl"))
                with zipfile.ZipFile(wheel) as z:
                    data = z.read(MEMBER)
                part = target.with_suffix(".part")
                part.write_bytes(data)
                os.replace(part, target)
    return target


def astronaut_bgr() -> Any:
    """scikit-image's astronaut photo (512x512) as an OpenCV BGR frame."""
    import cv2
    from skimage import data

    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
