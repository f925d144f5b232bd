"""Vision fields of a model manifest: image ``preprocessing`` and ``postprocessing`` (docs/vision.md).

``preprocessing`` with ``"kind": "image"`` (any other kind is left alone)::

    {"kind": "image", "height": 128, "width": 128, "channels": 3,
     "color": "rgb",            # rgb | bgr: channel order the model expects (frames are decoded BGR)
     "resize": "letterbox",     # stretch (default) | letterbox: keep the aspect ratio, pad with "pad"
     "pad": 0,                  # letterbox fill value (0-255)
     "range": [-1, 1],          # pixel 0..255 mapped linearly onto this range (default [0, 255])
     "mean": [0, 0, 0], "std": [1, 1, 1],   # then (x - mean) / std per channel (optional)
     "invert": false,           # 255 - pixel first (dark ink on white paper)
     "layout": "nhwc"}          # nhwc (default) | nchw

``postprocessing`` (optional; a model without it gives top-k classes when it has labels, else raw outputs)::

    {"kind": "classification", "output": "probs", "top_k": 3}
    {"kind": "raw"}
    {"kind": "ssd_anchors", "boxes": "regressors", "scores": "classificators",
     "anchors": {...}, "decode": {...}, "nms": {...}, "labels": ["face"]}

The ``ssd_anchors`` options are MediaPipe's ``SsdAnchorsCalculatorOptions`` and
``TensorsToDetectionsCalculatorOptions`` (snake_case names); every option without a default
below is required, and a missing one is a ManifestError that names it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from edge_agent.errors import ManifestError

IMAGE_KIND = "image"
POST_KINDS = ("classification", "ssd_anchors", "raw")

# option -> default (None: required). Types are checked from the default or, when required, from _TYPES.
ANCHOR_OPTIONS: dict[str, Any] = {
    "num_layers": None,
    "min_scale": None,
    "max_scale": None,
    "input_size_height": None,
    "input_size_width": None,
    "anchor_offset_x": 0.5,
    "anchor_offset_y": 0.5,
    "strides": None,
    "aspect_ratios": [1.0],
    "fixed_anchor_size": False,
    "interpolated_scale_aspect_ratio": 1.0,
    "reduce_boxes_in_lowest_layer": False,
}
DECODE_OPTIONS: dict[str, Any] = {
    "num_coords": None,
    "box_coord_offset": 0,
    "x_scale": None,
    "y_scale": None,
    "w_scale": None,
    "h_scale": None,
    "num_keypoints": 0,
    "keypoint_coord_offset": 4,
    "num_values_per_keypoint": 2,
    "reverse_output_order": True,
    "apply_exponential_on_box_size": False,
    "sigmoid_score": True,
    "score_clipping_thresh": None,
    "min_score_thresh": 0.5,
}
NMS_OPTIONS: dict[str, Any] = {"iou_threshold": 0.3, "max_detections": 100, "weighted": False}
_INTS = {"num_layers", "input_size_height", "input_size_width", "num_coords", "box_coord_offset"}
_INTS |= {"num_keypoints", "keypoint_coord_offset", "num_values_per_keypoint", "max_detections"}
_LISTS = {"strides": int, "aspect_ratios": float}
_OPTIONAL_NULL = {"score_clipping_thresh"}  # may be null: no clipping


def _number(value: Any, integer: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (not integer or isinstance(value, int)) and math.isfinite(value)


def _options(raw: Any, spec: dict[str, Any], where: str) -> dict[str, Any]:
    """One options block filled with its defaults; ManifestError names a missing, unknown or mistyped option."""
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ManifestError(f"{where}: expected an object")
    unknown = set(raw) - set(spec)
    if unknown:
        raise ManifestError(f"{where}: unknown options {sorted(unknown)} (known: {sorted(spec)})")
    out: dict[str, Any] = {}
    for key, default in spec.items():
        if key not in raw:
            if default is None and key not in _OPTIONAL_NULL:
                raise ManifestError(f"{where}.{key}: missing postprocessing option")
            out[key] = default
            continue
        value = raw[key]
        if key in _LISTS:
            ok = isinstance(value, list) and bool(value) and all(_number(v, _LISTS[key] is int) for v in value)
            ok = ok and all(v > 0 for v in value)
        elif isinstance(default, bool):
            ok = isinstance(value, bool)
        elif key in _OPTIONAL_NULL and value is None:
            ok = True
        else:
            ok = _number(value, key in _INTS)
        if not ok:
            kind = "a list of positive numbers" if key in _LISTS else type(default).__name__ if default else "a number"
            raise ManifestError(f"{where}.{key}: expected {kind}, got {value!r}")
        out[key] = value
    return out


def _output(post: Mapping[str, Any], key: str, outputs: list[str], where: str) -> str:
    name = post.get(key)
    if name is None and len(outputs) == 1:
        return outputs[0]
    if name not in outputs:
        raise ManifestError(f"{where}.{key}: expected one of the model's outputs {outputs}, got {name!r}")
    return str(name)


def parse_postprocessing(raw: Any, outputs: list[str]) -> dict[str, Any] | None:
    """Validate ``manifest.postprocessing`` against the output names; return it with every default filled in."""
    if raw is None:
        return None
    where = "manifest.postprocessing"
    if not isinstance(raw, Mapping):
        raise ManifestError(f"{where}: expected an object")
    kind = raw.get("kind")
    if kind not in POST_KINDS:
        raise ManifestError(f"{where}.kind: expected one of {list(POST_KINDS)}, got {kind!r}")
    if kind == "raw":
        return {"kind": "raw"}
    labels = raw.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise ManifestError(f"{where}.labels: expected a list of strings")
    if kind == "classification":
        top_k = raw.get("top_k", 3)
        if type(top_k) is not int or top_k < 1:
            raise ManifestError(f"{where}.top_k: expected a positive integer")
        return {"kind": kind, "output": _output(raw, "output", outputs, where), "top_k": top_k, "labels": labels}
    unknown = set(raw) - {"kind", "boxes", "scores", "anchors", "decode", "nms", "labels"}
    if unknown:
        raise ManifestError(f"{where}: unknown keys {sorted(unknown)}")
    if "anchors" not in raw or "decode" not in raw:
        raise ManifestError(f"{where}: ssd_anchors needs 'anchors' and 'decode' options (see docs/vision.md)")
    out = {
        "kind": kind,
        "boxes": _output(raw, "boxes", outputs, where),
        "scores": _output(raw, "scores", outputs, where),
        "anchors": _options(raw["anchors"], ANCHOR_OPTIONS, f"{where}.anchors"),
        "decode": _options(raw["decode"], DECODE_OPTIONS, f"{where}.decode"),
        "nms": _options(raw.get("nms"), NMS_OPTIONS, f"{where}.nms"),
        "labels": labels,
    }
    a = out["anchors"]
    if a["num_layers"] < 1 or len(a["strides"]) != a["num_layers"]:
        raise ManifestError(f"{where}.anchors.strides: expected num_layers ({a['num_layers']}) strides")
    d = out["decode"]
    if d["num_coords"] < 4 + d["box_coord_offset"] + d["num_keypoints"] * d["num_values_per_keypoint"]:
        raise ManifestError(f"{where}.decode.num_coords: too small for the box and keypoints it declares")
    return out


def _pair(raw: Mapping[str, Any], key: str, where: str) -> None:
    value = raw[key]
    if not isinstance(value, list) or len(value) != 2 or not all(_number(v, False) for v in value):
        raise ManifestError(f"{where}.{key}: expected [low, high]")


def check_image_preprocessing(pre: Mapping[str, Any]) -> None:
    """ManifestError unless an image ``preprocessing`` block is complete and well-typed (other kinds pass)."""
    if pre.get("kind") != IMAGE_KIND:
        return
    where = "manifest.preprocessing"
    for key in ("height", "width"):
        if type(pre.get(key)) is not int or pre[key] < 1:
            raise ManifestError(f"{where}.{key}: expected a positive integer")
    channels = pre.get("channels", 3)
    if channels not in (1, 3):
        raise ManifestError(f"{where}.channels: expected 1 or 3")
    for key, allowed in (("color", ("rgb", "bgr")), ("resize", ("stretch", "letterbox")), ("layout", ("nhwc", "nchw"))):
        if key in pre and pre[key] not in allowed:
            raise ManifestError(f"{where}.{key}: expected one of {list(allowed)}, got {pre[key]!r}")
    if "range" in pre:
        _pair(pre, "range", where)
    for key in ("mean", "std"):
        value = pre.get(key)
        if value is not None and (
            not isinstance(value, list) or len(value) not in (1, channels) or not all(_number(v, False) for v in value)
        ):
            raise ManifestError(f"{where}.{key}: expected 1 or {channels} numbers")
    if any(v == 0 for v in pre.get("std") or ()):
        raise ManifestError(f"{where}.std: must not be 0")
    if "pad" in pre and not (_number(pre["pad"], False) and 0 <= pre["pad"] <= 255):
        raise ManifestError(f"{where}.pad: expected a number 0-255")
    if "invert" in pre and not isinstance(pre["invert"], bool):
        raise ManifestError(f"{where}.invert: expected true or false")


def check_vision(raw: Mapping[str, Any], inputs: list[Any], outputs: list[str]) -> None:
    """The manifest parser's hook: image preprocessing against the single image input, and postprocessing."""
    pre = raw.get("preprocessing") or {}
    if isinstance(pre, Mapping) and pre.get("kind") == IMAGE_KIND:
        check_image_preprocessing(pre)
        if len(inputs) != 1:
            raise ManifestError("manifest.preprocessing: an image model has exactly one input")
    parse_postprocessing(raw.get("postprocessing"), outputs)
