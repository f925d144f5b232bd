"""Crash-safe OTA transfer vs a raw MQTT fetch of the same bytes, side by side in one run (issue #15).

    .venv/bin/python bench/transfer_bench.py                     # 12.9 MB, 128 KiB chunks, 7 rounds
    .venv/bin/python bench/transfer_bench.py --size 1000000 --rounds 3

One private mosquitto (tests/broker.py) holds the artifact as retained chunks; one device link,
already connected (as in a running agent), fetches it again and again. Each round runs, in turn:

- ``raw``: a wildcard subscription to the artifact's chunk topics; done when every chunk has
  arrived in memory. No hashing, no disk: the wire's floor.
- ``ota``: today's ``Downloader`` + ``ChunkStore`` (per-chunk sha256, one preallocated data file,
  verified-chunk journal fsynced in groups, fsync + rename), with the agent's default window. The
  whole-artifact sha256 is not part of it: the update machine's verifying step does it once, on
  every path (raw included, it would add the same ~8 ms to both).
- ``before``: the same Downloader and ChunkStore as of commit ``--before`` (one fsynced file per
  chunk, window 8), loaded from git, if git has that commit.

The chunk directories live under ``--dir`` (default: the temp dir, i.e. the real disk and its
fsyncs). Prints per-round times, a markdown table of medians, and the command.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cloud_batch.fleetops.publish import publish_artifact  # noqa: E402
from edge_agent.config import OtaConfig  # noqa: E402
from edge_agent.mqtt.chunks import ChunkStore  # noqa: E402
from edge_agent.mqtt.download import Downloader  # noqa: E402
from edge_agent.mqtt.link import MqttLink  # noqa: E402
from edge_agent.wire.protocol import DEFAULT_CHUNK_SIZE, Artifact  # noqa: E402
from edge_agent.wire.topics import chunk_topic  # noqa: E402
from tests.broker import Broker  # noqa: E402

BEFORE = "f4890cb"  # the last commit with one fsynced file per chunk


def raw_fetch(link: MqttLink, art: Artifact) -> float:
    """Seconds until a wildcard subscription has every retained chunk in memory."""
    got: dict[str, int] = {}
    done = threading.Event()
    n = len(art.chunks)

    def on(topic: str, payload: bytes, retained: bool) -> None:
        got[topic] = len(payload)
        if len(got) == n:
            done.set()

    wildcard = chunk_topic(art.sha256, 0).rsplit("/", 1)[0] + "/+"
    t0 = time.perf_counter()
    link.subscribe(wildcard, on)
    if not done.wait(60):
        raise SystemExit(f"raw fetch: only {len(got)}/{n} chunks")
    elapsed = time.perf_counter() - t0
    link.unsubscribe(wildcard)
    if sum(got.values()) != art.size:
        raise SystemExit("raw fetch: wrong byte count")
    return elapsed


def ota_fetch(link: MqttLink, art: Artifact, root: Path, store_cls: Any, dl_cls: Any, window: int) -> float:
    """Seconds for a Downloader run into an empty chunk store, up to the assembled, verified artifact."""
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    out = dl_cls(link, store_cls(root, art), window=window, use_http=False).run(timeout_s=120)
    elapsed = time.perf_counter() - t0
    if out.stat().st_size != art.size:
        raise SystemExit("ota fetch: wrong size")
    shutil.rmtree(root, ignore_errors=True)
    return elapsed


def load_before(ref: str) -> tuple[Any, Any] | None:
    """ChunkStore and Downloader as of git ``ref`` (None when git or the commit is not available)."""
    mods = {}
    for name in ("chunks", "download"):
        try:
            src = subprocess.run(
                ["git", "-C", str(REPO), "show", f"{ref}:edge_agent/mqtt/{name}.py"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
        mod = types.ModuleType(f"before_{name}")
        sys.modules[mod.__name__] = mod  # dataclasses look their module up
        exec(compile(src, f"{ref}:{name}.py", "exec"), mod.__dict__)
        mods[name] = mod
    return mods["chunks"].ChunkStore, mods["download"].Downloader


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=12_910_000, help="artifact bytes (default: the 12.9 MB MobileNet)")
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--window", type=int, default=OtaConfig().chunk_window, help="ota window (default: config)")
    ap.add_argument("--before", default=BEFORE, help="git commit of the 'before' store ('' to skip)")
    ap.add_argument("--dir", type=Path, help="where chunk stores live (default: the temp dir)")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="transfer-bench-", dir=args.dir))
    broker = Broker(work / "broker").start()
    pub, dev = MqttLink(broker.url), MqttLink(broker.url)
    for link in (pub, dev):
        link.start()
        link.wait_connected(10)
    before = load_before(args.before) if args.before else None
    blob = os.urandom(args.size)
    times: dict[str, list[float]] = {"raw": [], "ota": []}
    runs: list[tuple[str, Callable[[], float]]] = [
        ("raw", lambda: raw_fetch(dev, art)),
        ("ota", lambda: ota_fetch(dev, art, work / "ota", ChunkStore, Downloader, args.window)),
    ]
    if before is not None:
        times["before"] = []
        runs.append(("before", lambda: ota_fetch(dev, art, work / "before", *before, 8)))
    try:
        art = publish_artifact(pub, blob, args.chunk_size)
        for _label, fn in runs:  # warm-up: page cache, broker, imports
            fn()
        for r in range(args.rounds):
            for label, fn in runs:
                times[label].append(fn())
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()), flush=True)
    finally:
        pub.stop()
        dev.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)

    raw = statistics.median(times["raw"])
    print(
        f"\n{args.size / 1e6:.1f} MB, {len(art.chunks)} chunks of {args.chunk_size // 1024} KiB, {args.rounds} rounds"
    )
    print("\n| path | median ms | min ms | max ms | × raw |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, values in times.items():
        med = statistics.median(values)
        print(f"| {label} | {med * 1e3:.1f} | {min(values) * 1e3:.1f} | {max(values) * 1e3:.1f} | {med / raw:.1f} |")
    cmd = f".venv/bin/python bench/transfer_bench.py --size {args.size} --rounds {args.rounds} --window {args.window}"
    print(f"\nReproduce: `{cmd}`" + (f" (--dir {args.dir})" if args.dir else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
