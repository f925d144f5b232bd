"""Over the air, a candidate that fails on-device validation never takes traffic: the three cases.

(Golden-sample mismatches and a segfaulting model are covered in test_ota.py; here: a custom op the
device lacks, and a candidate over the release's latency budget.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.modelzoo import CUSTOM_OP, Zoo
from tests.support.models import replace_model
from tests.support.ota import Cloud, Device, relabel


def _assert_failed_in_validation(cloud: Cloud, dev: Device, release_id: str, reason: str) -> None:
    report = cloud.wait_result(dev.device_id, release_id)
    assert (report.state, report.result) == ("failed", "failed"), report
    assert reason in (report.reason or ""), report.reason
    dev.nothing_installed()
    assert dev.swaps == [], "the candidate took traffic"


def test_a_candidate_needing_a_custom_op_the_device_lacks(
    cloud: Cloud, v2: Path, tmp_path: Path, zoo: Zoo, make_device: Callable[..., Device]
) -> None:
    dev = make_device()
    cand = replace_model(relabel(v2, tmp_path / "custom", "2"), zoo.path("custom_op").read_bytes())
    _assert_failed_in_validation(cloud, dev, cloud.release(cand)["release_id"], CUSTOM_OP)


def test_a_candidate_over_the_release_latency_budget(
    cloud: Cloud, v2: Path, make_device: Callable[..., Device]
) -> None:
    dev = make_device()
    release_id = cloud.release(v2, max_latency_ms=1e-6)["release_id"]
    _assert_failed_in_validation(cloud, dev, release_id, "over the release's budget")
