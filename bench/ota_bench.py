"""OTA fan-out benchmark: one signed release to 1,000 simulated devices vs. a raw MQTT fan-out of the same bytes.

    .venv/bin/python bench/ota_bench.py                 # 1,000 devices, 3 runs, a private mosquitto
    .venv/bin/python bench/ota_bench.py --devices 200 --runs 1

(a) ``release``: ``cloud_batch.fleetops.release.release()`` of the shipped digits model (models/digits/1)
    to N ``cloud_batch.sim`` devices (one MQTT connection each, real signature checks,
    rollout gate, ``transfer.Downloader`` + ``ChunkStore`` with fsynced chunk files, unpack and
    manifest check, DeviceState reports). Timed from the call to ``release()`` until the cloud
    side (``rollout.watch``) sees every device report ``committed``. The devices wait the agent's
    default ``settle_s`` (1 s) for the rollout document; ``health_window_s`` is 0 (no post-activation
    watch), so the figure is protocol + transfer, not policy waits beyond that 1 s.
(b) ``raw fan-out``: the same packed bytes published once (QoS 1, not retained) to N plain paho
    subscribers driven by the same event loop in the same process; timed from ``publish`` until
    every subscriber has the message.

Everything runs on this machine: broker, simulated devices and the cloud side share its cores.
Prints a markdown table, then the results as JSON, then the command line that reproduces them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402

from bench.procstat import cpu_s  # noqa: E402
from cloud_batch.fleetops.broker import open_link  # noqa: E402
from cloud_batch.fleetops.keys import generate_keys  # noqa: E402
from cloud_batch.fleetops.release import release  # noqa: E402
from cloud_batch.fleetops.rollout import watch  # noqa: E402
from cloud_batch.sim.device import SETTLE_S  # noqa: E402
from cloud_batch.sim.fleet import SimFleet, _raise_fd_limit  # noqa: E402
from cloud_batch.sim.loop import EventLoop  # noqa: E402
from edge_agent.mqtt.link import MqttLink, parse_broker_url  # noqa: E402
from edge_agent.wire.protocol import pack_dir  # noqa: E402
from tests.broker import MOSQUITTO, Broker  # noqa: E402

MODEL_DIR = REPO / "models" / "digits" / "1"


def mosquitto_version() -> str:
    try:
        out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, timeout=5).stdout
        return out.splitlines()[0].replace("mosquitto version ", "")
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of this process, or of ``pid`` from /proc."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    try:
        return cpu_s(pid)
    except (OSError, IndexError, ValueError):
        return float("nan")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


# -- (a) a release to N simulated devices ------------------------------------------------------
def bench_release(
    url: str,
    key: Path,
    pub: Path,
    n: int,
    run: int,
    workers: int,
    settle_s: float,
    sim_dir: Path | None,
    broker_pid: int | None,
) -> dict[str, Any]:
    fleet = f"bench-{run}"
    t_start = time.perf_counter()
    workdir = None if sim_dir is None else Path(tempfile.mkdtemp(prefix="simfleet-", dir=sim_dir))
    sim = SimFleet(url, fleet, n, trusted_keys=[pub], workers=workers, settle_s=settle_s, workdir=workdir).start(
        timeout_s=120
    )
    connect_s = time.perf_counter() - t_start
    try:
        cpu0, broker0 = cpu_seconds(), cpu_seconds(broker_pid) if broker_pid else float("nan")
        t0_wall, t0 = time.time(), time.perf_counter()
        with open_link(url) as link:  # one connection per call, as the CLI does
            rel = release(MODEL_DIR.parents[1], "digits", "1", fleet, key, link, health_window_s=0, progress=False)
        release_s = time.perf_counter() - t0
        with open_link(url) as link:
            status = watch(
                link,
                "digits",
                fleet,
                lambda s: s.counts["success"] == n,
                timeout_s=600,
                auto_halt=False,
                min_interval_s=0.02,
            )
        all_s = time.perf_counter() - t0
        sim_cpu = cpu_seconds() - cpu0
        broker_cpu = cpu_seconds(broker_pid) - broker0 if broker_pid else float("nan")
        commits = [d.at - t0_wall for d in status.devices if d.result == "success"]
        return {
            "run": run,
            "devices": n,
            "connect_s": connect_s,
            "release_call_s": release_s,
            "first_commit_s": min(commits),
            "p50_commit_s": pct(commits, 50),
            "p95_commit_s": pct(commits, 95),
            "last_commit_s": max(commits),
            "all_committed_seen_s": all_s,
            "bench_process_cpu_s": sim_cpu,
            "broker_cpu_s": broker_cpu,
            "artifact_bytes": rel.artifact.size,
            "chunks": len(rel.artifact.chunks),
        }
    finally:
        sim.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


# -- (b) raw fan-out ----------------------------------------------------------------------------
class RawSubscribers:
    """N plain paho clients on one EventLoop, all subscribed to one topic; counts deliveries."""

    def __init__(self, url: str, n: int, topic: str) -> None:
        self.host, self.port, _ = parse_broker_url(url)
        self.topic = topic
        self.loop = EventLoop("raw-fanout")
        self.lock = threading.Lock()
        self.subscribed = 0
        self.received = 0
        self.want = 0
        self.all_subscribed = threading.Event()
        self.all_received = threading.Event()
        self.clients = []
        for i in range(n):
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{i:04d}", protocol=mqtt.MQTTv311)
            c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(self.topic, 1)
            c.on_subscribe = self._on_subscribe
            c.on_message = self._on_message
            self.clients.append(c)

    def _on_subscribe(self, *args: Any) -> None:
        self.subscribed += 1  # loop thread only
        if self.subscribed == len(self.clients):
            self.all_subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.received += 1
        if self.received == self.want:
            self.all_received.set()

    def start(self) -> None:
        _raise_fd_limit(len(self.clients) + 256)
        for c in self.clients:
            self.loop.attach(c)
        self.loop.start()

        def connect(start: int) -> None:
            for c in self.clients[start : start + 50]:
                c.connect(self.host, self.port, keepalive=60)
            if start + 50 < len(self.clients):
                self.loop.call_soon(connect, start + 50)

        self.loop.call_soon(connect, 0)
        if not self.all_subscribed.wait(120):
            raise SystemExit(f"raw fan-out: only {self.subscribed} subscribers")

    def expect(self, count: int) -> None:
        self.loop.run_sync(self._expect, count)

    def _expect(self, count: int) -> None:
        self.received, self.want = 0, count
        self.all_received.clear()

    def stop(self) -> None:
        def close() -> None:
            for c in self.clients:
                c.disconnect()

        self.loop.run_sync(close)
        time.sleep(0.5)
        self.loop.stop()


def bench_raw(url: str, blob: bytes, n: int, repeats: int) -> list[float]:
    subs = RawSubscribers(url, n, "bench/raw-fanout")
    subs.start()
    pub = MqttLink(url, "raw-publisher")
    pub.start()
    pub.wait_connected(10)
    times = []
    try:
        for _ in range(repeats):
            subs.expect(n)
            t0 = time.perf_counter()
            pub.publish("bench/raw-fanout", blob, qos=1)
            if not subs.all_received.wait(120):
                raise SystemExit(f"raw fan-out: only {subs.received}/{n} received")
            times.append(time.perf_counter() - t0)
            time.sleep(0.2)
    finally:
        pub.stop()
        subs.stop()
    return times


# -- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000, help="simulated devices / raw subscribers (default 1000)")
    parser.add_argument("--runs", type=int, default=3, help="releases, each to a fresh fleet (default 3)")
    parser.add_argument("--raw-repeats", type=int, default=5, help="raw fan-out publishes (default 5)")
    parser.add_argument("--workers", type=int, default=16, help="simulator download threads (default 16)")
    parser.add_argument(
        "--settle-s", type=float, default=SETTLE_S, help="device wait for the rollout doc (default 1.0)"
    )
    parser.add_argument(
        "--sim-dir",
        type=Path,
        help="where simulated devices keep chunks (default: the temp dir; "
        "/dev/shm takes the disk's fsyncs out of the figure)",
    )
    parser.add_argument("--broker", help="use this broker instead of a private mosquitto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    work = Path(tempfile.mkdtemp(prefix="ota-bench-"))
    broker = None
    if not args.broker:
        _raise_fd_limit(8192)  # inherited by mosquitto: one fd per connection
        broker = Broker(work / "broker").start()
    url = args.broker or broker.url  # type: ignore[union-attr]
    try:
        key, pub = generate_keys(work / "keys")
        blob = pack_dir(MODEL_DIR)
        runs = []
        for run in range(1, args.runs + 1):
            r = bench_release(
                url,
                key,
                pub,
                args.devices,
                run,
                args.workers,
                args.settle_s,
                args.sim_dir,
                broker.proc.pid if broker and broker.proc else None,
            )
            runs.append(r)
            print(
                f"run {run}: all {args.devices} committed {r['all_committed_seen_s']:.2f}s after release() "
                f"(release() {r['release_call_s']:.3f}s, p50 commit {r['p50_commit_s']:.2f}s)",
                file=sys.stderr,
            )
        raw = bench_raw(url, blob, args.devices, args.raw_repeats)
        print(f"raw fan-out: {', '.join(f'{t * 1000:.0f}' for t in raw)} ms", file=sys.stderr)
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k.endswith("_s")}
    per_device_ms = med["bench_process_cpu_s"] * 1000 / args.devices
    busy = med["bench_process_cpu_s"] / max(1e-9, med["all_committed_seen_s"] - args.settle_s)
    result = {
        "benchmark": "ota_fanout",
        "devices": args.devices,
        "artifact": {"model": "digits/1", "bytes": len(blob), "chunks": runs[0]["chunks"]},
        "settle_s": args.settle_s,
        "health_window_s": 0,
        "download_workers": args.workers,
        "sim_dir": str(args.sim_dir or tempfile.gettempdir()),
        "release_runs": runs,
        "release_median": med,
        "raw_fanout_s": raw,
        "raw_fanout_median_s": statistics.median(raw),
        "environment": {
            "python": platform.python_version(),
            "paho_mqtt": getattr(mqtt, "__version__", None) or _paho_version(),
            "mosquitto": mosquitto_version() if broker is not None else "external",
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "system": platform.system(),
        },
    }
    n = args.devices
    print(
        f"\n### OTA fan-out: one release to {n:,} simulated devices (digits/1, {len(blob):,} bytes, "
        f"{runs[0]['chunks']} chunk)\n"
    )
    print("| measurement | median | runs |")
    print("| --- | ---: | --- |")
    rows = [
        ("devices connected and subscribed (SimFleet.start)", "connect_s"),
        ("`release()` call: pack, publish chunk + rollout + signed release", "release_call_s"),
        ("first device committed", "first_commit_s"),
        ("half of the devices committed (p50)", "p50_commit_s"),
        ("95% committed (p95)", "p95_commit_s"),
        ("last device committed (device timestamps)", "last_commit_s"),
        (f"cloud side sees all {n:,} committed (`rollout.watch`)", "all_committed_seen_s"),
    ]
    for label, k in rows:
        print(f"| {label} | {med[k]:.2f} s | {', '.join(f'{r[k]:.2f}' for r in runs)} |")
    print(
        f"| raw MQTT fan-out of the same bytes to {n:,} subscribers (QoS 1) | {statistics.median(raw) * 1000:.0f} ms "
        f"| {', '.join(f'{t * 1000:.0f}' for t in raw)} ms |"
    )
    for label, k in (
        ("CPU of this process (simulator + cloud side) during the release", "bench_process_cpu_s"),
        ("CPU of mosquitto during the release", "broker_cpu_s"),
    ):
        print(f"| {label} | {med[k]:.2f} s | {', '.join(f'{r[k]:.2f}' for r in runs)} |")
    print(
        f"\nThe simulator costs {per_device_ms:.1f} ms of CPU per device (signature check, Downloader with fsynced "
        f"chunk files, unpack, six state reports); after the settle wait this process is busy {busy:.0%} of one "
        "core, so the release figure measures one Python process simulating the whole fleet more than MQTT "
        "(compare the raw fan-out)."
    )
    print(
        f"\nRelease times include the devices' {args.settle_s:g} s settle wait for the rollout document "
        "(the agent's default) and no health window. Broker, devices and cloud side share "
        f"{os.cpu_count()} CPU(s).\n"
    )
    print("```json")
    print(json.dumps(result, indent=2))
    print("```")
    cmd = [
        ".venv/bin/python",
        "bench/ota_bench.py",
        "--devices",
        str(n),
        "--runs",
        str(args.runs),
        "--raw-repeats",
        str(args.raw_repeats),
        "--workers",
        str(args.workers),
    ]
    if args.settle_s != SETTLE_S:
        cmd += ["--settle-s", f"{args.settle_s:g}"]
    if args.sim_dir:
        cmd += ["--sim-dir", str(args.sim_dir)]
    if args.broker:
        cmd += ["--broker", args.broker]
    print(f"\nReproduce: `{' '.join(cmd)}`")
    return 0


def _paho_version() -> str:
    try:
        from importlib.metadata import version

        return version("paho-mqtt")
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
