"""The primary's latency and the agent's CPU with a shadow candidate on every request (``shadow_rate = 1``).

digits 1 serves through the real V2 API (uvicorn + httptools, in this process); a client sends
requests one at a time over one keep-alive connection. In interleaved rounds (so drift hits
every mode alike) the shadow is off, or digits 2 (the same model) runs in shadow on a copy of
every request: the ``ShadowRunner`` a shadow release starts (one-row copies in a ring of shared
memory, a shipping thread that hands each 0.5 s's copies to the shadow process, the candidate and
the reference copy of the active version run there). Rounds should last several hand-overs
(``--requests 4000`` at ~0.35 ms a request: ~1.4 s). ``--baseline REV`` adds rounds of the
runner as it was at git revision REV (a revision with ``edge_agent/models/shadow.py``; the worker-thread
design measured in docs/benchmarks.md, 182381c, is not in this repository's history), loaded
from ``git show``, for a before/after in the same run. ``--control`` adds rounds with no shadow at all
but a stand-in for its CPU: a separate process at the shadow process's priority (nice 10) that
spins ``--control-us`` µs every ms (the shadow's measured share of a core: ~50-130 µs of CPU per
copy at ~1 copy per ms). It answers whether *any* concurrent work of that size on the second core
moves the primary's p99 on this machine, whatever the shadow does. ``--client-process`` runs the
client in a process of its own (as an app on the device, or a caller elsewhere, would be) instead of
a thread of this one, where it shares the agent's GIL; this process's CPU is then the agent's alone.

Reported per mode: the client-observed p50/p90/p99, the p99 change against the adjacent
shadow-off rounds (goal: <= +5%), this process's CPU time per request and the extra CPU per
shadowed copy (all threads: ``time.process_time``, paired with the adjacent off round; the
load-robust figure), the shadow process's CPU per copy (``/proc/<pid>/stat``), and the
shadow's own figures (compared, dropped).

Run (prints a markdown table, the goal and the command that reproduces it)::

    .venv/bin/python bench/shadow_bench.py --quick                      # <= 2 minutes
    .venv/bin/python bench/shadow_bench.py --requests 4000 --rounds 10
    .venv/bin/python bench/shadow_bench.py --quick --baseline REV       # before/after, interleaved
    .venv/bin/python bench/shadow_bench.py --requests 4000 --rounds 16 --client-process --control
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.procstat import cpu_s  # noqa: E402
from bench.shadow_stats import GOAL, bootstrap, when_slow, working  # noqa: E402
from edge_agent.http.app import create_app  # noqa: E402
from edge_agent.inference.runtime import RuntimeOptions  # noqa: E402
from edge_agent.models.serving import ModelServer  # noqa: E402
from edge_agent.models.shadow import ShadowModel, ShadowRunner  # noqa: E402
from edge_agent.models.shadow.priority import NICE  # noqa: E402
from edge_agent.models.store import ModelStore  # noqa: E402
from edge_agent.wire.shadow import ShadowFigures  # noqa: E402
from tests.apiserver import ApiServer  # noqa: E402
from tests.support.ota import relabel  # noqa: E402
from tests.support.shadow import digits_body  # noqa: E402

DIGITS = REPO / "models" / "digits" / "1"
# The --control stand-in: spin argv[1] µs of every millisecond at the shadow process's nice (argv[2]).
CONTROL_LOAD = """
import os, sys, time
os.nice(int(sys.argv[2]))
busy = float(sys.argv[1]) / 1e6
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < busy:
        pass
    time.sleep(max(0.0, 0.001 - busy))
"""
# --client-process: the client in its own process (its own GIL, like an app on the device or a remote
# caller): argv = host port; each stdin line "n" runs n requests of the body (the first line) and
# answers one line, [start (time.monotonic, shared by all processes), latency] in seconds per request as JSON.
CLIENT = """
import http.client, json, sys, time
conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)
body = bytes.fromhex(sys.stdin.readline().strip())
headers = {"Content-Type": "application/json"}
for line in sys.stdin:
    out = []
    for _ in range(int(line)):
        m0, t0 = time.monotonic(), time.perf_counter()
        conn.request("POST", "/v2/models/digits/infer", body, headers)
        resp = conn.getresponse()
        resp.read()
        out.append([m0, time.perf_counter() - t0])
        assert resp.status == 200, resp.status
    print(json.dumps(out), flush=True)
"""


class ClientProcess:
    """``run_round`` in a separate client process (``--client-process``)."""

    def __init__(self, host: str, port: int, body: bytes) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, host, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(body.hex() + "\n")

    def run(self, n: int) -> list[tuple[float, float]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return [(float(m), float(x)) for m, x in json.loads(self.proc.stdout.readline())]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def digits_server(work: Path) -> tuple[ModelStore, ModelServer]:
    """A store under ``work`` with digits 1 (served) and a copy as digits 2 (the shadow), and its server."""
    store = ModelStore(work / "data")
    store.install_dir(DIGITS)
    store.install_dir(relabel(DIGITS, work / "v2", "2"))
    server = ModelServer(store, RuntimeOptions(num_threads=1))
    server.sync()
    return store, server


def run_round(conn: http.client.HTTPConnection | ClientProcess, body: bytes, n: int) -> list[tuple[float, float]]:
    """``n`` requests, one at a time: (start on ``time.monotonic``, latency in seconds) of each."""
    if isinstance(conn, ClientProcess):
        return conn.run(n)
    out = []
    headers = {"Content-Type": "application/json"}
    for _ in range(n):
        m0, t0 = time.monotonic(), time.perf_counter()
        conn.request("POST", "/v2/models/digits/infer", body, headers)
        resp = conn.getresponse()
        resp.read()
        out.append((m0, time.perf_counter() - t0))
        assert resp.status == 200
    return out


def proc_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` (0 when unknown or gone)."""
    if pid is None:
        return 0.0
    try:
        return cpu_s(pid)
    except OSError:
        return 0.0


def baseline_module(rev: str) -> ModuleType:
    """The shadow runner module as it was at git revision ``rev`` (a file then: ``edge_agent/models/shadow.py``;
    a later revision, where it is a package, is measured from a ``git worktree`` of it instead)."""
    done = subprocess.run(
        ["git", "show", f"{rev}:edge_agent/models/shadow.py"], cwd=REPO, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"--baseline {rev}: the shadow is a package there; run this bench in a git worktree of {rev}")
    src = done.stdout
    path = Path(tempfile.mkdtemp(prefix="shadow-baseline-")) / "shadow_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("shadow_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Shadow:
    """One mode's runner, started before a round and stopped after it."""

    def __init__(self, mode: str, store: ModelStore, baseline: ModuleType | None, control_us: float = 0) -> None:
        self.mode, self.store, self.baseline, self.control_us = mode, store, baseline, control_us
        self.runner: Any = None
        self.load: subprocess.Popen[bytes] | None = None
        self.handovers: list[float] = []  # when the runner named filled slots to the shadow process ...
        self.answers: list[float] = []  # ... and when the process's answers (freed slots, figures) came

    def stop_load(self) -> None:
        if self.load is not None:
            self.load.kill()
            self.load.wait()

    def start(self) -> None:
        if self.mode == "process":
            v1, v2 = (ShadowModel("digits", v, self.store.version_dir("digits", v)) for v in ("1", "2"))
            self.runner = ShadowRunner(v2, "1", 1.0, reference=v1)
            self._timestamp(self.runner)
            self.runner.ready.wait(60)  # copies are sampled from the moment both versions are loaded
        elif self.mode == "control":
            self.load = subprocess.Popen([sys.executable, "-c", CONTROL_LOAD, str(self.control_us), str(NICE)])
        elif self.mode == "thread" and self.baseline is not None:
            private = RuntimeOptions(num_threads=1, pool_size=1)
            cand, ref = self.store.load("digits", "2", private), self.store.load("digits", "1", private)
            cand.warmup(3)
            ref.warmup(3)
            self.runner = self.baseline.ShadowRunner(cand, "1", 1.0, reference=ref)

    def _timestamp(self, runner: ShadowRunner) -> None:
        """Note the time of each hand-over and answer: the spans in which the shadow process works."""
        publish, answer = runner._publish, runner._answer

        def timed_publish(proc: Any, ring: Any) -> None:
            if len(ring) > ring._published:  # it names copies: the shadow process has work until it answers
                self.handovers.append(time.monotonic())
            publish(proc, ring)

        def timed_answer(*args: Any) -> bool:
            self.answers.append(time.monotonic())
            return answer(*args)

        runner._publish, runner._answer = timed_publish, timed_answer  # type: ignore[method-assign, assignment]

    def working(self, starts: np.ndarray) -> np.ndarray:
        """Which of the requests started at ``starts`` began while the shadow process ran a hand-over's copies."""
        return working(np.asarray(self.handovers), np.asarray(self.answers), starts)

    def pid(self) -> int | None:
        return getattr(self.runner, "child_pid", None)

    def thread_cpu_s(self) -> float:
        """CPU seconds of the runner's own thread in this process (shipping, or the old worker)."""
        ident = self.runner._thread.ident if self.runner is not None else None
        return time.clock_gettime(time.pthread_getcpuclockid(ident)) if ident is not None else 0.0


def first_copies(runner: ShadowRunner, timeout_s: float = 30.0) -> ShadowFigures:
    """Wait until the shadow process has compared its first copies (one hand-over); its figures then."""
    deadline = time.monotonic() + timeout_s
    while runner.figures().samples == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    return runner.figures()


def measure(
    shadow: Shadow, server: ModelServer, conn: http.client.HTTPConnection | ClientProcess, body: bytes, n: int
) -> dict[str, Any]:
    """One round of ``n`` requests in ``shadow``'s mode: latencies, this process's CPU per request, the shadow's costs."""
    shadow.start()
    before = (0, 0)
    if shadow.runner is not None:
        server.taps.start_shadow("digits", shadow.runner)
    run_round(conn, body, 200)  # not measured (every mode alike): the shadow process starts and loads
    if shadow.runner is not None:
        f = first_copies(shadow.runner)
        before = (f.samples, f.dropped)
    child0, thread0, cpu0 = proc_cpu_s(shadow.pid()), shadow.thread_cpu_s(), time.process_time()
    timed = run_round(conn, body, n)
    cpu = (time.process_time() - cpu0) / n
    lat = [t for _, t in timed]
    out: dict[str, Any] = {"lat": lat, "cpu": cpu, "p99": float(np.percentile(lat, 99))}
    if shadow.mode == "process":
        out["working"] = shadow.working(np.asarray([m for m, _ in timed]))
    if shadow.runner is not None:
        time.sleep(0.3)  # the last queued copies are compared
        f = shadow.runner.figures()
        out |= {"copies": f.samples - before[0], "dropped": f.dropped - before[1]}
        out |= {"thread": shadow.thread_cpu_s() - thread0, "child": proc_cpu_s(shadow.pid()) - child0}
        server.taps.stop_shadow("digits", shadow.runner)
    shadow.stop_load()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=4000, help="requests per round")
    ap.add_argument("--rounds", type=int, default=10, help="rounds of each mode (interleaved)")
    ap.add_argument("--rows", type=int, default=1, help="digits per request")
    ap.add_argument("--quick", action="store_true", help="4000 requests x 6 rounds (<= 2 minutes)")
    ap.add_argument("--baseline", metavar="REV", help="also run the shadow runner of this git revision")
    ap.add_argument("--control", action="store_true", help="also run rounds with a stand-in load and no shadow")
    ap.add_argument("--control-us", type=float, default=130.0, help="the stand-in's CPU µs per ms (default 130)")
    ap.add_argument(
        "--client-process", action="store_true", help="the client in its own process (default: a thread of this one)"
    )
    args = ap.parse_args()
    if args.quick:
        # Each round spans a few of the runner's hand-overs (every 0.5 s): a round shorter than one may
        # hold none, and its p99 then says nothing about what they cost.
        args.requests, args.rounds = 4000, 6
    baseline = baseline_module(args.baseline) if args.baseline else None
    modes = ["off", "process", *(["thread"] if baseline else []), *(["control"] if args.control else [])]
    work = Path(tempfile.mkdtemp(prefix="shadow-bench-"))
    try:
        store, server = digits_server(work)
        body = digits_body(DIGITS, rows=args.rows)
        stats: dict[str, dict[str, Any]] = {m: {"compared": 0, "dropped": 0} for m in modes}
        for m in modes:
            stats[m] |= {k: [] for k in ("rounds", "working", "cpu", "extra", "thread", "child", "p99x")}
        with ApiServer(create_app(server)) as api:
            conn: http.client.HTTPConnection | ClientProcess = (
                ClientProcess(api.host, api.port, body)
                if args.client_process
                else http.client.HTTPConnection(api.host, api.port, timeout=10)
            )
            run_round(conn, body, 500)  # warm-up
            for r in range(args.rounds):
                order = modes[r % len(modes) :] + modes[: r % len(modes)]  # no mode always runs first
                got = {
                    mode: measure(Shadow(mode, store, baseline, args.control_us), server, conn, body, args.requests)
                    for mode in order
                }
                off = got["off"]
                for mode, res in got.items():
                    s = stats[mode]
                    s["rounds"].append(np.asarray(res["lat"]))  # the mode's pooled latencies: all rounds together
                    if "working" in res:
                        s["working"].append(res["working"])
                    s["cpu"].append(res["cpu"])
                    if mode == "control":
                        s["p99x"].append(res["p99"] / off["p99"])
                    elif mode != "off":
                        copies = max(1, res["copies"])
                        s["thread"].append(res["thread"] / copies)
                        s["child"].append(res["child"] / copies)
                        s["compared"] += res["copies"]
                        s["dropped"] += res["dropped"]
                        s["p99x"].append(res["p99"] / off["p99"])
                        s["extra"].append((res["cpu"] - off["cpu"]) * args.requests / copies)
            conn.close()
        report(args, modes, stats)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(args: argparse.Namespace, modes: list[str], stats: dict[str, dict[str, Any]]) -> None:
    cmd = f".venv/bin/python bench/shadow_bench.py --requests {args.requests} --rounds {args.rounds}"
    cmd += f" --rows {args.rows}" if args.rows != 1 else ""
    cmd += f" --baseline {args.baseline}" if args.baseline else ""
    cmd += f" --control --control-us {args.control_us:g}" if args.control else ""
    cmd += " --client-process" if args.client_process else ""
    load = os.getloadavg()[0]
    print(
        f"# {cmd}\n# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load:.1f}, python {sys.version.split()[0]}"
    )
    labels = {
        "off": "shadow off",
        "process": "shadow_rate = 1, shadow process",
        "thread": f"shadow_rate = 1, thread ({args.baseline})",
        "control": f"no shadow; a stand-in load of {args.control_us:g} µs/ms at nice {NICE}",
    }
    print(
        "| primary (digits 1, c=1) | requests | p50 ms | p90 ms | p99 ms | agent CPU µs/request "
        "| shadow thread in the agent, CPU µs/copy | extra agent CPU µs/copy (all threads) "
        "| shadow process CPU µs/copy |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    out: dict[str, Any] = {}
    for mode in modes:
        s = stats[mode]
        a = np.concatenate(s["rounds"]) * 1e3
        row: dict[str, Any] = {"n": len(a)} | {f"p{q}_ms": float(np.percentile(a, q)) for q in (50, 90, 99)}
        row["cpu_us_per_request"] = float(np.median(s["cpu"])) * 1e6
        for key, name in (("thread", "thread"), ("extra", "extra"), ("child", "child")):
            row[f"{name}_cpu_us_per_copy"] = float(np.median(s[key])) * 1e6 if s[key] else None
        out[mode] = row
        cells = [_us(row[f"{k}_cpu_us_per_copy"]) for k in ("thread", "extra")]
        cells.append(_us(row["child_cpu_us_per_copy"]) if mode == "process" else "")
        print(
            f"| {labels[mode]} | {row['n']} | {row['p50_ms']:.3f} | {row['p90_ms']:.3f} | {row['p99_ms']:.3f} "
            f"| {row['cpu_us_per_request']:.1f} | {' | '.join(cells)} |"
        )
    print()
    for mode in modes[1:]:
        s, row = stats[mode], out[mode]
        pooled = row["p99_ms"] / out["off"]["p99_ms"] - 1
        paired = float(np.median(s["p99x"])) - 1 if s["p99x"] else float("nan")
        row |= {"p99_change": pooled, "p99_change_paired": paired, "compared": s["compared"], "dropped": s["dropped"]}
        if mode == "control":  # no shadow ran: the floor any concurrent work of this size sets, not a verdict
            print(f"{labels[mode]}: p99 {pooled:+.1%} pooled, {paired:+.1%} median of {len(s['p99x'])} paired rounds")
            continue
        low, high = bootstrap(stats["off"]["rounds"], s["rounds"])
        row |= {"p99_change_ci90": [low, high]}
        if s["working"]:
            lat, working = np.concatenate(s["rounds"]), np.concatenate(s["working"])
            print(when_slow(labels[mode], out["off"]["p99_ms"] / 1e3, lat, working))
        verdict = "MET" if max(pooled, paired) <= GOAL else "MISSED"
        proven = "the bound is within it" if high <= GOAL else "the bound is not"
        print(
            f"{labels[mode]}: p99 {pooled:+.1%} pooled (90% interval {low:+.1%} .. {high:+.1%}, rounds resampled; "
            f"{proven}), {paired:+.1%} median of {len(s['p99x'])} paired rounds "
            f"(goal <= +{GOAL:.0%}: {verdict}); {s['compared']} copies compared, {s['dropped']} dropped"
        )
    print(json.dumps(out))


def _us(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    main()
