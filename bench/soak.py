"""Soak test: a real agent under mixed load while releases, feature pushes and broker restarts happen (issue #15).

    .venv/bin/python bench/soak.py --minutes 30 [--plot docs/soak.png] [--clients 4]

Starts a private mosquitto (tests/broker.py) and a real ``edge-agent run`` (digits and maintenance
from models/), then for ``--minutes``:

- ``--clients`` threads send a mix of KServe V2 requests over keep-alive HTTP (tritonclient):
  digits as JSON, digits as binary tensors, and maintenance with a request-time join
  (``parameters.entity_id``) on the pushed ``asset_features``;
- a model release (a new digits version) every ``--release-every-s`` (60 s);
- a feature push (a new ``asset_features`` snapshot) every ``--push-every-s`` (120 s);
- a broker restart every ``--restart-every-s`` (300 s);
- telemetry on (the default) with 10% of inputs sampled: the outbox fills to its bound (no ingest
  acknowledges it here), so its drop path runs for most of the soak;
- every 5 s: the agent's RSS and open fds, and the summed RSS of the agent and its child processes (/proc).

Reports RSS growth after the warm-up (first ``--warmup-min`` minutes), the fd range, requests
by outcome (4xx "refused by design" apart from failures) and committed releases/pushes, as
markdown + JSON; plots RSS and fds over time (matplotlib) to ``--plot``. Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent

from bench.procstat import children, rss_mb  # noqa: E402
from cloud_batch.features.build import build  # noqa: E402
from cloud_batch.features.push import plan_push, publish_push  # noqa: E402
from cloud_batch.fleetops.broker import open_link  # noqa: E402
from cloud_batch.fleetops.keys import generate_keys  # noqa: E402
from cloud_batch.fleetops.release import release  # noqa: E402
from cloud_batch.registry.models import Registry  # noqa: E402
from tests.broker import Broker  # noqa: E402
from tests.support.env import free_port  # noqa: E402

FLEET = "soak"
DIGITS = REPO / "models" / "digits" / "1"


def proc_sample(pid: int) -> tuple[float, int, float]:
    """(RSS in MB, open fds) of ``pid``, and the summed RSS of it and its descendants (the telemetry writer)."""
    rss = rss_mb(pid)
    return rss, len(os.listdir(f"/proc/{pid}/fd")), rss + sum(rss_mb(c) for c in children(pid))


class Load(threading.Thread):
    """One client: a random mix of JSON, binary and join requests; counts outcomes."""

    def __init__(self, url: str, entities: list[str], stop: threading.Event, seed: int) -> None:
        super().__init__(daemon=True)
        self.client = httpclient.InferenceServerClient(url, connection_timeout=10, network_timeout=30)
        self.entities, self.stop, self.rng = entities, stop, random.Random(seed)
        self.outcomes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def one(self) -> None:
        kind = self.rng.choice(["json", "binary", "join"])
        if kind == "join":
            live = httpclient.InferInput("live", [1, 4], "FP32")
            live.set_data_from_numpy(np.random.rand(1, 4).astype(np.float32), binary_data=False)
            params = {"entity_id": self.rng.choice(self.entities)}
            self.client.infer("maintenance", [live], parameters=params)
        else:
            x = httpclient.InferInput("pixels", [1, 8, 8, 1], "FP32")
            x.set_data_from_numpy(np.random.rand(1, 8, 8, 1).astype(np.float32) * 16, binary_data=kind == "binary")
            self.client.infer("digits", [x])
        self.outcomes[kind] += 1

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.one()
            except InferenceServerException as exc:
                status = str(exc.status() or "?")
                self.outcomes[f"http {status}"] += 1
                self.errors[f"{status} {str(exc.message())[:80]}"] += 1
            except Exception as exc:  # connection refused/reset: a failure, whatever the cause
                self.outcomes["failed"] += 1
                self.errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
                time.sleep(0.05)


def start_agent(work: Path, broker_url: str, pub: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env["EDGEFLEET_MODELS_DIR"] = str(REPO / "models")
    env["EDGEFLEET_TELEMETRY__SAMPLE_INPUTS"] = "0.1"
    args = ["--data-dir", str(work / "agent"), "--listen", f"127.0.0.1:{port}", "--broker", broker_url]
    args += ["--fleet", FLEET, "--device-id", "soak-1", "--trust", str(pub), "--log-level", "warning"]
    log = open(work / "agent.log", "wb")  # noqa: SIM115 (the agent's stderr for the whole run)
    proc = subprocess.Popen([str(BIN / "edge-agent"), "run", *args], env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 180  # slow under tracemalloc or on a busy machine
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1)
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"agent did not become ready; see {work / 'agent.log'}")


def update_states(work: Path) -> dict[str, str]:
    """The state of every persisted update record (``<data-dir>/updates/*.json``)."""
    states = {}
    for path in sorted((work / "agent" / "updates").glob("*.json")):
        try:
            states[path.stem] = str(json.loads(path.read_text()).get("state"))
        except (OSError, ValueError):
            states[path.stem] = "?"
    return states


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--warmup-min", type=float, default=2)
    ap.add_argument("--release-every-s", type=float, default=60)
    ap.add_argument("--push-every-s", type=float, default=120)
    ap.add_argument("--restart-every-s", type=float, default=300)
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "soak.png")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="edgefleet-soak-"))
    broker = Broker(work / "broker").start()
    key, pub = generate_keys(work / "keys")
    models, features = Registry(work / "registry"), work / "features"
    fver = 1
    build(features, "asset_features", str(fver), recipe="maintenance", n_assets=200, days=30, progress=False)
    entities = [str(e) for e in np.load(features / "features" / "asset_features" / "1" / "data.npz")["entities"]]

    def push(version: int) -> None:
        if version > 1:
            build(
                features,
                "asset_features",
                str(version),
                recipe="maintenance",
                n_assets=200,
                days=30,
                seed=version,
                progress=False,
            )
        plan = plan_push(features, "asset_features", str(version), FLEET, key)
        with open_link(broker.url) as link:
            publish_push(link, plan, progress=False)

    port = free_port()
    agent = start_agent(work, broker.url, pub, port)
    samples: list[tuple[float, float, int, float]] = []
    events: list[tuple[float, str]] = []
    stop = threading.Event()
    loads: list[Load] = []
    t0 = time.monotonic()
    try:
        push(fver)
        events.append((0.0, "push"))
        time.sleep(2)
        loads = [Load(f"127.0.0.1:{port}", entities, stop, seed=i) for i in range(args.clients)]
        for load in loads:
            load.start()
        mver, next_release, next_push, next_restart, next_sample = 1, 0.0, 0.0, 0.0, 0.0
        next_release, next_push, next_restart = args.release_every_s, args.push_every_s, args.restart_every_s
        end = args.minutes * 60
        while (now := time.monotonic() - t0) < end:
            if agent.poll() is not None:
                raise SystemExit(f"the agent exited with {agent.returncode}; see {work / 'agent.log'}")
            if now >= next_sample:
                samples.append((now, *proc_sample(agent.pid)))
                next_sample += 5
            if now >= next_release:
                mver += 1
                models.register(DIGITS / "model.tflite", "digits", str(mver), golden=DIGITS / "golden.npz",
                                rename_outputs={"output_0": "probs"})  # fmt: skip
                with open_link(broker.url) as link:
                    release(models.root, "digits", str(mver), FLEET, key, link, health_window_s=5, progress=False)
                events.append((now, "release"))
                next_release += args.release_every_s
            if now >= next_push:
                fver += 1
                push(fver)
                events.append((now, "push"))
                next_push += args.push_every_s
            if now >= next_restart:
                broker.restart()
                events.append((now, "broker restart"))
                next_restart += args.restart_every_s
            time.sleep(0.5)
        time.sleep(8)  # the last release's health window
        final = update_states(work)
        status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/agent/status", timeout=5).read())
    finally:
        stop.set()
        for load in loads:
            load.join(35)
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
        broker.stop()

    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for load in loads:
        outcomes.update(load.outcomes)
        errors.update(load.errors)
    warm = [s for s in samples if s[0] >= args.warmup_min * 60] or samples
    rss0, rss1 = warm[0][1], warm[-1][1]
    tree0, tree1 = warm[0][3], warm[-1][3]
    served = {k: v.get("version") for k, v in status.get("models", {}).items()}
    result = {
        "minutes": args.minutes,
        "clients": args.clients,
        "requests": dict(outcomes),
        "errors": dict(errors.most_common(10)),
        "rss_mb_after_warmup": [round(rss0, 1), round(rss1, 1)],
        "rss_growth_pct": round((rss1 - rss0) / rss0 * 100, 2),
        "rss_mb_min_max": [round(min(s[1] for s in warm), 1), round(max(s[1] for s in warm), 1)],
        "tree_rss_mb_after_warmup": [round(tree0, 1), round(tree1, 1)],
        "tree_rss_growth_pct": round((tree1 - tree0) / tree0 * 100, 2),
        "fds_min_max_after_warmup": [min(s[2] for s in warm), max(s[2] for s in warm)],
        "releases": sum(1 for _, e in events if e == "release"),
        "pushes": sum(1 for _, e in events if e == "push"),
        "broker_restarts": sum(1 for _, e in events if e == "broker restart"),
        "served_at_end": served,
        "features_at_end": status.get("features"),
        "last_digits_version_released": str(mver),
        "final_update_states": final,
    }
    plot(samples, events, args.plot, args.warmup_min)
    shutil.rmtree(work, ignore_errors=True)
    ok = sum(v for k, v in outcomes.items() if k in ("json", "binary", "join"))
    print(f"\n### Soak: {args.minutes:g} min, {args.clients} clients\n")
    print(
        f"- requests: {ok:,} answered 200; other outcomes: {dict((k, v) for k, v in outcomes.items() if k not in ('json', 'binary', 'join')) or 'none'}"
    )
    print(
        f"- RSS after warm-up: {rss0:.1f} → {rss1:.1f} MB ({result['rss_growth_pct']:+.2f}%), fds {result['fds_min_max_after_warmup']}"
    )
    print(f"- with its child processes: {tree0:.1f} → {tree1:.1f} MB ({result['tree_rss_growth_pct']:+.2f}%)")
    print(
        f"- {result['releases']} releases, {result['pushes']} pushes, {result['broker_restarts']} broker restarts; serving {served}"
    )
    print(f"- plot: {args.plot}\n\n```json\n{json.dumps(result, indent=2)}\n```")
    print(f"\nReproduce: `.venv/bin/python bench/soak.py --minutes {args.minutes:g} --clients {args.clients}`")
    return 0


def plot(
    samples: list[tuple[float, float, int, float]], events: list[tuple[float, str]], out: Path, warmup: float
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] / 60 for s in samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    lines = [
        *ax1.plot(t, [s[1] for s in samples], color="tab:blue", label="agent"),
        *ax1.plot(t, [s[3] for s in samples], color="tab:cyan", label="agent + children (summed)"),
    ]
    ax1.set_ylabel("RSS (MB)")
    ax2.plot(t, [s[2] for s in samples], color="tab:green")
    ax2.set_ylabel("open fds")
    ax2.set_xlabel("minutes")
    colors = {"release": "tab:orange", "push": "tab:purple", "broker restart": "tab:red"}
    for ax in (ax1, ax2):
        ax.axvspan(0, warmup, color="0.92")
        for when, what in events:
            ax.axvline(when / 60, color=colors[what], lw=0.6, alpha=0.6)
    handles = [*lines, *(plt.Line2D([], [], color=c, label=k) for k, c in colors.items())]
    ax1.legend(handles=handles, loc="lower right", fontsize=8)
    ax1.set_title("edge-agent soak: RSS and fds (grey: warm-up; lines: releases, pushes, broker restarts)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    raise SystemExit(main())
