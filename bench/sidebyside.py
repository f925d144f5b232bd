"""Two HTTP servers measured side by side: rounds alternating between them, medians per case, one table.

Used by ``http_ab.py`` (this tree against another commit) and ``mlserver_bench.py`` (the agent
against MLServer). Rounds go A, B, B, A, ... so drift in the machine's speed falls on both.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Hashable, Sequence

Cells = dict[str, list[float]]


def alternate(
    sides: tuple[str, str], cases: Sequence[Hashable], rounds: int, measure: Callable[[str, Hashable], dict]
) -> dict[tuple[str, Hashable], Cells]:
    """``measure(side, case)`` (a ``bench.run.http_bench`` result) for every case, side and round."""
    results: dict[tuple[str, Hashable], Cells] = {}
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            for case in cases:
                res = measure(side, case)
                cell = results.setdefault((side, case), {"p50": [], "p99": [], "rps": []})
                cell["p50"].append(res["p50_ms"])
                cell["p99"].append(res["p99_ms"])
                cell["rps"].append(res["throughput_per_s"])
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return results


def table(
    results: dict[tuple[str, Hashable], Cells], sides: tuple[str, str], cases: Sequence[Hashable], labels: Sequence[str]
) -> None:
    """Print a Markdown table: ``labels`` (the case's columns), then p50, p99 and req/s of each side (medians)."""
    a, b = sides
    head = [*labels, f"{a} p50 ms", f"{b} p50 ms", f"{a} p99 ms", f"{b} p99 ms", f"{a} req/s", f"{b} req/s"]
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join(["---"] * len(labels) + ["---:"] * 6) + " |")
    for case in cases:
        x, y = results[(a, case)], results[(b, case)]
        cells = [statistics.median(v[k]) for k in ("p50", "p99") for v in (x, y)]
        rps = [statistics.median(v["rps"]) for v in (x, y)]
        shown = case if isinstance(case, tuple) else (case,)
        print("| " + " | ".join(str(c) for c in shown) + " | " + " | ".join(f"{c:.3f}" for c in cells)
              + f" | {rps[0]:,.0f} | {rps[1]:,.0f} |")  # fmt: skip
