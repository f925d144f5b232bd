"""The shadow child's batching and reference timing, on the real runtime (in process: the logic, not the process)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.inference.golden import load_golden
from edge_agent.inference.runtime import LoadedModel, RuntimeOptions
from edge_agent.models.shadow import child
from edge_agent.models.shadow.blob import pack, unpack
from edge_agent.wire.model.manifest import MANIFEST_FILE, Manifest


def _model(digits_dir: Path, **options: int) -> LoadedModel:
    manifest = Manifest.load(digits_dir / MANIFEST_FILE)
    return LoadedModel(digits_dir / manifest.file, manifest, RuntimeOptions(num_threads=1, pool_size=1, **options))


@pytest.mark.parametrize(
    ("latency_s", "limits", "rows"),
    [
        (None, {}, child.BATCH_ROWS),  # not warmed up: no cost known, the full size
        (20e-6, {}, child.BATCH_ROWS),  # a cheap model: padding costs little
        (child.PAD_BUDGET_S / 2, {}, 2),  # two rows fit the budget, four would not
        (0.08, {}, 1),  # MobileNet-like: a padded copy would cost 4 invocations
        (20e-6, {"max_batch": 2}, 2),  # never above the model's batch limits
        (20e-6, {"max_batch": 64, "max_resident_batch": 1}, 1),
    ],
)
def test_the_padded_batch_fits_the_models_cost_and_limits(
    digits_dir: Path, latency_s: float | None, limits: dict[str, int], rows: int
) -> None:
    model = _model(digits_dir, **limits)
    model.warm_latency_s = latency_s
    assert child.batch_rows(model) == rows


def _blob(model: LoadedModel, digits_dir: Path, copies: int) -> bytes:
    x = load_golden(digits_dir / "golden.npz")["in:pixels"]
    samples = []
    for i in range(copies):
        inputs = {"pixels": x[i % len(x) : i % len(x) + 1]}
        samples.append((inputs, model.predict(inputs), 0.001))
    return pack(samples)


def test_every_batch_is_timed_on_the_reference_until_enough_pairs_then_every_nth(digits_dir: Path) -> None:
    candidate, reference = _model(digits_dir), _model(digits_dir)
    shadow = child.Shadow(candidate, reference)
    assert shadow.size == child.BATCH_ROWS  # not warmed up
    blob = _blob(reference, digits_dir, child.BATCH_ROWS)  # one batch per message
    for _ in range(child.MIN_PAIRS):
        for block in unpack(blob):
            shadow.run(block)
    assert len(shadow.tally.latency) == child.MIN_PAIRS
    more = 3 * child.REFERENCE_EVERY
    for _ in range(more):
        for block in unpack(blob):
            shadow.run(block)
    assert len(shadow.tally.latency) == child.MIN_PAIRS + 3
    figures = shadow.tally.to_dict()
    assert figures["samples"] == (child.MIN_PAIRS + more) * child.BATCH_ROWS
    assert figures["agreement"] == 1.0 and figures["errors"] == 0 and figures["latency_ratio"] is not None


def test_a_costly_candidate_runs_each_copy_alone(digits_dir: Path) -> None:
    candidate, reference = _model(digits_dir), _model(digits_dir)
    candidate.warm_latency_s = 0.08
    shadow = child.Shadow(candidate, reference)
    for block in unpack(_blob(reference, digits_dir, 5)):
        shadow.run(block)
    assert shadow.size == 1
    assert shadow.tally.batches == 5 and len(shadow.tally.latency) == 5  # one timed batch per copy
