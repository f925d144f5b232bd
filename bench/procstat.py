"""What the benches read of another process from ``/proc``: CPU seconds, resident and proportional memory.

One reader per figure; each raises ``OSError`` when the process (or thread) is gone, and every
bench decides at its call site what a gone process counts as (0, NaN, or an error), so merging the
readers here changed no printed figure.
"""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), or of its thread ``tid``.

    Counted by the kernel per task, so the figure does not move with other load on the machine.
    """
    stat = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / TICK


def _status_kb(pid: int, file: str, key: str) -> float:
    for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
        if line.startswith(key):
            return float(line.split()[1])
    return float("nan")


def rss_mb(pid: int) -> float:
    """``pid``'s resident set (VmRSS) in MiB; NaN for a process without one (a zombie)."""
    return _status_kb(pid, "status", "VmRSS:") / 1024


def pss_mb(pid: int) -> float:
    """``pid``'s proportional set size in MiB (shared pages split among the processes mapping them)."""
    return _status_kb(pid, "smaps_rollup", "Pss:") / 1024


def children(pid: int) -> list[int]:
    """``pid``'s descendants, from the parent ids in ``/proc/*/stat``."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, todo = [], [pid]
    while todo:
        this = todo.pop()
        kids = [c for c, p in parent.items() if p == this]
        found += kids
        todo += kids
    return found


def switches(pid: int, tid: int) -> tuple[int, int]:
    """Thread ``tid``'s voluntary and involuntary context switches so far."""
    status = f"task/{tid}/status"
    return int(_status_kb(pid, status, "voluntary_ctxt_switches:")), int(
        _status_kb(pid, status, "nonvoluntary_ctxt_switches:")
    )
