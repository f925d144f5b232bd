"""The shadow's copy ring: copies stacked on the request path in memory the shadow child maps too."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.inference.childproc import Isolation
from edge_agent.inference.golden import load_golden
from edge_agent.inference.runtime import LoadedModel, RuntimeOptions
from edge_agent.models.shadow import ShadowModel, ShadowRunner
from edge_agent.models.shadow.blob import Block, pack, unpack
from edge_agent.models.shadow.ring import RING_BYTES, SLOTS, Ring, RingView, fits
from edge_agent.models.taps import ModelTaps
from edge_agent.wire import kserve_v2 as v2
from edge_agent.wire.model.manifest import MANIFEST_FILE, Manifest


def _copy(i: int, rows: int = 1) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    x = np.full((rows, 8, 8, 1), i, np.float32) + np.arange(rows, dtype=np.float32).reshape(rows, 1, 1, 1) / 10
    return {"pixels": x}, {"probs": np.full((rows, 10), i / 100, np.float32)}, i / 1000


def _same(got: list[Block], ids: Sequence[int], rows: Callable[[int], int] = lambda i: 1) -> None:
    """``got`` holds the copies ``ids`` as the general ``pack`` would send them (the ring's blocks may be split at the wrap)."""
    (want,) = unpack(pack([_copy(i, rows(i)) for i in ids]))
    assert [r for b in got for r in b.rows] == want.rows and [x for b in got for x in b.seconds] == want.seconds
    for side in ("inputs", "outputs"):
        b = getattr(want, side)
        a = {k: np.concatenate([getattr(g, side)[k] for g in got]) for k in b}
        assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in b)


def test_copies_come_out_in_order_through_a_second_mapping_across_the_wrap() -> None:
    ring = Ring(*_copy(0)[:2], size=5)
    view = RingView(ring.layout(), os.dup(ring.fd))  # what the child maps from the descriptor it is sent
    for i in range(4):
        assert ring.put(*_copy(i))
    first = ring.publish()
    assert first == (0, 4) and ring.publish() is None  # published once
    _same(view.blocks(*first), range(4))
    ring.free(3)  # the child is done with three; the fourth stays its own
    for i in range(4, 8):  # wraps around the end of the arrays
        assert ring.put(*_copy(i))
    assert not ring.put(*_copy(99)) and len(ring) == 5  # full: the copy is refused (the runner counts a drop)
    rest = ring.publish()
    assert rest == (4, 4)
    _same(view.blocks(*rest), range(4, 8))
    assert len(view.blocks(*rest)) == 2  # split at the wrap, views both
    ring.free(5)
    assert len(ring) == 0 and ring.publish() is None


def test_copies_of_several_rows_stay_contiguous_skipping_the_end_of_the_arrays() -> None:
    """Copies of 1-3 rows in a ring of 10: one that would straddle the end starts again at slot 0 (the
    skipped slots are published and freed with it, and never reach the child as rows)."""
    ring = Ring(*_copy(0, 2)[:2], size=10)  # made from a 2-row copy: the signature has no batch size
    view = RingView(ring.layout(), os.dup(ring.fd))
    rows = {0: 3, 1: 3, 2: 1, 3: 2, 4: 2, 5: 1, 6: 3}.__getitem__
    for i in range(3):  # slots 0-6
        assert ring.put(*_copy(i, rows(i)))
    first = ring.publish()
    assert first == (0, 7)
    _same(view.blocks(*first), range(3), rows)
    ring.free(7)
    assert ring.put(*_copy(3, rows(3)))  # slots 7-8
    assert ring.put(*_copy(4, rows(4)))  # slot 9 skipped: slots 0-1
    assert len(ring) == 5  # with the skipped slot
    rest = ring.publish()
    assert rest == (7, 5)
    got = view.blocks(*rest)
    assert [b.rows for b in got] == [[2], [2]]  # the skipped slot is stepped over, each copy whole
    _same(got, range(3, 5), rows)
    ring.free(5)
    assert len(ring) == 0
    assert ring.put(*_copy(5, 3)) and ring.put(*_copy(6, 3))  # slots 2-4, 5-7
    assert not ring.put(*_copy(7, 3))  # slots 8-9 are too few and 0-2 would need them skipped: full, dropped
    assert len(ring) == 6 and ring.put(*_copy(8, 2))  # nothing was marked by the refused copy: 8-9
    assert ring.publish() == (2, 8)
    _same(view.blocks(2, 8), [5, 6, 8], {5: 3, 6: 3, 8: 2}.__getitem__)


OPS = st.lists(st.one_of(st.integers(1, 4), st.sampled_from(["publish", "free"])), max_size=80)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(OPS)
def test_any_sequence_of_puts_publishes_and_frees_hands_over_exactly_the_copies_taken(ops: list[int | str]) -> None:
    """Copies of 1-4 rows (an int), hand-overs and the child's frees in any order on a ring of 16 rows:
    each hand-over's blocks hold exactly the copies taken since the last, in order, however they wrap;
    an empty ring takes any copy it accepts."""
    ring = Ring(*_copy(0)[:2], size=16)
    view = RingView(ring.layout(), os.dup(ring.fd))
    taken: list[tuple[int, int]] = []  # (copy id, rows) put since the last hand-over
    handed: list[int] = []  # slots of each hand-over the child has not freed yet, oldest first
    for n, op in enumerate(ops):
        if isinstance(op, int):
            empty = len(ring) == 0
            if ring.put(*_copy(n, op)):
                taken.append((n, op))
            else:
                assert not empty, "an empty ring refused a copy"
        elif op == "publish":
            span = ring.publish()
            assert (span is None) == (not taken)
            if span is not None:
                _same(view.blocks(*span), [i for i, _ in taken], dict(taken).__getitem__)
                handed.append(span[1])
                taken.clear()
        elif handed:
            ring.free(handed.pop(0))
    assert len(ring) == sum(handed) + (ring.publish() or (0, 0))[1]


def test_a_copy_of_more_rows_than_a_quarter_of_the_ring_goes_the_general_way() -> None:
    ring = Ring(*_copy(0)[:2], size=16)
    assert ring.max_rows == 4
    assert ring.matches(*_copy(1, 4)[:2]) and not ring.matches(*_copy(1, 5)[:2])
    assert not ring.matches({"pixels": np.zeros((2, 8, 8, 1), np.float32)}, _copy(1)[1])  # rows differ per tensor


def test_a_ring_of_large_copies_is_bounded_by_bytes() -> None:
    image = {"image": np.zeros((1, 224, 224, 3), np.float32)}
    ring = Ring(image, {"logits": np.zeros((1, 1000), np.float32)})
    assert ring.size < 64 and ring.size * image["image"].nbytes <= RING_BYTES
    assert Ring(*_copy(0)[:2]).size == SLOTS


def test_only_copies_of_the_rings_signature_go_in() -> None:
    inputs, outputs, _ = _copy(1)
    ring = Ring(inputs, outputs, size=4)
    assert ring.matches(inputs, outputs)
    assert not ring.matches({"other": inputs["pixels"]}, outputs)
    assert not ring.matches({"pixels": inputs["pixels"].astype(np.float64)}, outputs)
    assert not ring.matches({"pixels": np.zeros((1, 8, 8, 2), np.float32)}, outputs)
    assert not ring.matches(inputs, {"probs": np.zeros((1, 10), np.float32), "more": np.zeros((1, 1), np.float32)})
    assert fits(inputs, outputs) and fits(*_copy(1, 3)[:2])
    assert not fits({"pixels": np.zeros((2, 8, 8, 1), np.float32)}, outputs)  # 2 rows in, 1 out: the general path
    assert not fits({"pixels": np.float32(1.0)}, outputs)  # no batch dimension


@pytest.mark.parametrize("isolation", ["forkserver", "subprocess"])
def test_one_row_and_batch_copies_are_both_compared_by_the_shadow_process(
    digits_dir: Path, isolation: Isolation
) -> None:
    """The ring (one-row and batch copies, its memory handed over the child's socket in either mode) and the
    general path (a copy of another signature) side by side."""
    manifest = Manifest.load(digits_dir / MANIFEST_FILE)
    active = LoadedModel(digits_dir / manifest.file, manifest, RuntimeOptions(num_threads=1, pool_size=1))
    x = load_golden(digits_dir / "golden.npz")["in:pixels"]
    runner = ShadowRunner(
        ShadowModel("digits", "2", digits_dir),
        "1",
        1.0,
        reference=ShadowModel("digits", "1", digits_dir),
        isolation=isolation,
    )
    ringed = [{"pixels": x[i : i + 1]} for i in range(6)] + [{"pixels": x[:3]}, {"pixels": x[2:4]}]
    copies = [*ringed, {"pixels": x[:1].astype(np.float64)}]
    put: list[int] = []
    try:
        assert runner.ready.wait(60), runner.failure
        runner.offer("1", copies[0], active.predict(copies[0]), 0.001)  # makes the ring
        ring = runner._ring
        assert ring is not None
        real_put = ring.put
        ring.put = lambda i, o, s: put.append(len(i["pixels"])) or real_put(i, o, s)  # type: ignore[method-assign]
        for inputs in copies[1:]:
            runner.offer("1", inputs, active.predict(inputs), 0.001)
        deadline = time.monotonic() + 60
        while runner.figures().samples < len(copies):
            assert time.monotonic() < deadline and runner.failure is None, (runner.figures(), runner.failure)
            time.sleep(0.05)
    finally:
        runner.stop()
    figures = runner.figures()
    assert put == [1, 1, 1, 1, 1, 3, 2]  # every copy of the ring's signature went through it, the batches too
    assert len(ring) == 0  # all freed by the child
    assert figures.samples == len(copies) and figures.agreement == 1.0 and figures.dropped == 0


def test_the_request_path_can_leave_the_copy_until_the_response_is_sent(digits_dir: Path) -> None:
    """``ModelTaps.observe(..., later=...)`` schedules the shadow copy instead of taking it (the HTTP path
    passes the event loop's ``call_soon``); without ``later`` it is taken at once."""
    manifest = Manifest.load(digits_dir / MANIFEST_FILE)
    model = LoadedModel(digits_dir / manifest.file, manifest, RuntimeOptions(num_threads=1, pool_size=1))
    x = load_golden(digits_dir / "golden.npz")["in:pixels"][:1]
    body = json.dumps(
        {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    )
    request = v2.decode_request(body.encode(), None, manifest)
    outputs = model.predict_checked(request.inputs)
    offered: list[tuple[object, ...]] = []
    scheduled: list[tuple[object, ...]] = []

    class Runner:  # what the taps call on a shadow runner
        def offer(self, *args: object) -> None:
            offered.append(args)

        def stop(self) -> None:
            pass

    taps = ModelTaps()
    taps.start_shadow("digits", cast(ShadowRunner, Runner()))
    taps.observe(model, request, outputs, 0.001, lambda fn, *args: scheduled.append((fn, *args)))
    assert offered == [] and len(scheduled) == 1  # nothing copied yet: it waits for the loop
    fn, *args = scheduled[0]
    cast(Callable[..., None], fn)(*args)
    taps.observe(model, request, outputs, 0.002)
    assert [a[0] for a in offered] == [manifest.version, manifest.version] and offered[0][1] is request.inputs
    recent = taps.recent("digits", manifest.version)
    assert recent is not None and recent.count == 2  # the recent figures are kept at once either way
