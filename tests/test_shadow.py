"""Shadow releases end to end: a real mosquitto, a real device (store, runtime, OtaAgent), a real HTTP server.

A client keeps sending digits requests while the cloud publishes a signed shadow release of
version 2. The candidate is fed a copy of the live requests and compared with version 1;
it is promoted (activation, health window, commit) when the rules hold, and rejected with
its figures otherwise. Every answer a client got names the version that computed it, so
"the candidate never answered a client" is checked on the answers themselves.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.http.app import create_app
from edge_agent.wire.shadow import PRIORITIES
from tests.apiserver import ApiServer
from tests.support.ota import Cloud, Device
from tests.support.shadow import Traffic, digits_body, release_under_traffic, skewed

SHADOW = {"mode": "shadow", "shadow_rate": 1.0, "shadow_min_samples": 200, "shadow_window_s": 60.0}


@pytest.fixture
def served(make_device: Callable[..., Device]) -> Iterator[tuple[Device, ApiServer]]:
    device = make_device()
    with ApiServer(create_app(device.server)) as api:
        yield device, api


def shadow_states(device: Device) -> list[str]:
    record = device.ota.machine.records.load("digits")
    assert record is not None
    return [s for s, _ in record.history]


def test_an_agreeing_candidate_is_promoted_and_serves_after_its_health_window(
    cloud: Cloud, served: tuple[Device, ApiServer], v2: Path, digits_dir: Path
) -> None:
    device, api = served
    with Traffic(api.host, api.port, digits_body(digits_dir)) as traffic:
        # the same model twice; the latency rule has its own test (a loaded box skews 200-sample p50s)
        doc = cloud.release(v2, **SHADOW, promote_max_latency_ratio=20)
        report = cloud.wait_result(device.device_id, doc["release_id"])
        cloud.wait(lambda: traffic.versions.count("2") >= 5, "version 2 to answer")
    assert report.result == "success", report
    assert shadow_states(device)[3:7] == ["validating", "shadowing", "activating", "health_check"]
    assert report.shadow is not None and report.shadow["verdict"] == "promote", report
    assert report.shadow["samples"] >= 200 and report.shadow["agreement"] == 1.0, report.shadow
    assert "shadow passed: " in (report.reason or "")
    assert device.store.active("digits") == "2" and device.server.get("digits").version == "2"
    # Order of answers: version 1 until the promotion, version 2 after it, never interleaved.
    first2 = traffic.versions.index("2")
    assert set(traffic.versions[:first2]) == {"1"} and set(traffic.versions[first2:]) == {"2"}


def test_a_disagreeing_candidate_is_rejected_with_its_figures_and_never_answers(
    cloud: Cloud, served: tuple[Device, ApiServer], digits_dir: Path, tmp_path: Path
) -> None:
    device, api = served
    candidate = skewed(digits_dir, tmp_path / "skewed", "2")
    report, traffic = release_under_traffic(
        cloud, device.device_id, api, candidate, digits_body(digits_dir, 16), **SHADOW
    )
    assert report.result == "failed" and report.state == "failed", report
    assert "shadow rejected: agreement" in (report.reason or ""), report.reason
    assert report.shadow is not None and report.shadow["verdict"] == "reject"
    assert report.shadow["samples"] >= 200 and report.shadow["agreement"] < 0.98, report.shadow
    assert f"{report.shadow['samples']} samples" in (report.reason or "")
    assert "shadowing" in shadow_states(device)
    assert traffic.answered_by() == {"1"} and len(traffic.versions) > 200
    assert device.store.active("digits") == "1" and device.server.get("digits").version == "1"


def test_a_slower_candidate_than_the_rule_allows_is_rejected(
    cloud: Cloud, served: tuple[Device, ApiServer], v2: Path, digits_dir: Path
) -> None:
    """The same model against a rule it cannot meet (p50 ratio <= 0.05); the figures are reported live."""
    device, api = served
    policy = {**SHADOW, "shadow_min_samples": 10**9, "shadow_window_s": 4.0, "promote_max_latency_ratio": 0.05}
    with Traffic(api.host, api.port, digits_body(digits_dir)) as traffic:
        doc = cloud.release(v2, **policy)

        def live() -> dict[str, Any] | None:
            r = cloud.report(device.device_id, "digits")
            ok = r is not None and r.state == "shadowing" and r.shadow is not None and r.shadow["samples"] > 0
            return r.shadow if ok and r is not None else None

        figures = cloud.wait(live, "live shadow figures in the device state")
        assert figures["verdict"] is None and figures["latency_ratio"] is not None, figures
        metrics = urllib.request.urlopen(f"http://{api.url}/metrics", timeout=10).read().decode()
        assert 'edgefleet_shadow_samples_total{model="digits",version="2"}' in metrics, metrics[-2000:]
        assert 'edgefleet_shadow_rate{model="digits",version="2"} 1.0' in metrics
        assert 'edgefleet_shadow_latency_ratio{model="digits",version="2"}' in metrics
        # the shadow process's CPU priority: reported live, and a Prometheus state set (idle where allowed)
        assert figures["priority"] in PRIORITIES, figures
        for p in PRIORITIES:
            on = "1.0" if p == figures["priority"] else "0.0"
            series = f'edgefleet_shadow_priority{{edgefleet_shadow_priority="{p}",model="digits",version="2"}} {on}'
            assert series in metrics, metrics[-2000:]
        report = cloud.wait_result(device.device_id, doc["release_id"])
    assert report.result == "failed", report
    assert "p50 latency ratio" in (report.reason or "") and "> 0.05" in (report.reason or ""), report.reason
    assert "agreement" not in (report.reason or "").split("(")[0]  # it agreed: only latency failed
    assert report.shadow is not None and report.shadow["latency_ratio"] > 0.05
    assert traffic.answered_by() == {"1"}


def test_a_shadow_window_without_traffic_rejects_cleanly(
    cloud: Cloud, make_device: Callable[..., Device], v2: Path
) -> None:
    device = make_device()
    doc = cloud.release(v2, **{**SHADOW, "shadow_window_s": 0.5})
    report = cloud.wait_result(device.device_id, doc["release_id"])
    assert report.result == "failed" and "no request was compared" in (report.reason or ""), report
    assert device.store.active("digits") == "1" and "2" in device.store.versions("digits")
