"""Health windows that judge the model: each signal rolls a release back with its reason and figures.

Real mosquitto, a real device (store, runtime, OtaAgent) and a real HTTP server with a client
sending digits requests before (100 answers of version 1 first), during and after the update, so
the previous version's p99 and output distribution are measured on this device and compared with
the new version's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_agent.http.app import create_app
from edge_agent.update.health.signals import distribution
from edge_agent.wire.policy import Policy
from tests.apiserver import ApiServer
from tests.support.ota import Cloud, Device
from tests.support.shadow import digits_body, release_under_traffic, skewed

WINDOW = {"health_window_s": 2.0}


@pytest.fixture
def served(make_device: Callable[..., Device]) -> Iterator[tuple[Device, ApiServer]]:
    device = make_device()
    with ApiServer(create_app(device.server)) as api:
        yield device, api


def test_p99_latency_above_the_ratio_rolls_back(cloud: Cloud, served: tuple[Device, ApiServer], v2: Path) -> None:
    """The same model against a ratio it cannot meet (0.01 x its own p99): the latency signal fires."""
    device, api = served
    report, _ = release_under_traffic(
        cloud, device.device_id, api, v2, digits_body(v2), 100, **WINDOW, max_latency_ratio=0.01
    )
    assert report.result == "rolled-back", report
    reason = report.reason or ""
    assert reason.startswith("health window: p99 latency ") and "> 0.01 x 1's p99" in reason, reason
    assert "output distribution" not in reason
    assert device.store.active("digits") == "1" and device.server.get("digits").version == "1"


def test_an_output_distribution_shift_rolls_back(
    cloud: Cloud, served: tuple[Device, ApiServer], digits_dir: Path, tmp_path: Path
) -> None:
    device, api = served
    candidate = skewed(digits_dir, tmp_path / "skewed", "2")
    body = digits_body(digits_dir, rows=16)
    report, _ = release_under_traffic(cloud, device.device_id, api, candidate, body, 100, **WINDOW, max_output_psi=0.25)
    assert report.result == "rolled-back", report
    reason = report.reason or ""
    assert reason.startswith("health window: output distribution shift PSI ") and "> 0.25" in reason, reason
    assert "against 1's recent outputs" in reason
    assert device.store.active("digits") == "1"


def test_a_healthy_version_passes_every_signal(cloud: Cloud, served: tuple[Device, ApiServer], v2: Path) -> None:
    device, api = served
    policy = {**WINDOW, "max_latency_ratio": 50.0, "max_output_psi": 0.25}
    report, _ = release_under_traffic(cloud, device.device_id, api, v2, digits_body(v2, rows=16), 100, **policy)
    assert report.result == "success", report
    record = device.ota.machine.records.load("digits")
    assert record is not None and record.details["baseline"]["requests"] >= 30
    figures = record.details["signals"]
    assert figures["requests"] >= 30 and figures["output_psi"] < 0.01, figures
    assert device.store.active("digits") == "2"


def test_binned_outputs_for_a_regression() -> None:
    values = np.linspace(0, 1, 101) * 50  # one value per row, not a class
    ref = distribution(values, 1)
    assert len(ref["edges"]) == 11 and sum(ref["counts"]) == 101
    shifted = distribution(values + 25, 1, ref["edges"])
    assert shifted["counts"][-1] > ref["counts"][-1]
    assert distribution(np.array([0, 2, 2]), 4) == {"counts": [1, 0, 2, 0]}
    assert Policy().max_output_psi is None and Policy().max_latency_ratio is None  # off unless the release says
