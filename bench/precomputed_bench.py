"""Precomputed-first answers against live inference of the maintenance model, through the HTTP API, in one run.

Four ways to ask for one asset's failure probability, interleaved in rounds (so drift hits all
alike), through the real V2 API on uvicorn (httptools) in this process, over one keep-alive HTTP
connection, one request at a time; each request picks a random asset:

* **precomputed**: ``{"parameters": {"entity_id": ...}}`` to ``maintenance_scored`` (the shipped
  model plus a ``precomputed`` declaration): one ``maintenance_scores`` row read from the SQLite
  cache, no interpreter (``edge_agent.features.precomputed``);
* **live, joined**: ``entity_id`` + ``live`` to the shipped ``maintenance``: ``asset_features``
  joined from the cache, then the interpreter;
* **live, explicit**: both inputs in the body, to ``maintenance`` (no cache read);
* **miss → live**: ``entity_id`` + ``live`` to ``maintenance_scored`` for an asset the scores do
  not hold: the precomputed probe misses, then the joined live path runs (the price of a miss).

``--rows`` assets hold ``asset_features``; the first half of them also hold scores, computed by
the model itself (so the precomputed and live answers are the same; checked after the timing).

Run (prints a markdown table and the command that reproduces it)::

    .venv/bin/python bench/precomputed_bench.py --rows 100000 --requests 5000
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from join_bench import make_cache, percentiles  # noqa: E402  (bench/ is on sys.path: run as a script)

from edge_agent.features.cache import FeatureCache  # noqa: E402
from edge_agent.features.precomputed import PrecomputedFirst  # noqa: E402
from edge_agent.http.app import create_app  # noqa: E402
from edge_agent.models.serving import ModelServer  # noqa: E402
from edge_agent.models.store import ModelStore  # noqa: E402
from edge_agent.wire.bundle import FeatureSpec, write_bundle  # noqa: E402
from edge_agent.wire.kserve_v2 import decode_request  # noqa: E402
from tests.apiserver import ApiServer  # noqa: E402
from tests.support.precomputed import MAINT, OUT, SCORED, SCORES, scored_model  # noqa: E402

LIVE = [70.0, 3.5, 6.0, 1800.0]
MODES = ("precomputed", "live_joined", "live_explicit", "miss_live")
ROUNDS = 8  # the modes' order rotates every round, so drift hits them alike


def entity(i: int) -> str:
    return f"asset-{i:07d}"


def publish_scores(work: Path, server: ModelServer, values: np.ndarray, scored: int) -> float:
    """The model's answers for the first ``scored`` assets (live input ``LIVE``) as ``maintenance_scores`` v1."""
    model = server.get("maintenance")
    live = np.tile(np.asarray(LIVE, np.float32), (scored, 1))
    t = time.perf_counter()
    probs = np.concatenate(
        [
            model.predict({"live": live[i : i + 64], "asset_features": values[i : min(i + 64, scored)]})[OUT]
            for i in range(0, scored, 64)
        ]
    )
    entities = [entity(i) for i in range(scored)]
    specs = [FeatureSpec(OUT, "float32")]
    write_bundle(work / "scores", SCORES, "1", "snapshot", entities, time.time() - 60, probs, specs, ttl_s=86400)
    return time.perf_counter() - t


def agent_state(work: Path, rows: int) -> tuple[ModelServer, FeatureCache, np.ndarray, dict[str, float]]:
    """Both models served; ``rows`` assets' features cached, the first half of them with scores too."""
    store = ModelStore(work / "data")
    for version_dir in (MAINT, scored_model(work)):
        store.install_dir(version_dir)
    server = ModelServer(store)
    server.sync()
    names = list(store.manifest("maintenance", "1").feature_joins["asset_features"].features)
    cache, values, timings = make_cache(work, rows, names)
    timings["score_s"] = publish_scores(work, server, values, rows // 2)
    cache.apply(work / "scores")
    return server, cache, values, timings


def body(mode: str, i: int, values: np.ndarray) -> tuple[str, bytes]:
    live_t = {"name": "live", "shape": [1, 4], "datatype": "FP32", "data": LIVE}
    feats = {"name": "asset_features", "shape": [1, 18], "datatype": "FP32", "data": values[i].tolist()}
    if mode == "precomputed":
        return SCORED, json.dumps({"parameters": {"entity_id": entity(i)}}).encode()
    if mode == "live_explicit":
        return "maintenance", json.dumps({"inputs": [live_t, feats]}).encode()
    model = "maintenance" if mode == "live_joined" else SCORED
    return model, json.dumps({"parameters": {"entity_id": entity(i)}, "inputs": [live_t]}).encode()


def run(port: int, rows: int, values: np.ndarray, requests: int, warmup: int, rounds: int) -> dict[str, Any]:
    rng = random.Random(1)
    half = rows // 2
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    lat: dict[str, list[float]] = {m: [] for m in MODES}

    def one(model: str, payload: bytes) -> dict[str, Any]:
        conn.request("POST", f"/v2/models/{model}/infer", body=payload, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:300]!r}")
        out: dict[str, Any] = json.loads(data)
        return out

    def pick(mode: str) -> int:
        return rng.randrange(half, rows) if mode == "miss_live" else rng.randrange(half)

    for _ in range(warmup):
        for mode in MODES:
            one(*body(mode, pick(mode), values))
    per_round = max(1, requests // rounds)
    for r in range(rounds):
        for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
            for _ in range(per_round):
                model, payload = body(mode, pick(mode), values)
                t0 = time.perf_counter()
                conn.request("POST", f"/v2/models/{model}/infer", body=payload, headers=headers)
                resp = conn.getresponse()
                resp.read()
                lat[mode].append(time.perf_counter() - t0)
                if resp.status != 200:
                    raise RuntimeError(f"{mode}: HTTP {resp.status}")
    out: dict[str, Any] = {mode: percentiles(xs) for mode, xs in lat.items()}
    i = rng.randrange(half)  # the same answer both ways, outside the timing
    pre, live = one(*body("precomputed", i, values)), one(*body("live_joined", i, values))
    out["same_answer"] = pre["outputs"] == live["outputs"] and pre["parameters"]["source"] == "precomputed"
    out["miss_source"] = one(*body("miss_live", half, values))["parameters"]["source"]
    conn.close()
    return out


def in_process(first: PrecomputedFirst, server: ModelServer, rows: int, n: int) -> dict[str, Any]:
    """``PrecomputedFirst.first`` alone (a hit: one cache probe and the output array), no HTTP."""
    rng = random.Random(2)
    model = server.get(SCORED)
    times = []
    for _ in range(n):
        req = decode_request(
            json.dumps({"parameters": {"entity_id": entity(rng.randrange(rows // 2))}}).encode(), allow_no_inputs=True
        )
        t0 = time.perf_counter()
        first.first(model, req)
        times.append(time.perf_counter() - t0)
    return {"first_hit": percentiles(times)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000, help="assets cached (default 100k; half of them scored)")
    ap.add_argument("--requests", type=int, default=5_000, help="timed requests per mode")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="precomputed-bench-"))
    res: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs; Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, numpy {np.__version__}"
    }
    try:
        server, cache, values, res["setup"] = agent_state(work, args.rows)
        res["in_process"] = in_process(PrecomputedFirst(cache), server, args.rows, 20_000)
        with ApiServer(create_app(server, features=cache)) as srv:
            res["http"] = run(srv.port, args.rows, values, args.requests, max(10, args.requests // 10), ROUNDS)
        server.stop()
        cache.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    report(res, args, "python bench/precomputed_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


LABELS = {
    "precomputed": "precomputed: `entity_id` only, answered from `maintenance_scores`",
    "live_joined": "live: `entity_id` + `live`, `asset_features` joined, interpreter runs",
    "live_explicit": "live: both inputs in the body, interpreter runs",
    "miss_live": "precomputed miss → live (unscored asset, `entity_id` + `live`)",
}


def report(res: dict[str, Any], args: argparse.Namespace, cmd: str) -> None:
    """The markdown table for docs/benchmarks.md."""
    h, fh = res["http"], res["in_process"]["first_hit"]
    base = h["precomputed"]["p50_us"]
    lines = [
        f"\n{args.rows:,} assets cached ({args.rows // 2:,} with scores). {res['machine']}.\n",
        "| maintenance over HTTP, 1 connection | p50 | p99 | mean | p50 / precomputed p50 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {label} | {h[m]['p50_us']:.0f} µs | {h[m]['p99_us']:.0f} µs | {h[m]['mean_us']:.0f} µs | "
        f"{h[m]['p50_us'] / base:.2f}× |"
        for m, label in LABELS.items()
    ]
    lines += [
        f"\nIn-process `PrecomputedFirst.first` (a hit, no HTTP): p50 {fh['p50_us']:.1f} µs, p99 {fh['p99_us']:.1f} µs.",
        f"{h['precomputed']['n']:,} requests per mode in {ROUNDS} rounds (after {max(10, args.requests // 10)} untimed); precomputed answer == live answer: "
        f"{h['same_answer']}; an unscored asset answered by: {h['miss_source']}.",
        f"Reproduce: `{cmd.strip()}`",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
