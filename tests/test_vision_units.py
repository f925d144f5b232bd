"""Frame preprocessing and ``raw`` postprocessing (#12), unit-level on small synthetic frames.

Each ``preprocessing`` option (colour order, range, mean/std, layout) is checked against a NumPy
reference written out here; ``raw`` results are checked on the real digits model's outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_digits

from edge_agent.inference.postprocess import postprocessing_of, top_k
from edge_agent.inference.preprocess import frame_to_tensor
from edge_agent.models.store import ModelStore
from edge_agent.streams.runner import frame_input, frame_result
from edge_agent.wire.model.manifest import Manifest
from tests.support.video import digit_frame

H, W = 4, 6  # the frame's own size: the resize is the identity, so the reference needs no interpolation
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _reference(frame: np.ndarray, pre: dict[str, Any]) -> np.ndarray:
    """What the manifest's preprocessing means, in NumPy: colour order, range, (x - mean) / std, layout."""
    x = frame.astype(np.float32)
    if pre.get("color", "rgb") == "rgb":
        x = x[..., ::-1]  # frames are BGR
    lo, hi = pre.get("range", [0, 255])
    x = lo + x * (hi - lo) / 255.0
    if "mean" in pre:
        x = (x - np.float32(pre["mean"])) / np.float32(pre["std"])
    x = x[None]
    return x.transpose(0, 3, 1, 2) if pre.get("layout") == "nchw" else x


@pytest.mark.parametrize(
    "options",
    [
        {"color": "bgr"},
        {"color": "rgb"},
        {"color": "bgr", "range": [0, 1], "mean": MEAN, "std": STD},
        {"color": "rgb", "range": [0, 1], "mean": MEAN, "std": STD, "layout": "nchw"},
        {"color": "bgr", "range": [-1, 1], "layout": "nchw"},
    ],
    ids=["bgr", "rgb", "bgr-mean-std", "rgb-mean-std-nchw", "bgr-nchw"],
)
def test_preprocessing_options_match_a_numpy_reference(options: dict[str, Any]) -> None:
    frame = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    pre = {"kind": "image", "height": H, "width": W, "channels": 3, **options}
    x, geometry = frame_to_tensor(frame, pre)
    want = _reference(frame, pre)
    assert x.dtype == np.float32 and x.shape == want.shape
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)
    assert (geometry.scale_x, geometry.scale_y) == (1.0, 1.0)


def test_raw_postprocessing_returns_the_outputs_as_they_are(store: ModelStore) -> None:
    """``{"kind": "raw"}`` (declared, or the default without labels) on the real digits model's outputs."""
    model = store.load("digits", "1")
    doc = model.manifest.to_dict()
    declared = Manifest.from_dict({**doc, "postprocessing": {"kind": "raw"}})
    unlabelled = Manifest.from_dict({**doc, "labels": None})
    assert postprocessing_of(unlabelled) == {"kind": "raw"}
    feeds, geometry = frame_input(model.manifest, digit_frame(load_digits().data[3]))
    outputs = model.predict(feeds)
    (name,) = outputs
    for manifest in (declared, unlabelled):
        result = frame_result(manifest, outputs, geometry)
        assert set(result) == {"kind", "outputs"} and result["kind"] == "raw"
        assert list(result["outputs"]) == [name]
        got = np.asarray(result["outputs"][name])
        assert got.shape == (1, 10) and np.array_equal(got, outputs[name])
    # The same scores the classifier reads: its best class is the raw arg-max.
    best = top_k(outputs[name], 1, model.manifest.labels)[0]
    assert best["label"] == "3" and best["index"] == int(np.argmax(got))
