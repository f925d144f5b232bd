"""The shadow's copy ring: one-row copies stacked on the request path, shipped as ``blob`` messages."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edge_agent.inference.golden import load_golden
from edge_agent.inference.runtime import LoadedModel, RuntimeOptions
from edge_agent.models.shadow import ShadowModel, ShadowRunner
from edge_agent.models.shadow.blob import pack, unpack
from edge_agent.models.shadow.ring import Ring, fits
from edge_agent.wire.model.manifest import MANIFEST_FILE, Manifest


def _copy(i: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    x = np.full((1, 8, 8, 1), i, np.float32)
    return {"pixels": x}, {"probs": np.full((1, 10), i / 100, np.float32)}, i / 1000


def test_copies_come_out_in_order_as_the_general_pack_would_send_them_across_the_wrap() -> None:
    ring = Ring(*_copy(0)[:2], size=5)
    for i in range(4):
        assert ring.put(*_copy(i))
    first = unpack(ring.take(3) or b"")
    for i in range(4, 8):  # wraps around the end of the arrays
        assert ring.put(*_copy(i))
    assert not ring.put(*_copy(99)) and len(ring) == 5  # full: the copy is refused (the runner counts a drop)
    rest = unpack(ring.take(64) or b"")
    assert ring.take(64) is None and len(ring) == 0
    for blocks, ids in ((first, range(3)), (rest, range(3, 8))):
        (got,) = blocks
        (want,) = unpack(pack([_copy(i) for i in ids]))
        assert got.rows == want.rows and got.seconds == want.seconds
        for side in ("inputs", "outputs"):
            a, b = getattr(got, side), getattr(want, side)
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_only_copies_of_the_rings_signature_go_in() -> None:
    inputs, outputs, _ = _copy(1)
    ring = Ring(inputs, outputs, size=4)
    assert ring.matches(inputs, outputs)
    assert not ring.matches({"other": inputs["pixels"]}, outputs)
    assert not ring.matches({"pixels": inputs["pixels"].astype(np.float64)}, outputs)
    assert not ring.matches({"pixels": np.zeros((1, 8, 8, 2), np.float32)}, outputs)
    assert not ring.matches(inputs, {"probs": np.zeros((1, 10), np.float32), "more": np.zeros((1, 1), np.float32)})
    assert fits(inputs, outputs)
    assert not fits({"pixels": np.zeros((2, 8, 8, 1), np.float32)}, outputs)  # a batch: the general path
    assert not fits({"pixels": np.float32(1.0)}, outputs)  # no batch dimension


def test_one_row_and_batch_copies_are_both_compared_by_the_shadow_process(digits_dir: Path) -> None:
    """The ring (one-row copies) and the general path (a 3-row copy, a copy of another signature) side by side."""
    manifest = Manifest.load(digits_dir / MANIFEST_FILE)
    active = LoadedModel(digits_dir / manifest.file, manifest, RuntimeOptions(num_threads=1, pool_size=1))
    x = load_golden(digits_dir / "golden.npz")["in:pixels"]
    runner = ShadowRunner(
        ShadowModel("digits", "2", digits_dir), "1", 1.0, reference=ShadowModel("digits", "1", digits_dir)
    )
    copies = [{"pixels": x[i : i + 1]} for i in range(6)] + [{"pixels": x[:3]}, {"pixels": x[:1].astype(np.float64)}]
    try:
        assert runner.ready.wait(60), runner.failure
        for inputs in copies:
            runner.offer("1", inputs, active.predict(inputs), 0.001)
        deadline = time.monotonic() + 60
        while runner.figures().samples < len(copies):
            assert time.monotonic() < deadline and runner.failure is None, (runner.figures(), runner.failure)
            time.sleep(0.05)
    finally:
        runner.stop()
    figures = runner.figures()
    assert runner._ring is not None and len(runner._ring) == 0  # the one-row copies went through the ring
    assert figures.samples == len(copies) and figures.agreement == 1.0 and figures.dropped == 0
