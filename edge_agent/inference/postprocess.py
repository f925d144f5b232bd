"""Model outputs → results in source-frame pixels, as the manifest's ``postprocessing`` declares (wire/model/vision.py).

- ``classification``: the top-k classes with labels and scores;
- ``ssd_anchors``: MediaPipe-style SSD anchors (``SsdAnchorsCalculator``), box and keypoint
  decoding (``TensorsToDetectionsCalculator``), score threshold, then non-maximum suppression
  (OpenCV's ``dnn.NMSBoxes``; with ``nms.weighted`` each kept box becomes the score-weighted mean of
  the boxes it suppressed, as MediaPipe's WEIGHTED algorithm); boxes ``[x1, y1, x2, y2]`` in source pixels;
- ``raw``: the outputs as lists.

A model without ``postprocessing`` gets ``classification`` when its manifest has labels, else ``raw``.
Anchors are computed once per options block and cached.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from edge_agent.inference.preprocess import Geometry
from edge_agent.wire.model.manifest import Manifest
from edge_agent.wire.model.vision import parse_postprocessing

Result = dict[str, Any]


def postprocessing_of(manifest: Manifest) -> dict[str, Any]:
    """The manifest's postprocessing with its defaults (validated when the manifest was parsed)."""
    outputs = [t.name for t in manifest.outputs]
    post = parse_postprocessing(manifest.extra.get("postprocessing"), outputs)
    if post is None:
        if manifest.labels and len(outputs) == 1:
            return {"kind": "classification", "output": outputs[0], "top_k": 3, "labels": None}
        return {"kind": "raw"}
    return post


def postprocess(
    outputs: Mapping[str, np.ndarray], post: Mapping[str, Any], geometry: Geometry | None, labels: list[str] | None
) -> Result:
    """One frame's outputs (batch 1) → ``{"kind", "classes" | "detections" | "outputs"}``."""
    kind = post["kind"]
    if kind == "classification":
        return {"kind": kind, "classes": top_k(outputs[post["output"]], post["top_k"], post.get("labels") or labels)}
    if kind == "ssd_anchors":
        return {"kind": kind, "detections": ssd_detections(outputs, post, geometry, post.get("labels") or labels)}
    return {"kind": "raw", "outputs": {k: np.asarray(v).tolist() for k, v in outputs.items()}}


def top_k(scores: np.ndarray, k: int, labels: list[str] | None) -> list[dict[str, Any]]:
    """The ``k`` best classes of one prediction, best first."""
    flat = np.asarray(scores, dtype=np.float32).reshape(-1)
    order = np.argsort(-flat, kind="stable")[:k]
    return [
        {"index": int(i), "label": labels[i] if labels and i < len(labels) else str(int(i)), "score": float(flat[i])}
        for i in order
    ]


def _scale(min_scale: float, max_scale: float, index: int, count: int) -> float:
    return min_scale if count == 1 else min_scale + (max_scale - min_scale) * index / (count - 1)


@functools.lru_cache(maxsize=16)
def _anchors_cached(options_json: str) -> np.ndarray:
    o = json.loads(options_json)
    strides, n = o["strides"], o["num_layers"]
    rows: list[tuple[float, float, float, float]] = []
    layer = 0
    while layer < n:
        ratios: list[float] = []
        scales: list[float] = []
        last = layer
        while last < len(strides) and strides[last] == strides[layer]:
            scale = _scale(o["min_scale"], o["max_scale"], last, len(strides))
            if last == 0 and o["reduce_boxes_in_lowest_layer"]:
                ratios += [1.0, 2.0, 0.5]
                scales += [0.1, scale, scale]
            else:
                for r in o["aspect_ratios"]:
                    ratios.append(float(r))
                    scales.append(scale)
                if o["interpolated_scale_aspect_ratio"] > 0:
                    nxt = 1.0 if last == len(strides) - 1 else _scale(o["min_scale"], o["max_scale"], last + 1, n)
                    scales.append(math.sqrt(scale * nxt))
                    ratios.append(o["interpolated_scale_aspect_ratio"])
            last += 1
        sizes = [(s * math.sqrt(r), s / math.sqrt(r)) for s, r in zip(scales, ratios, strict=True)]
        fh = math.ceil(o["input_size_height"] / strides[layer])
        fw = math.ceil(o["input_size_width"] / strides[layer])
        for y in range(fh):
            for x in range(fw):
                cx, cy = (x + o["anchor_offset_x"]) / fw, (y + o["anchor_offset_y"]) / fh
                for w, h in sizes:
                    rows.append((cx, cy, 1.0, 1.0) if o["fixed_anchor_size"] else (cx, cy, w, h))
        layer = last
    return np.asarray(rows, dtype=np.float32)


def ssd_anchors(options: Mapping[str, Any]) -> np.ndarray:
    """``[N, 4]`` anchors ``(x_center, y_center, w, h)`` in normalised coordinates."""
    return _anchors_cached(json.dumps(dict(options), sort_keys=True))


def decode_boxes(raw: np.ndarray, anchors: np.ndarray, d: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Raw regressors ``[N, num_coords]`` → boxes ``[N, 4]`` (xmin, ymin, xmax, ymax) and keypoints ``[N, K, 2]``."""
    off = d["box_coord_offset"]
    r = raw.reshape(len(anchors), d["num_coords"]).astype(np.float32)
    if d["reverse_output_order"]:
        xc, yc, w, h = r[:, off], r[:, off + 1], r[:, off + 2], r[:, off + 3]
    else:
        yc, xc, h, w = r[:, off], r[:, off + 1], r[:, off + 2], r[:, off + 3]
    ax, ay, aw, ah = anchors[:, 0], anchors[:, 1], anchors[:, 2], anchors[:, 3]
    xc = xc / d["x_scale"] * aw + ax
    yc = yc / d["y_scale"] * ah + ay
    if d["apply_exponential_on_box_size"]:
        w, h = np.exp(w / d["w_scale"]) * aw, np.exp(h / d["h_scale"]) * ah
    else:
        w, h = w / d["w_scale"] * aw, h / d["h_scale"] * ah
    boxes = np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], axis=1)
    k, nv, ko = d["num_keypoints"], d["num_values_per_keypoint"], d["keypoint_coord_offset"]
    kp = np.zeros((len(anchors), k, 2), np.float32)
    for i in range(k):
        base = ko + i * nv
        first, second = r[:, base], r[:, base + 1]
        kx, ky = (first, second) if d["reverse_output_order"] else (second, first)
        kp[:, i, 0] = kx / d["x_scale"] * aw + ax
        kp[:, i, 1] = ky / d["y_scale"] * ah + ay
    return boxes, kp


def decode_scores(raw: np.ndarray, d: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Raw class scores ``[N, C]`` → the best score and class per anchor (clipped and sigmoid as configured)."""
    s = raw.reshape(raw.shape[-2] if raw.ndim > 1 else raw.shape[0], -1).astype(np.float64)
    if d["score_clipping_thresh"] is not None:
        s = np.clip(s, -d["score_clipping_thresh"], d["score_clipping_thresh"])
    if d["sigmoid_score"]:
        s = 1.0 / (1.0 + np.exp(-s))
    return s.max(axis=1), s.argmax(axis=1)


def ssd_detections(
    outputs: Mapping[str, np.ndarray], post: Mapping[str, Any], geometry: Geometry | None, labels: list[str] | None
) -> list[dict[str, Any]]:
    """Detections of one frame, best first: ``{"box", "score", "label", "keypoints"}`` in source pixels."""
    import cv2  # imported lazily: only detectors need OpenCV's NMS

    d, nms = post["decode"], post["nms"]
    anchors = ssd_anchors(post["anchors"])
    boxes, kps = decode_boxes(np.asarray(outputs[post["boxes"]]), anchors, d)
    scores, classes = decode_scores(np.asarray(outputs[post["scores"]]), d)
    keep = np.flatnonzero(scores >= d["min_score_thresh"])
    if keep.size == 0:
        return []
    b = boxes[keep]
    rects = [[float(x1), float(y1), float(x2 - x1), float(y2 - y1)] for x1, y1, x2, y2 in b]
    picked = cv2.dnn.NMSBoxes(
        rects, scores[keep].tolist(), float(d["min_score_thresh"]), float(nms["iou_threshold"]), top_k=0
    )
    order = sorted((int(i) for i in np.asarray(picked).reshape(-1)), key=lambda i: -scores[keep[i]])
    out = []
    for i in order[: nms["max_detections"]]:
        j = int(keep[i])
        box, kp = boxes[j], kps[j]
        if nms["weighted"]:  # MediaPipe's WEIGHTED: the score-weighted mean of the boxes this one suppressed
            near = keep[_iou(boxes[j], b) > nms["iou_threshold"]]
            w = scores[near] / scores[near].sum()
            box, kp = (boxes[near] * w[:, None]).sum(axis=0), (kps[near] * w[:, None, None]).sum(axis=0)
        x, y = box[0::2], box[1::2]
        kx, ky = kp[:, 0], kp[:, 1]
        if geometry is not None:
            x, y = geometry.to_source(x, y)
            kx, ky = geometry.to_source(kx, ky)
        c = int(classes[j])
        det: dict[str, Any] = {
            "box": [round(float(v), 2) for v in (x[0], y[0], x[1], y[1])],
            "score": round(float(scores[j]), 5),
            "label": labels[c] if labels and c < len(labels) else str(c),
        }
        if len(kx):
            det["keypoints"] = [[round(float(a), 2), round(float(b_), 2)] for a, b_ in zip(kx, ky, strict=True)]
        out.append(det)
    return out


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one ``[x1, y1, x2, y2]`` box with each row of ``others``."""
    w = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = w * h
    area = (box[2] - box[0]) * (box[3] - box[1]) + (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return np.asarray(inter / np.maximum(area - inter, 1e-12))


def best_score(result: Result) -> float | None:
    """The result's top score (a class or a detection), None when it has none (raw, or nothing detected)."""
    items = result.get("classes") or result.get("detections") or []
    return max((float(i["score"]) for i in items), default=None)
