"""The primary's p99 with the shadow on and off in short alternating blocks of one run.

``shadow_bench`` starts a shadow process per round, so a round lasts seconds, and a stretch of host
noise (a preempted vCPU, another tenant's burst) lands in one mode's rounds more than the other's:
on this VM the pooled p99 of two identical runs differs by 15-25%. Here one ``ShadowRunner`` lives
through the whole run and its ``rate`` is switched between 1 (every request copied) and 0 (none)
every ``--block`` requests (about a second), so the modes alternate hundreds of times. ``rate = 0``
is the shadow attached and idle: the request path's check and one random draw per request, the
shipping thread's wake-ups, a shadow process waiting. The shadow process runs an "on" block's last
copies during the next "off" block: the off block's requests that start before it has answered are
left out (they belong to neither mode), and counted.

Same server, model and client as ``shadow_bench --client-process`` (digits 1 primary, digits 2 in
shadow, one request at a time from a client process over keep-alive)::

    .venv/bin/python bench/shadow_toggle.py --quick          # 40 pairs of 2,000-request blocks: ~1.5 min
    .venv/bin/python bench/shadow_toggle.py --pairs 120      # ~4 min
    .venv/bin/python bench/shadow_toggle.py --pairs 80 --nice   # the shadow process at nice 10 throughout (A/B)
    .venv/bin/python bench/shadow_toggle.py --pairs 120 --control  # and an A/A: a second off block per pair

``--control`` adds a third block to every pair, also at ``rate = 0``, run before or after the off block
in turn and filtered the same way. "Control against off" is then an A/A comparison measured under the
same conditions as "on against off": how far the same statistics move when nothing differs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.shadow_bench import DIGITS, ClientProcess, Shadow, digits_server, first_copies, run_round  # noqa: E402
from bench.shadow_stats import GOAL, bootstrap, when_slow  # noqa: E402
from edge_agent.http.app import create_app  # noqa: E402
from edge_agent.models.shadow import runner as shadow_runner  # noqa: E402
from tests.apiserver import ApiServer  # noqa: E402
from tests.support.shadow import digits_body  # noqa: E402


@dataclass
class Blocks:
    """Latencies (s) per block of each mode, which "on" requests started while the shadow process worked, and the rest."""

    on: list[np.ndarray]
    off: list[np.ndarray]
    control: list[np.ndarray]  # empty without --control
    working: np.ndarray
    left_out: int
    compared: int
    priority: str | None  # the shadow process's at the end: "idle", or "nice" (given back when it starved)


def modes(pairs: int, control: bool) -> list[str]:
    """The blocks' order: on, off, and with ``control`` a second off block, before or after the first in turn."""
    if not control:
        return ["on", "off"] * pairs
    return [m for p in range(pairs) for m in (("on", "off", "control") if p % 2 == 0 else ("on", "control", "off"))]


def run(pairs: int, block: int, control: bool = False) -> Blocks:
    """``pairs`` on/off pairs of ``block`` requests: the latencies per block, and what was left out."""
    work = Path(tempfile.mkdtemp(prefix="shadow-toggle-"))
    try:
        store, server = digits_server(work)
        body = digits_body(DIGITS, rows=1)
        on: list[np.ndarray] = []
        off: list[np.ndarray] = []
        ctl: list[np.ndarray] = []
        on_working: list[np.ndarray] = []
        left_out = 0
        with ApiServer(create_app(server)) as api:
            client = ClientProcess(api.host, api.port, body)
            shadow = Shadow("process", store, None)
            shadow.start()
            runner = shadow.runner
            server.taps.start_shadow("digits", runner)
            run_round(client, body, 500)  # warm-up, and the first copies reach the shadow process
            first_copies(runner)
            for mode in modes(pairs, control):
                sampling = mode == "on"
                runner.rate = 1.0 if sampling else 0.0
                timed = np.asarray(run_round(client, body, block))
                starts, lat = timed[:, 0], timed[:, 1]
                if sampling:
                    on.append(lat)
                    on_working.append(starts)
                else:
                    time.sleep(0.02)  # the shadow's answer to a hand-over at the block's end is noted
                    keep = ~shadow.working(starts)
                    left_out += int((~keep).sum())
                    (off if mode == "off" else ctl).append(lat[keep])
            working = shadow.working(np.concatenate(on_working))
            figures, priority = runner.figures(), runner.priority
            server.taps.stop_shadow("digits", runner)
            client.close()
        return Blocks(on, off, ctl, working, left_out, figures.samples, priority)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class Rise:
    """The p99 rise of one mode's blocks over the paired off blocks."""

    pooled: float
    paired: float  # the median of the paired blocks' rises
    low: float  # the pooled rise's 90% interval
    high: float

    @property
    def verdict(self) -> str:
        """MET when the interval's top is within the goal, MISSED when the pooled rise is not."""
        return (
            "MET"
            if self.high <= GOAL
            else "MISSED"
            if self.pooled > GOAL
            else "not settled (the interval passes the goal)"
        )

    def summary(self) -> dict[str, object]:
        """The figures as the JSON line prints them."""
        return {
            "p99_change": self.pooled,
            "p99_change_paired": self.paired,
            "ci90": [self.low, self.high],
            "verdict": self.verdict,
        }

    def line(self, label: str, pairs: int) -> str:
        """The figures in a sentence."""
        return (
            f"{label}: p99 {self.pooled:+.1%} pooled (90% interval {self.low:+.1%} .. {self.high:+.1%}, block pairs "
            f"resampled), {self.paired:+.1%} median of {pairs} paired blocks; goal <= +{GOAL:.0%}: {self.verdict}"
        )


def compare(blocks: list[np.ndarray], off: list[np.ndarray]) -> Rise:
    """The p99 rise of ``blocks`` over the paired ``off`` blocks."""
    pooled = float(np.percentile(np.concatenate(blocks), 99) / np.percentile(np.concatenate(off), 99) - 1)
    paired = float(np.median([np.percentile(a, 99) / np.percentile(b, 99) for a, b in zip(blocks, off, strict=True)]))
    return Rise(pooled, paired - 1, *bootstrap(off, blocks))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=60, help="on/off pairs of blocks")
    ap.add_argument("--block", type=int, default=2000, help="requests per block (~1 s)")
    ap.add_argument("--quick", action="store_true", help="40 pairs of 2,000 requests (~1.5 min)")
    ap.add_argument("--nice", action="store_true", help="the shadow process at nice 10 throughout, not SCHED_IDLE")
    ap.add_argument("--control", action="store_true", help="a second off block per pair: an A/A comparison beside")
    args = ap.parse_args()
    shadow_runner.IDLE = not args.nice
    if args.quick:
        args.pairs, args.block = 40, 2000
    got = run(args.pairs, args.block, args.control)
    on, off = np.concatenate(got.on), np.concatenate(got.off)
    flags = f"{' --nice' * args.nice}{' --control' * args.control}"
    print(f"# .venv/bin/python bench/shadow_toggle.py --pairs {args.pairs} --block {args.block}{flags}")
    print(
        f"# {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, python {platform.python_version()}"
    )
    print("| primary (digits 1, c=1), one shadow runner | requests | p50 ms | p90 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rows = [("shadow_rate = 0 (attached, idle)", off), ("shadow_rate = 1", on)]
    if got.control:
        rows.append(("shadow_rate = 0, control blocks", np.concatenate(got.control)))
    for label, lat in rows:
        p50, p90, p99 = np.percentile(lat, [50, 90, 99]) * 1e3
        print(f"| {label} | {len(lat)} | {p50:.3f} | {p90:.3f} | {p99:.3f} |")
    rise = compare(got.on, got.off)
    summary = rise.summary()
    print()
    print(when_slow("shadow_rate = 1", float(np.percentile(off, 99)), on, got.working))
    print(
        f"{rise.line('on against off', args.pairs)}. {got.compared} copies compared; {got.left_out} "
        "requests of off blocks left out (the shadow process still ran the last on block's copies); the shadow "
        f"process ended at priority {got.priority}"
    )
    if got.control:
        control = compare(got.control, got.off)
        summary["control"] = control.summary()
        print(control.line("control against off (A/A: nothing differs)", args.pairs))
    print(json.dumps({**summary, "priority": got.priority}))


if __name__ == "__main__":
    main()
