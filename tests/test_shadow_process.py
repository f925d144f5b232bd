"""The shadow candidate runs in its own process: a sealed candidate opens there, a death there rejects.

Real child processes, the real runtime and the real verdict code (``update.shadow.compare_live``);
only the request traffic is offered by the test instead of an HTTP client (``test_shadow.py``
proves the whole path on a real agent).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_agent.models import sealed
from edge_agent.models.shadow import ShadowModel, ShadowRunner
from edge_agent.models.taps import ModelTaps
from edge_agent.update.shadow.verdict import ShadowHost, compare_live
from edge_agent.wire.policy import Policy
from edge_agent.wire.shadow import ShadowFigures
from tests.support.shadow import offer

POLICY = Policy(mode="shadow", shadow_rate=1.0, shadow_min_samples=10_000, shadow_window_s=60)


def test_a_sealed_candidate_opens_in_the_frozen_agents_child(
    digits_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The frozen agent's way, with an encrypted candidate: its own binary re-run as `edge-agent __shadow__ --fd N`.

    ``sys.frozen`` only selects that path; the binary is the real `edge-agent` entry point (its
    `cli.main` dispatches the hidden command), the child and the runtime are real.
    """
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(Path(sys.executable).parent / "edge-agent"))
    key_path, pub_path = sealed.generate_fleet_key(tmp_path / "keys")
    sealed_dir = tmp_path / "sealed"
    sealed.seal_version_dir(digits_dir, sealed_dir, sealed.load_fleet_pub(pub_path))
    candidate = ShadowModel("digits", "1", sealed_dir, key_path)
    runner = ShadowRunner(candidate, "1", 1.0, reference=ShadowModel("digits", "1", digits_dir), isolation="subprocess")
    try:
        assert runner.ready.wait(60), runner.failure
        offer(runner, digits_dir, 5)
        deadline = time.monotonic() + 60
        while runner.figures().samples < 5:
            assert time.monotonic() < deadline and runner.failure is None, (runner.figures(), runner.failure)
            time.sleep(0.05)
    finally:
        runner.stop()
    assert runner.figures().agreement == 1.0 and runner.child_pid != os.getpid()


def _host(taps: ModelTaps, digits_dir: Path, candidate_dir: Path, fleet_key: Path | None = None) -> ShadowHost:
    def load(name: str, version: str) -> ShadowModel:
        return ShadowModel(name, version, candidate_dir if version == "2" else digits_dir, fleet_key)

    return ShadowHost(taps, load)


def test_a_shadow_process_that_dies_rejects_and_the_agent_lives_on(digits_dir: Path) -> None:
    taps, killed = ModelTaps(), list[int]()
    host = _host(taps, digits_dir, digits_dir)

    def wait(event: threading.Event, timeout: float) -> bool:  # the verdict's poll: kill the child once it runs
        runner = taps.shadows()["digits"]
        if not killed and runner.child_pid is not None and runner.figures().samples:
            os.kill(runner.child_pid, signal.SIGKILL)
            killed.append(runner.child_pid)
        elif not killed:
            offer(runner, digits_dir, 3)
        return event.wait(timeout)

    host.wait = wait
    reports: list[ShadowFigures] = []
    ok, reason = compare_live(host, "digits", "1", "2", POLICY, threading.Event(), 0.05, reports.append)
    assert not ok and killed
    assert reason.startswith("shadow rejected: shadow process died (SIGKILL) ("), reason
    assert reports[-1].verdict == "reject" and reports[-1].samples >= 1  # the figures it had are kept


def test_a_candidate_the_shadow_process_cannot_open_rejects(digits_dir: Path, tmp_path: Path) -> None:
    """A sealed candidate without the fleet key: the child reports why, the verdict rejects with it."""
    _, pub_path = sealed.generate_fleet_key(tmp_path / "keys")
    sealed.seal_version_dir(digits_dir, tmp_path / "sealed", sealed.load_fleet_pub(pub_path))
    host = _host(ModelTaps(), digits_dir, tmp_path / "sealed")
    ok, reason = compare_live(host, "digits", "1", "2", POLICY, threading.Event(), 0.05, lambda f: None)
    assert not ok and "shadow process could not load the versions: SealedModelRejected" in reason, reason


def test_a_restarted_shadow_goes_on_from_its_saved_figures_and_window(digits_dir: Path) -> None:
    """What `shadowing` saved with the update record before a restart: the counts carry over, the window's rest."""
    saved = {"samples": 500, "rows": 500, "agree": 500, "errors": 0, "abs_sum": 0.0, "pairs": [[0.001, 0.001]]}
    resume = {"figures": saved, "elapsed_s": 59.5}  # of a 60 s window: no traffic comes, the window ends
    kept: list[dict[str, object]] = []
    host = _host(ModelTaps(), digits_dir, digits_dir)
    ok, reason = compare_live(
        host, "digits", "1", "2", POLICY, threading.Event(), 0.05, lambda f: None, resume, kept.append
    )
    assert ok and reason.startswith("shadow passed: 500 samples, agreement 1.000, latency ratio 1.00"), reason
    assert kept and kept[-1]["figures"]["samples"] == 500  # type: ignore[index]
    assert 59.5 <= kept[-1]["elapsed_s"] < 60  # type: ignore[operator]  # the window went on from 59.5 s


def test_the_window_opens_once_the_shadow_process_has_loaded(digits_dir: Path) -> None:
    """A load slower than the whole window (a loaded machine): the window is not spent waiting for it.

    The host's clock jumps past the window at the moment the child reports both versions loaded;
    the copies offered after that are still compared for the window's full length.
    """
    taps = ModelTaps()
    host = _host(taps, digits_dir, digits_dir)
    policy = Policy(  # the same model twice; this test is about the window, so the latency rule stays out of the way:
        # 3 samples' p50 ratio is noise on a loaded box (25.7 seen in CI, against a rule of 20 then)
        mode="shadow",
        shadow_rate=1.0,
        shadow_min_samples=3,
        shadow_window_s=5,
        promote_max_latency_ratio=1e6,
    )

    def clock() -> float:
        runner = taps.shadows().get("digits")
        return time.monotonic() + (0.0 if runner is None or not runner.ready.is_set() else 10.0)

    def wait(event: threading.Event, timeout: float) -> bool:
        runner = taps.shadows()["digits"]
        if runner.ready.is_set():
            offer(runner, digits_dir, 1)
        return event.wait(timeout)

    host.monotonic, host.wait = clock, wait
    ok, reason = compare_live(host, "digits", "1", "2", policy, threading.Event(), 0.05, lambda f: None)
    assert ok and reason.startswith("shadow passed: ") and "no request" not in reason, reason
