"""Turn files into model inputs: ``.npy``, ``.json`` and, for image models, image files.

Image preprocessing follows the manifest's ``preprocessing`` block, e.g. for digits::

    {"kind": "image", "height": 8, "width": 8, "channels": 1, "range": [0, 16], "invert": true}

The camera pipeline will reuse ``image_to_tensor`` on frames.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import RequestError
from edge_agent.wire.manifest import Manifest

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}


def image_to_tensor(image: np.ndarray, pre: Mapping[str, Any]) -> np.ndarray:
    """Resize/convert one decoded image (H×W or H×W×C, uint8) into a ``[1, H, W, C]`` float32 tensor."""
    import cv2  # imported lazily: only image models need OpenCV

    h, w, c = int(pre["height"]), int(pre["width"]), int(pre.get("channels", 3))
    img = image
    if c == 1 and img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    elif c == 3 and img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if c == 3 and pre.get("color", "rgb") == "rgb":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    if pre.get("invert"):
        img = 255.0 - img
    lo, hi = pre.get("range", [0, 255])
    img = lo + img * ((float(hi) - float(lo)) / 255.0)
    return img.reshape(1, h, w, c).astype(np.float32)


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
        pre = manifest.preprocessing
        if pre.get("kind") != "image" or only is None:
            raise RequestError(f"{manifest.name} is not an image model (no image preprocessing in its manifest)")
        import cv2

        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise RequestError(f"cannot decode image {p.name}")
        if img.ndim == 3 and img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
        return {only: image_to_tensor(img, pre)}
    raise RequestError(f"unsupported input file type {suffix or p.name!r}: use .npy, .npz, .json or an image")
