"""Statistics of the shadow benchmarks (``shadow_bench``, ``shadow_toggle``): the p99 rise's interval, where the slow requests fall."""

from __future__ import annotations

import numpy as np

GOAL = 0.05  # the primary's p99 may rise at most 5%
BOOTSTRAP = 400  # resamples for the pooled p99 rise's interval


def working(handovers: np.ndarray, answers: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Which requests (started at ``starts``) began between a hand-over and the shadow process's next answer."""
    if not len(handovers) or not len(answers):
        return np.zeros(len(starts), bool)
    last = np.searchsorted(handovers, starts) - 1
    begun = handovers[np.clip(last, 0, None)]
    done = np.searchsorted(answers, begun)  # the first answer after that hand-over
    ends = np.where(done < len(answers), answers[np.clip(done, 0, len(answers) - 1)], np.inf)
    return (last >= 0) & (starts < ends)


def when_slow(label: str, threshold_s: float, lat: np.ndarray, working: np.ndarray) -> str:
    """Whether the slow requests (above the shadow-off p99) fall where the shadow process works.

    Within the same rounds, so a drift of the machine between rounds does not enter: if the shadow's
    work slowed the primary, the requests that started while it ran a hand-over's copies would be
    slow more often than the others."""
    if not working.any():  # rounds too short to hold a hand-over, or no copy handed over
        return f"{label}: no request started while the shadow process ran copies"
    slow = lat > threshold_s
    inside = float(slow[working].mean())
    outside = float(slow[~working].mean()) if (~working).any() else float("nan")
    rise = np.percentile(lat, 99) / np.percentile(lat[~working], 99) - 1 if (~working).any() else float("nan")
    return (
        f"{label}: slow (above the off p99) {inside:.2%} of the requests that started while the shadow process "
        f"ran a hand-over's copies ({working.mean():.1%} of requests), {outside:.2%} of the others; "
        f"p99 of all {rise:+.1%} against the p99 of the others (same rounds)"
    )


def bootstrap(off: list[np.ndarray], on: list[np.ndarray], n: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """A 90% interval of the pooled p99 rise: rounds resampled with replacement, the same rounds of both modes.

    Rounds were run in adjacent pairs, so a resample keeps each pair together: the interval covers how
    the rise moves with which stretches of the run were measured, not only the sampling of one p99."""
    rng = np.random.default_rng(seed)
    rises = []
    for _ in range(n):
        pick = rng.integers(0, len(off), len(off))
        p99_on = np.percentile(np.concatenate([on[i] for i in pick]), 99)
        rises.append(p99_on / np.percentile(np.concatenate([off[i] for i in pick]), 99) - 1)
    low, high = np.percentile(rises, [5, 95])
    return float(low), float(high)
