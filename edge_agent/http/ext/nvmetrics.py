"""Triton's Prometheus series (``nv_inference_*``), read at scrape time from the statistics counters.

Beside the ``edgefleet_*`` series, so a Triton dashboard works on the agent. Labels ``model`` and
``version``; the values come from :class:`~edge_agent.inference.stats.InferenceStats`, the same
counters the statistics extension serves, so ``/metrics`` and ``/v2/models/stats`` always agree.

The series are cumulative like Triton's counters; they are exposed untyped because
prometheus_client's text encoder renames a counter ``X`` to ``X_total``, and Triton's names have no
suffix. Not exposed (not applicable on the agent): the GPU series (``nv_gpu_*``,
``nv_energy_consumption``), the response cache series (``nv_cache_*``), the summaries
(``nv_inference_*_summary_us``, off by default in Triton too), ``nv_inference_pending_request_count``
and the CPU series (``process_*`` cover the agent's own CPU and memory). docs/api.md has the table.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from edge_agent.inference.stats import InferenceStats, VersionStats

LABELS = ("model", "version")

# name, help, value of one version's counters
SERIES: tuple[tuple[str, str, str], ...] = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes", "success.count"),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes", "fail.count"),
    ("nv_inference_count", "Number of inferences performed (a batch of n counts n)", "inference_count"),
    ("nv_inference_exec_count", "Number of model executions performed (one per dynamic batch)", "execution_count"),
    ("nv_inference_request_duration_us", "Cumulative successful inference request duration in microseconds", "success.us"),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds", "queue.us"),
    ("nv_inference_compute_input_duration_us", "Cumulative compute input duration in microseconds", "compute_input.us"),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds", "compute_infer.us"),
    ("nv_inference_compute_output_duration_us", "Cumulative inference compute output duration in microseconds", "compute_output.us"),
)  # fmt: skip


def _value(s: VersionStats, what: str) -> float:
    if what == "inference_count":
        return float(s.inference_count)
    if what == "execution_count":
        return float(s.execution_count)
    phase, unit = what.split(".")
    d = s.phases[phase]
    return float(d.count) if unit == "count" else d.ns // 1000


class TritonCollector(Collector):
    """A prometheus_client collector of the ``nv_inference_*`` series."""

    def __init__(self, stats: InferenceStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        snapshot = self.stats.snapshot()
        for name, doc, what in SERIES:
            metric = Metric(name, doc, "unknown")
            for s in snapshot:
                metric.add_sample(name, {"model": s.name, "version": s.version}, _value(s, what))
            yield metric

    def describe(self) -> Iterator[Metric]:
        for name, doc, _ in SERIES:
            yield Metric(name, doc, "unknown")
