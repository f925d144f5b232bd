"""``/metrics`` series of running shadow releases, read from ``models.taps`` at scrape time.

Metrics (one series per model and candidate version while it is shadowed)::

    edgefleet_shadow_samples_total{model,version}    requests compared with the active version
    edgefleet_shadow_agreement{model,version}        share of compared rows that agree
    edgefleet_shadow_latency_ratio{model,version}    candidate p50 / active p50 (same thread, same inputs)
    edgefleet_shadow_errors_total{model,version}     candidate invocations that raised
    edgefleet_shadow_dropped_total{model,version}    sampled copies dropped: the shadow queue was full
    edgefleet_shadow_rate{model,version}             share of live requests copied
    edgefleet_shadow_priority{model,version,edgefleet_shadow_priority}
                                                     1 for the shadow process's CPU priority ("idle":
                                                     SCHED_IDLE, "nice": nice 10, given back when it
                                                     starved), 0 for the other (a Prometheus state set)

Nothing is touched on the request path: the collector reads the runners' figures when scraped.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, StateSetMetricFamily
from prometheus_client.registry import Collector

from edge_agent.models.taps import ModelTaps
from edge_agent.wire.shadow import PRIORITIES

_attached: weakref.WeakKeyDictionary[CollectorRegistry, set[int]] = weakref.WeakKeyDictionary()


class ShadowCollector(Collector):
    """Reports the figures of every running shadow runner."""

    def __init__(self, taps: ModelTaps) -> None:
        self.taps = taps

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        samples = CounterMetricFamily("edgefleet_shadow_samples", "Requests compared in shadow.", labels=labels)
        agreement = GaugeMetricFamily(
            "edgefleet_shadow_agreement", "Shadow agreement with the active version.", labels=labels
        )
        ratio = GaugeMetricFamily("edgefleet_shadow_latency_ratio", "Shadow candidate p50 / active p50.", labels=labels)
        errors = CounterMetricFamily(
            "edgefleet_shadow_errors", "Shadow candidate invocations that raised.", labels=labels
        )
        dropped = CounterMetricFamily("edgefleet_shadow_dropped", "Shadow copies dropped (queue full).", labels=labels)
        rate = GaugeMetricFamily(
            "edgefleet_shadow_rate", "Share of live requests copied to the candidate.", labels=labels
        )
        priority = StateSetMetricFamily(
            "edgefleet_shadow_priority", "The shadow process's CPU priority.", labels=labels
        )
        for name, runner in sorted(self.taps.shadows().items()):
            f, key = runner.figures(), [name, runner.candidate.version]
            samples.add_metric(key, f.samples)
            errors.add_metric(key, f.errors)
            dropped.add_metric(key, f.dropped)
            rate.add_metric(key, runner.rate)
            if f.agreement is not None:
                agreement.add_metric(key, f.agreement)
            if f.latency_ratio is not None:
                ratio.add_metric(key, f.latency_ratio)
            if f.priority is not None:
                priority.add_metric(key, {p: p == f.priority for p in PRIORITIES})
        yield from (samples, agreement, ratio, errors, dropped, rate, priority)


def watch_shadows(registry: CollectorRegistry, taps: ModelTaps) -> None:
    """Expose ``taps``' shadow runners in ``registry`` (once per registry and taps)."""
    seen = _attached.setdefault(registry, set())
    if id(taps) in seen:
        return
    seen.add(id(taps))
    registry.register(ShadowCollector(taps))
