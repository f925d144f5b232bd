"""Turn files into model inputs: ``.npy``, ``.json`` and, for image models, image files.

Image preprocessing follows the manifest's ``preprocessing`` block, e.g. for digits::

    {"kind": "image", "height": 8, "width": 8, "channels": 1, "range": [0, 16], "invert": true}

The camera pipeline (``edge_agent/streams``) and ``predict --video`` use ``frame_to_tensor`` on frames,
which also returns the geometry that maps boxes back onto the source frame.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import RequestError
from edge_agent.wire.model.manifest import Manifest

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Geometry:
    """How a model input maps back onto the source frame: ``source = offset + (model_px - pad) / scale``."""

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    offset_x: float = 0.0  # the ROI's top-left corner in the frame
    offset_y: float = 0.0
    width: int = 0  # the model input's size in pixels
    height: int = 0

    def to_source(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised model coordinates (0-1) to source-frame pixels."""
        return (
            self.offset_x + (x * self.width - self.pad_x) / self.scale_x,
            self.offset_y + (y * self.height - self.pad_y) / self.scale_y,
        )


def frame_to_tensor(
    image: np.ndarray, pre: Mapping[str, Any], roi: Sequence[int] | None = None
) -> tuple[np.ndarray, Geometry]:
    """One decoded BGR (or grey) frame → the model's ``[1, H, W, C]`` (or NCHW) float32 tensor and its geometry.

    Follows the manifest's image ``preprocessing`` (``wire/model/vision.py``): optional ``roi``
    crop ``[x, y, w, h]``, colour order, stretch or letterbox resize, invert, range, mean/std, layout.
    """
    import cv2  # imported lazily: only image models need OpenCV

    h, w, c = int(pre["height"]), int(pre["width"]), int(pre.get("channels", 3))
    ox = oy = 0
    img = image
    if roi is not None:
        ox, oy = max(0, int(roi[0])), max(0, int(roi[1]))
        img = img[oy : oy + int(roi[3]), ox : ox + int(roi[2])]
        if img.size == 0:
            raise RequestError(f"roi {list(roi)} is outside the {image.shape[1]}x{image.shape[0]} frame")
    if img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if c == 1 and img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    elif c == 3 and img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if c == 3 and pre.get("color", "rgb") == "rgb":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    src_h, src_w = img.shape[:2]
    if pre.get("resize", "stretch") == "letterbox":
        s = min(w / src_w, h / src_h)
        nw, nh = max(1, round(src_w * s)), max(1, round(src_h * s))
        px, py = (w - nw) // 2, (h - nh) // 2
        inner = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        pad = float(pre.get("pad", 0))
        img = cv2.copyMakeBorder(inner, py, h - nh - py, px, w - nw - px, cv2.BORDER_CONSTANT, value=(pad,) * 3)
        geo = Geometry(nw / src_w, nh / src_h, px, py, ox, oy, w, h)
    else:
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        geo = Geometry(w / src_w, h / src_h, 0.0, 0.0, ox, oy, w, h)
    x = img.astype(np.float32).reshape(h, w, c)
    if pre.get("invert"):
        x = 255.0 - x
    lo, hi = pre.get("range", [0, 255])
    x = lo + x * ((float(hi) - float(lo)) / 255.0)
    if pre.get("mean") is not None:
        x = x - np.asarray(pre["mean"], np.float32)
    if pre.get("std") is not None:
        x = x / np.asarray(pre["std"], np.float32)
    x = x.reshape(1, h, w, c)
    if pre.get("layout", "nhwc") == "nchw":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32), geo


def image_to_tensor(image: np.ndarray, pre: Mapping[str, Any]) -> np.ndarray:
    """Resize/convert one decoded image (H×W or H×W×C, uint8) into the model's float32 input tensor."""
    return frame_to_tensor(image, pre)[0]


def image_input(manifest: Manifest) -> str:
    """The one input an image model's frames feed; RequestError when the model takes no image."""
    pre = manifest.preprocessing
    if pre.get("kind") != "image" or len(manifest.inputs) != 1:
        raise RequestError(f"{manifest.name} is not an image model (no image preprocessing in its manifest)")
    return manifest.inputs[0].name


def load_input_file(path: str | Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """Read ``path`` into ``{input name: array}`` for ``manifest``'s model.

    - ``.npy``: the array for a single-input model;
    - ``.npz``: one array per input name;
    - ``.json``: ``{"input name": nested list}`` or a bare nested list for a single-input model;
    - an image file: decoded with OpenCV and shaped by the manifest's ``preprocessing``.
    """
    p = Path(path)
    if not p.is_file():
        raise RequestError(f"input file not found: {p}")
    only = manifest.inputs[0].name if len(manifest.inputs) == 1 else None
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            if only is None:
                raise RequestError(f"{manifest.name} has several inputs; use .npz or .json keyed by input name")
            return {only: np.load(p, allow_pickle=False)}
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        if suffix == ".json":
            raw = json.loads(p.read_text())
            if isinstance(raw, dict):
                return {k: np.asarray(v, dtype=np.float32) for k, v in raw.items()}
            if only is None:
                raise RequestError(f"{manifest.name} has several inputs; the JSON must map input names to arrays")
            return {only: np.asarray(raw, dtype=np.float32)}
    except (ValueError, OSError) as exc:
        raise RequestError(f"cannot read {p.name}: {exc}") from exc
    if suffix in IMAGE_SUFFIXES:
        name = image_input(manifest)
        import cv2

        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise RequestError(f"cannot decode image {p.name}")
        return {name: image_to_tensor(img, manifest.preprocessing)}
    raise RequestError(f"unsupported input file type {suffix or p.name!r}: use .npy, .npz, .json or an image")
