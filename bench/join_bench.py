"""Request-time feature join through the HTTP API: latency with ``--rows`` entities cached.

Two ways to ask the shipped ``maintenance`` model for one asset, measured side by side in one run
(interleaved in rounds, so drift hits both alike), through the real V2 API on uvicorn (httptools)
in this process, over one keep-alive HTTP connection, one request at a time:

* **joined**: ``{"parameters": {"entity_id": "asset-0123456"}, "inputs": [live]}``: the agent reads
  the asset's 18 ``asset_features`` from the SQLite feature cache and reorders them into the
  model's input (``edge_agent.features.join``);
* **explicit**: both inputs in the body (the client already holds the features).

Each request picks a random asset among ``--rows`` (uniform: the B-tree is probed all over).
Also reported, in-process: ``FeatureCache.get`` alone and ``Joiner.fill`` alone (no HTTP).

Run (prints a markdown table and the command that reproduces it)::

    .venv/bin/python bench/join_bench.py --rows 1000000 --requests 20000
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


from edge_agent.features.cache import DB_FILE, FeatureCache  # noqa: E402
from edge_agent.features.join import Joiner  # noqa: E402
from edge_agent.http.app import create_app  # noqa: E402
from edge_agent.models.serving import ModelServer  # noqa: E402
from edge_agent.models.store import ModelStore  # noqa: E402
from edge_agent.wire.bundle import write_bundle  # noqa: E402
from edge_agent.wire.kserve_v2 import decode_request  # noqa: E402
from tests.apiserver import ApiServer  # noqa: E402

MAINT = REPO / "models" / "maintenance" / "1"
SET = "asset_features"


def make_cache(work: Path, rows: int, names: list[str]) -> tuple[FeatureCache, np.ndarray, dict[str, float]]:
    """``rows`` assets × the model's 18 features (realistic magnitudes: the golden rows, jittered), applied."""
    rng = np.random.default_rng(0)
    with np.load(MAINT / "golden.npz") as g:
        base = g["in:asset_features"]
    values = (base[rng.integers(0, len(base), rows)] * rng.uniform(0.9, 1.1, (rows, len(names)))).astype(np.float32)
    entities = np.char.add("asset-", np.char.zfill(np.arange(rows).astype(str), 7))
    now = time.time()
    timings = {}
    t = time.perf_counter()
    order = names[::-1]  # the set's column order differs from the model's: the join reorders every row
    write_bundle(
        work / "bundle",
        SET,
        "1",
        "snapshot",
        entities,
        now - rng.uniform(0, 3600, rows),
        values[:, ::-1],
        order,
        ttl_s=86400,
    )
    timings["bundle_write_s"] = time.perf_counter() - t
    cache = FeatureCache(work / "data" / DB_FILE)
    t = time.perf_counter()
    cache.apply(work / "bundle")
    timings["apply_s"] = time.perf_counter() - t
    timings["db_mb"] = sum(f.stat().st_size for f in (work / "data").glob(DB_FILE + "*")) / 1e6  # + WAL
    return cache, values, timings


def bodies(i: int, live: np.ndarray, values: np.ndarray) -> dict[str, bytes]:
    entity = f"asset-{i:07d}"
    live_t = {"name": "live", "shape": [1, 4], "datatype": "FP32", "data": live.tolist()}
    feats = {"name": "asset_features", "shape": [1, 18], "datatype": "FP32", "data": values[i].tolist()}
    return {
        "joined": json.dumps({"parameters": {"entity_id": entity}, "inputs": [live_t]}).encode(),
        "explicit": json.dumps({"inputs": [live_t, feats]}).encode(),
    }


def percentiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1e6
    return {
        "p50_us": float(np.percentile(a, 50)),
        "p99_us": float(np.percentile(a, 99)),
        "mean_us": float(a.mean()),
        "n": len(xs),
    }


def run(port: int, rows: int, values: np.ndarray, requests: int, warmup: int, rounds: int) -> dict[str, Any]:
    rng = random.Random(1)
    live = np.asarray([70.0, 3.5, 6.0, 1800.0], np.float32)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    lat: dict[str, list[float]] = {"joined": [], "explicit": []}
    sizes: dict[str, int] = {}

    def one(body: bytes) -> float:
        t0 = time.perf_counter()
        conn.request("POST", "/v2/models/maintenance/infer", body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        dt = time.perf_counter() - t0
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:300]!r}")
        return dt

    for _ in range(warmup):
        for body in bodies(rng.randrange(rows), live, values).values():
            one(body)
    per_round = max(1, requests // rounds)
    for r in range(rounds):
        modes = ["joined", "explicit"] if r % 2 == 0 else ["explicit", "joined"]
        for mode in modes:
            for _ in range(per_round):
                b = bodies(rng.randrange(rows), live, values)[mode]
                sizes[mode] = len(b)
                lat[mode].append(one(b))
    conn.close()
    out = {mode: {**percentiles(xs), "body_bytes": sizes[mode]} for mode, xs in lat.items()}
    # Same answer both ways (a spot check, outside the timing).
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    i = rng.randrange(rows)
    answers = []
    for body in bodies(i, live, values).values():
        conn.request("POST", "/v2/models/maintenance/infer", body=body, headers=headers)
        answers.append(json.loads(conn.getresponse().read())["outputs"][0]["data"])
    conn.close()
    out["same_answer"] = answers[0] == answers[1]
    return out


def in_process(cache: FeatureCache, server: ModelServer, rows: int, n: int) -> dict[str, Any]:
    rng = random.Random(2)
    model = server.get("maintenance")
    joiner = Joiner(model.manifest, cache)
    body = json.dumps(
        {
            "parameters": {"entity_id": "asset-0000000"},
            "inputs": [{"name": "live", "shape": [1, 4], "datatype": "FP32", "data": [70.0, 3.5, 6.0, 1800.0]}],
        }
    ).encode()
    get, fill = [], []
    for _ in range(n):
        e = f"asset-{rng.randrange(rows):07d}"
        t0 = time.perf_counter()
        cache.get(SET, e)
        get.append(time.perf_counter() - t0)
        req = decode_request(body)
        req.parameters["entity_id"] = e
        t0 = time.perf_counter()
        joiner.fill(req)
        fill.append(time.perf_counter() - t0)
    return {"cache_get": percentiles(get), "joiner_fill": percentiles(fill)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="assets cached (default 1M)")
    ap.add_argument("--requests", type=int, default=20_000, help="timed requests per mode")
    ap.add_argument("--warmup", type=int, default=2_000, help="untimed request pairs first")
    ap.add_argument("--rounds", type=int, default=10, help="alternate the modes this many times")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="join-bench-", dir=args.work))
    machine = (
        f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, numpy {np.__version__}"
    )
    res: dict[str, Any] = {"machine": machine}
    try:
        store = ModelStore(work / "data")
        store.install_dir(MAINT)
        server = ModelServer(store)
        server.sync()
        names = list(store.manifest("maintenance", "1").feature_joins["asset_features"].features)
        cache, values, res["setup"] = make_cache(work, args.rows, names)
        res["in_process"] = in_process(cache, server, args.rows, 20_000)
        with ApiServer(create_app(server, features=cache)) as srv:
            res["http"] = run(srv.port, args.rows, values, args.requests, args.warmup, args.rounds)
        cache.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    h, p = res["http"], res["in_process"]
    cmd = "python bench/join_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(
        f"\n{args.rows:,} assets × 18 features cached (SQLite {res['setup']['db_mb']:.0f} MB; bundle written in "
        f"{res['setup']['bundle_write_s']:.1f} s, applied in {res['setup']['apply_s']:.1f} s). {res['machine']}.\n"
    )
    print("| maintenance infer over HTTP, 1 connection | body | p50 | p99 | mean |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for mode, label in (
        ("joined", "`entity_id` + `live` (joined from the cache)"),
        ("explicit", "`live` + `asset_features` in the body"),
    ):
        r = h[mode]
        print(
            f"| {label} | {r['body_bytes']} B | {r['p50_us']:.0f} µs | {r['p99_us']:.0f} µs | {r['mean_us']:.0f} µs |"
        )
    print(
        f"| difference (joined − explicit) | | {h['joined']['p50_us'] - h['explicit']['p50_us']:+.0f} µs | "
        f"{h['joined']['p99_us'] - h['explicit']['p99_us']:+.0f} µs | "
        f"{h['joined']['mean_us'] - h['explicit']['mean_us']:+.0f} µs |"
    )
    print("\n| in-process, no HTTP | p50 | p99 |")
    print("| --- | ---: | ---: |")
    for key, label in (
        ("cache_get", "`FeatureCache.get` (one random asset)"),
        ("joiner_fill", "`Joiner.fill` (lookup + reorder 18 columns + parameters)"),
    ):
        print(f"| {label} | {p[key]['p50_us']:.1f} µs | {p[key]['p99_us']:.1f} µs |")
    print(
        f"\n{h['joined']['n']:,} requests per mode, interleaved in {args.rounds} rounds; same answer both ways: "
        f"{h['same_answer']}.\nReproduce: `{cmd.strip()}`"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
