"""Queued predictions → outbox rows → one SQLite transaction: what the telemetry writer does per flush.

:class:`LocalWriter` is that work on an :class:`~edge_agent.telemetry.outbox.Outbox` of this
process. The agent runs it in a writer *process* (``telemetry.writer.remote``, ``telemetry.writer.child``), so
building rows, drift windows and SQLite never take the GIL that serves requests; the same class
runs on the agent's telemetry thread when that process cannot (the fallback), and in
``edge-agent feedback``.

Per write: each model's ``max_bps`` share of the queued predictions (``pacing.Pacing.limit``), their
packs (``rows.prediction_rows``), the drift windows they close (``drift``), then the rows plus
``extra`` (events, feedback) and every drop counted in one ``Outbox.append``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from edge_agent.telemetry.drift import DriftMonitor, DriftResult
from edge_agent.telemetry.outbox import Outbox, Row
from edge_agent.telemetry.pacing import Pacing
from edge_agent.telemetry.rows import Item, prediction_rows
from edge_agent.wire.kserve_v2 import dumps


class LocalWriter:
    """Writes queued predictions to an outbox of this process."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        drift: DriftMonitor | None = None,
        on_drift: Callable[[DriftResult], None] | None = None,
        pacing: Pacing | None = None,
    ) -> None:
        self.outbox, self.drift, self.on_drift, self.pacing = outbox, drift, on_drift, pacing

    def write(
        self,
        items: list[Item],
        extra: list[Row] | None = None,
        labels: list[tuple[str, str]] | None = None,
        overflow: int = 0,
        token: int | None = None,
    ) -> int:
        """Commit ``items`` and ``extra`` in one transaction (``overflow``: predictions a full queue dropped); records written."""
        rows: list[Row] = []
        results: list[DriftResult] = []
        drops: dict[str, int] = {"prediction": overflow} if overflow else {}
        if items and self.pacing is not None:
            items, throttled = self.pacing.limit(items)
            for kind, n in throttled.items():
                drops[kind] = drops.get(kind, 0) + n
        if items:
            self._build_rows(items, rows, results, drops)
        rows.extend(extra or ())
        if rows or drops:
            self.outbox.append(rows, labels, token=token, drops=drops)
        for result in results:
            if self.on_drift is not None:
                self.on_drift(result)
        return sum(r.n for r in rows)

    def _build_rows(
        self, items: list[Item], rows: list[Row], results: list[DriftResult], drops: dict[str, int]
    ) -> None:
        """Append the packs of ``items`` (queued predictions), then the rows of any drift window they close."""
        built, left_out = prediction_rows(items)
        if left_out:
            drops["inputs"] = drops.get("inputs", 0) + left_out
        rows.extend(built)
        if self.drift is None:
            return
        for item in items:
            manifest, inputs, outputs = item[0], item[4], item[5]
            if manifest.reference is not None:
                result = self.drift.observe(manifest.name, manifest.version, manifest.reference, inputs, outputs)
                if result is not None:
                    results.append(result)
                    rows.append(Row("drift", time.time(), dumps(result.body()).decode(), model=manifest.name))
