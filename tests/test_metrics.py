"""Prometheus metrics: request counters, latency histogram, errors, and the active version across a swap."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from edge_agent.http.app import create_app
from edge_agent.http.metrics import LATENCY_BUCKETS, UNKNOWN_MODEL, Metrics
from edge_agent.models.serving import ModelServer
from edge_agent.models.store import ModelStore
from tests.apiserver import ApiServer, build_v2, digits_data, infer_body

INFER = "/v2/models/digits/infer"


def scrape(api: ApiServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics, parsed: {(sample name, labels): value}."""
    status, headers, body = api.request("GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_request_error_and_latency_metrics(model_server: ModelServer) -> None:
    x, _ = digits_data()
    with ApiServer(create_app(model_server)) as api:
        for i in range(3):
            status, _, _ = api.request("POST", INFER, infer_body(x[i : i + 1]))
            assert status == 200
        assert api.request("POST", INFER, b"{not json")[0] == 400
        assert api.request("POST", "/v2/models/nope/infer", infer_body(x[:1]))[0] == 404
        assert api.request("POST", "/v2/models/digits/versions/5/infer", infer_body(x[:1]))[0] == 404
        samples = scrape(api)

    assert value(samples, "edgefleet_requests_total", model="digits", version="1", code="200") == 3
    assert value(samples, "edgefleet_requests_total", model="digits", version="1", code="400") == 1
    assert value(samples, "edgefleet_requests_total", model=UNKNOWN_MODEL, version="", code="404") == 1
    assert value(samples, "edgefleet_requests_total", model="digits", version="", code="404") == 1
    assert value(samples, "edgefleet_errors_total", model="digits", reason="bad_request") == 1
    assert value(samples, "edgefleet_errors_total", model="digits", reason="not_found") == 1
    assert value(samples, "edgefleet_errors_total", model=UNKNOWN_MODEL, reason="not_found") == 1
    # Latency: one observation per request that reached the model, in the declared buckets.
    assert value(samples, "edgefleet_request_latency_seconds_count", model="digits", version="1") == 4
    assert value(samples, "edgefleet_request_latency_seconds_sum", model="digits", version="1") > 0
    buckets = {
        dict(labels)["le"]: v
        for (name, labels), v in samples.items()
        if name == "edgefleet_request_latency_seconds_bucket" and dict(labels).get("version") == "1"
    }
    assert len(buckets) == len(LATENCY_BUCKETS) + 1 and buckets["+Inf"] == 4
    counts = [buckets[k] for k in sorted(buckets, key=float)]
    assert counts == sorted(counts)  # cumulative
    assert value(samples, "edgefleet_active_version", model="digits", version="1") == 1
    assert value(samples, "edgefleet_inflight_requests") == 0


def test_active_version_gauge_follows_swaps(
    store: ModelStore, model_server: ModelServer, digits_dir: Path, tmp_path: Path
) -> None:
    store.install_dir(build_v2(digits_dir, tmp_path / "v2"))
    x, _ = digits_data()
    metrics = Metrics()
    metrics.watch(model_server)  # as the agent does; create_app watching again is harmless
    with ApiServer(create_app(model_server, metrics=metrics)) as api:
        samples = scrape(api)
        assert value(samples, "edgefleet_active_version", model="digits", version="1") == 1
        assert value(samples, "edgefleet_active_version", model="digits", version="2") is None

        store.activate("digits", "2")
        model_server.sync()
        assert api.request("POST", INFER, infer_body(x[:2]))[0] == 200
        samples = scrape(api)
        assert value(samples, "edgefleet_active_version", model="digits", version="2") == 1
        assert value(samples, "edgefleet_active_version", model="digits", version="1") is None
        assert value(samples, "edgefleet_requests_total", model="digits", version="2", code="200") == 1

        assert store.rollback("digits") == "1"
        model_server.sync()
        samples = scrape(api)
        assert value(samples, "edgefleet_active_version", model="digits", version="1") == 1
        assert value(samples, "edgefleet_active_version", model="digits", version="2") is None


def test_metrics_instances_are_independent(model_server: ModelServer) -> None:
    a, b = Metrics(), Metrics()
    a.observe("digits", "1", 200, 0.0002)
    assert (
        a.registry.get_sample_value("edgefleet_requests_total", {"model": "digits", "version": "1", "code": "200"}) == 1
    )
    assert (
        b.registry.get_sample_value("edgefleet_requests_total", {"model": "digits", "version": "1", "code": "200"})
        is None
    )
    body, content_type = a.render("application/openmetrics-text")
    assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
