"""What the read-timeout guard (``edge_agent/http/guard.py``) costs per request (issue #15), side by side.

    .venv/bin/python bench/guard_bench.py            # 8 alternating rounds: ~2 minutes on 2 busy cores
    .venv/bin/python bench/guard_bench.py --quick    # 4 rounds, fewer requests: ~1 minute

Three ``edge-agent run`` processes, identical but for uvicorn's ``http`` protocol: ``guard`` is the
agent as shipped (``GuardedProtocol``: read timeout, eviction), ``plain`` and ``plain2`` run uvicorn's
own httptools protocol (the server process swaps ``edge_agent.app.guarded_protocol`` before running
the CLI, nothing else; ``plain2`` vs ``plain`` is the A/A noise); ``--modes ...,guard@REF`` adds the
guard of a git commit. Shipped models (digits), telemetry off (its thread would add noise to all).
Each round runs, for each agent in turn (the order alternates): ``--keepalive`` sequential requests
on one kept-alive connection (``GET /v2/health/ready`` and a one-sample digits JSON inference), and
``--fresh`` requests on a new connection each (``connection_made``: the guard's eviction check).
Reported: the median over rounds of each round's p50 latency (client side) and of the agent's CPU
per request (all its threads, ``/proc/<pid>/task/*/schedstat``, ns: the load-robust figure). Then
the guard's own work timed alone: per kept-alive request (a timer armed and cancelled, as before
issue #15's follow-up, vs the deadline write of today), and per connection.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("guard", "plain", "plain2")  # plain2: a second plain agent, the A/A noise
INFER = "/v2/models/digits/infer"
BODY = json.dumps(
    {
        "inputs": [
            {"name": "pixels", "shape": [1, 8, 8, 1], "datatype": "FP32", "data": [float(i % 17) for i in range(64)]}
        ]
    }
).encode()


def serve(mode: str, cli_args: list[str]) -> int:
    """Server process: ``edge-agent run`` with the guard as shipped, uvicorn's plain httptools protocol, or ``guard@REF``."""
    import edge_agent.app
    from edge_agent.cli.main import main

    if mode.startswith("plain"):
        edge_agent.app.guarded_protocol = lambda read_timeout_s: "httptools"  # type: ignore[assignment]
    elif "@" in mode:  # the guard of git commit REF
        from bench.gitcode import module_at

        old = module_at(mode.split("@", 1)[1], "edge_agent/http/guard.py")
        if old is None:
            raise SystemExit(f"{mode}: not in git")
        edge_agent.app.guarded_protocol = old.guarded_protocol  # type: ignore[attr-defined]
    return main(cli_args)


def start(mode: str, data_dir: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env.update(EDGEFLEET_MODELS_DIR=str(REPO / "models"), EDGEFLEET_TELEMETRY__ENABLED="false")
    cmd = [
        sys.executable,
        __file__,
        "--serve",
        mode,
        "run",
        "--data-dir",
        str(data_dir),
        "--listen",
        f"127.0.0.1:{port}",
    ]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{mode} agent exited with {proc.returncode}")
        try:
            if (
                request(http.client.HTTPConnection("127.0.0.1", port, timeout=5), "GET", "/v2/health/ready", True)
                == 200
            ):
                return proc
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{mode} agent not ready")


def request(conn: http.client.HTTPConnection, method: str, path: str, close: bool = False) -> int:
    conn.request(method, path, body=BODY if method == "POST" else None, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    if close:
        conn.close()
    return resp.status


def cpu_ns(pid: int) -> int:
    """CPU ns of every thread of ``pid`` (scheduler accounting: not rounded to clock ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError):
            pass  # a thread that just ended
    return total


def workload(port: int, pid: int, kind: str, n: int) -> tuple[float, float]:
    """(p50 µs, agent CPU µs per request) for ``n`` requests of ``kind``."""
    method, path = ("POST", INFER) if kind == "infer" else ("GET", "/v2/health/ready")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    request(conn, method, path)  # connect outside the timing (keep-alive kinds)
    lat = []
    c0 = cpu_ns(pid)
    for _ in range(n):
        t0 = time.perf_counter()
        if kind == "fresh":
            status = request(http.client.HTTPConnection("127.0.0.1", port, timeout=30), method, path, True)
        else:
            status = request(conn, method, path)
        lat.append(time.perf_counter() - t0)
        if status != 200:
            raise SystemExit(f"{kind}: HTTP {status}")
    cpu = (cpu_ns(pid) - c0) / 1e3 / n
    conn.close()
    return statistics.median(lat) * 1e6, cpu


def guard_work_us(reps: int = 200_000) -> dict[str, float]:
    """The guard's own bookkeeping per kept-alive request, alone (best of 5), on uvloop and on asyncio.

    ``timer``: a read timer armed and cancelled per request, one clock read (the guard before this
    bench); ``deadline``: the deadline written and cleared, two clock reads (the sweep).
    """
    import asyncio

    loops: dict[str, Any] = {"asyncio": asyncio.new_event_loop()}
    try:
        import uvloop

        loops["uvloop"] = uvloop.new_event_loop()
    except ImportError:
        pass
    out = {}
    state = types.SimpleNamespace(deadline=None)
    for name, loop in loops.items():

        def timer(loop: Any = loop) -> None:
            loop.call_later(10.0, timer).cancel()
            time.monotonic()

        def deadline() -> None:
            state.deadline = time.monotonic() + 10.0
            state.deadline = None
            time.monotonic()

        for label, fn in (("timer", timer), ("deadline", deadline)):
            out[f"{label} ({name})"] = min(timeit.repeat(fn, number=reps, repeat=5)) / reps * 1e6
        loop.close()
    return out


def connection_us(reps: int = 20_000) -> dict[str, float]:
    """``connection_made`` + ``connection_lost`` alone (best of 5), per protocol class, on uvloop, no socket."""
    import asyncio

    import uvloop
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from edge_agent.http.guard import guarded_protocol

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    class Transport(asyncio.Transport):
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return {"sockname": ("127.0.0.1", 1), "peername": ("127.0.0.1", 2)}.get(name, default)

        def is_closing(self) -> bool:
            return False

        def close(self) -> None:
            pass

    config = Config(app, limit_concurrency=1000, lifespan="off", log_config=None)
    config.load()
    loop = uvloop.new_event_loop()
    classes = {"plain": HttpToolsProtocol, "guard": guarded_protocol(10.0)}
    out = {name: float("inf") for name in classes}
    for _ in range(5):  # alternating, best of 5
        for name, cls in classes.items():
            state = ServerState()

            def connect(cls: Any = cls, state: ServerState = state) -> None:
                proto = cls(config=config, server_state=state, app_state={}, _loop=loop)
                proto.connection_made(Transport())
                proto.connection_lost(None)

            out[name] = min(out[name], timeit.timeit(connect, number=reps) / reps * 1e6)
    loop.close()
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        return serve(argv[1], argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--keepalive", type=int, default=3000, help="requests per kind per round on one connection")
    ap.add_argument("--fresh", type=int, default=600, help="requests per round, each on a new connection")
    ap.add_argument("--quick", action="store_true", help="4 rounds of 1500 / 300 requests")
    ap.add_argument("--modes", default=",".join(MODES), help="agents: guard, plain*, guard@REF (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.keepalive, args.fresh = 4, 1500, 300
    modes = tuple(args.modes.split(","))
    from tests.support.env import free_port

    work = Path(tempfile.mkdtemp(prefix="guard-bench-"))
    agents: dict[str, tuple[subprocess.Popen, int]] = {}
    kinds = {"health": args.keepalive, "infer": args.keepalive, "fresh": args.fresh}
    res: dict[tuple[str, str], list[tuple[float, float]]] = {(m, k): [] for m in modes for k in kinds}
    try:
        for mode in modes:
            port = free_port()
            agents[mode] = (start(mode, work / mode, port), port)
        for proc, port in agents.values():  # warm-up
            for kind in kinds:
                workload(port, proc.pid, kind, 200)
        for r in range(args.rounds):
            order = modes if r % 2 == 0 else modes[::-1]
            for kind, n in kinds.items():
                for mode in order:
                    proc, port = agents[mode]
                    res[(mode, kind)].append(workload(port, proc.pid, kind, n))
            print(
                f"round {r + 1}: "
                + ", ".join(
                    f"{m} {k} {res[(m, k)][-1][0]:.0f}/{res[(m, k)][-1][1]:.0f} µs" for k in kinds for m in modes
                ),
                flush=True,
            )
    finally:
        for proc, _ in agents.values():
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)

    print("\n| requests | agent | p50 µs | Δ p50 vs plain | CPU µs/req | Δ CPU vs plain |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    summary = []
    for kind in kinds:
        med = {m: [statistics.median(x[i] for x in res[(m, kind)]) for i in (0, 1)] for m in modes}
        base = med.get("plain", med[modes[-1]])
        for m in modes:
            p50, cpu = med[m]
            print(f"| {kind} | {m} | {p50:.0f} | {p50 - base[0]:+.1f} | {cpu:.1f} | {cpu - base[1]:+.1f} |")
        if "guard" in med and "plain" in med:
            aa = f", A/A {med['plain2'][1] - base[1]:+.1f}" if "plain2" in med else ""
            summary.append(f"{kind} {med['guard'][1] - base[1]:+.1f} µs{aa}")
    if summary:
        print("\nGuard CPU per request vs plain (goal: a few µs at most): " + "; ".join(summary))
    work = guard_work_us()
    print(
        "\nThe guard's own bookkeeping per kept-alive request, alone: "
        + ", ".join(f"{k} {v:.2f} µs" for k, v in work.items())
    )
    conn = connection_us()
    print("connection_made + connection_lost, alone: " + ", ".join(f"{k} {v:.2f} µs" for k, v in conn.items()))
    print(
        f"Reproduce: `.venv/bin/python bench/guard_bench.py --rounds {args.rounds} --keepalive {args.keepalive} "
        f"--fresh {args.fresh} --modes {','.join(modes)}`"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
