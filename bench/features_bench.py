"""Feature cache benchmark, side by side in one run.

1. Single-entity lookup latency (p50/p99) with ``--rows`` entities cached, in-process through
   ``FeatureCache.get`` — next to the raw sqlite3 primary-key probe it is built on (the floor).
2. Snapshot apply throughput (rows/s) next to a raw ``executemany`` of the same rows into the same
   schema in one transaction, with the same connection settings; also: replacing a full set,
   ``synchronous=NORMAL`` vs ``FULL``, and the rejected alternative (build a new table, rename it over).
3. Feast's SQLite online store on the same data: ``write_to_online_store`` and
   ``get_online_features`` for one entity, run by bench/feast_side.py in a separate virtualenv (never a
   project dependency)::

       python3 -m venv /tmp/feastvenv && /tmp/feastvenv/bin/pip install feast

The data: ``--rows`` assets (``asset-0000000`` …) × the maintenance model's 18 ``asset_features``
(float32, as ``cloud_batch.train.maintenance.features`` produces them), event times within the last hour.

Run (prints a markdown table and the command that reproduces it)::

    .venv/bin/python bench/features_bench.py --rows 1000000 --feast-python /tmp/feastvenv/bin/python
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_agent.features.cache import FeatureCache  # noqa: E402
from edge_agent.wire.bundle import Bundle, read_bundle, write_bundle  # noqa: E402

DDL = (
    'CREATE TABLE "{0}" (entity TEXT PRIMARY KEY NOT NULL, event_ts REAL NOT NULL, version TEXT NOT NULL, '
    "vals BLOB NOT NULL) WITHOUT ROWID"
)

FEAST_SIDE = Path(__file__).with_name("feast_side.py")  # run in the feast venv, from the scratch dir


# -- data ---------------------------------------------------------------------------------
def feature_names() -> list[str]:
    manifest = json.loads((REPO / "models" / "maintenance" / "1" / "manifest.json").read_text())
    return list(manifest["feature_names"]["asset_features"])


def make_data(n: int, names: list[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    entities = np.array([f"asset-{i:07d}" for i in range(n)])
    event_ts = time.time() - rng.uniform(0, 3600, n)
    values = rng.normal(50.0, 10.0, (n, len(names))).astype(np.float32)
    return entities, event_ts, values


def pct(samples_ns: list[int] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(samples_ns) / 1000.0, q))


# -- apply ----------------------------------------------------------------------------------
def raw_connection(path: Path, synchronous: str) -> sqlite3.Connection:
    """A connection set up exactly like FeatureCache's writer."""
    conn = sqlite3.connect(path, isolation_level=None, cached_statements=256)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA journal_size_limit=67108864")
    conn.execute(f"PRAGMA mmap_size={256 << 20}")
    conn.execute("PRAGMA cache_size=-16384")
    return conn


def rows_of(b: Bundle):
    """The same (entity, event_ts, version, packed values) tuples the cache inserts, built the obvious way."""
    blobs = b.values.view(np.dtype((np.void, b.values.shape[1] * b.values.dtype.itemsize))).ravel().tolist()
    return zip(b.entities.tolist(), b.event_ts.tolist(), itertools.repeat(b.info.version), blobs)


def raw_executemany(path: Path, b: Bundle, synchronous: str) -> float:
    conn = raw_connection(path, synchronous)
    t = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(DDL.format("fs_raw"))
    conn.executemany('INSERT INTO "fs_raw" VALUES (?, ?, ?, ?)', rows_of(b))
    conn.execute("COMMIT")
    dt = time.perf_counter() - t
    conn.close()
    return dt


def raw_rename_swap(path: Path, b: Bundle, synchronous: str) -> float:
    """The alternative snapshot strategy: build a new table, drop the old one, rename — one transaction."""
    conn = raw_connection(path, synchronous)
    conn.execute(DDL.format("fs_raw"))
    conn.execute("BEGIN")
    conn.executemany('INSERT INTO "fs_raw" VALUES (?, ?, ?, ?)', rows_of(b))
    conn.execute("COMMIT")
    t = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(DDL.format("fs_raw_build"))
    conn.executemany('INSERT INTO "fs_raw_build" VALUES (?, ?, ?, ?)', rows_of(b))
    conn.execute('DROP TABLE "fs_raw"')
    conn.execute('ALTER TABLE "fs_raw_build" RENAME TO "fs_raw"')
    conn.execute("COMMIT")
    dt = time.perf_counter() - t
    conn.close()
    return dt


def bench_apply(work: Path, b1: Bundle, b2: Bundle, reps: int) -> dict[str, Any]:
    n = len(b1.entities)
    raw, onto_empty, replace = [], [], []
    for rep in range(reps):  # interleaved, so drift in disk/cache state hits both sides alike
        for p in work.glob("apply-*"):
            p.unlink()
        raw.append(raw_executemany(work / f"apply-raw-{rep}.db", b1, "FULL"))
        with FeatureCache(work / f"apply-cache-{rep}.db", synchronous="FULL") as cache:
            onto_empty.append(cache.apply(b1).seconds)
            replace.append(cache.apply(b2).seconds)
    for p in work.glob("apply-*"):
        p.unlink()
    with FeatureCache(work / "apply-normal.db", synchronous="NORMAL") as cache:
        normal_empty = cache.apply(b1).seconds
        normal_replace = cache.apply(b2).seconds
    swap = raw_rename_swap(work / "apply-swap.db", b2, "FULL")
    for p in work.glob("apply-*"):
        p.unlink()
    med = statistics.median
    return {
        "rows": n,
        "reps": reps,
        "raw_executemany_s": med(raw),
        "apply_onto_empty_s": med(onto_empty),
        "apply_replace_s": med(replace),
        "apply_normal_onto_empty_s": normal_empty,
        "apply_normal_replace_s": normal_replace,
        "raw_rename_swap_replace_s": swap,
        "ratio_onto_empty": med(raw) / med(onto_empty),
        "ratio_replace": med(raw) / med(replace),
        "all": {"raw": raw, "onto_empty": onto_empty, "replace": replace},
    }


# -- lookups ----------------------------------------------------------------------------------
def bench_lookup(cache: FeatureCache, set_name: str, entities: np.ndarray, n: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    keys = entities[rng.integers(0, len(entities), n)].tolist()
    get = cache.get
    for k in keys[:20000]:  # warm the statement cache, the metadata cache and the page cache
        get(set_name, k)
    pc = time.perf_counter_ns
    lat = []
    append = lat.append
    misses = 0
    for k in keys:
        t0 = pc()
        row = get(set_name, k)
        append(pc() - t0)
        if row is None:
            misses += 1
    # The floor: the same probe on a plain sqlite3 connection, no decoding, no row object.
    conn = sqlite3.connect(cache.path, isolation_level=None)
    conn.execute(f"PRAGMA mmap_size={256 << 20}")
    conn.execute("PRAGMA cache_size=-16384")
    sql = f'SELECT event_ts, version, vals FROM "fs_{set_name}" WHERE entity = ?'
    ex = conn.execute
    for k in keys[:20000]:
        ex(sql, (k,)).fetchone()
    floor = []
    for k in keys:
        t0 = pc()
        ex(sql, (k,)).fetchone()
        floor.append(pc() - t0)
    conn.close()
    batch = []
    for i in range(0, min(len(keys), 32 * 5000), 32):
        chunk = keys[i : i + 32]
        t0 = pc()
        cache.get_many(set_name, chunk)
        batch.append(pc() - t0)
    return {
        "lookups": n,
        "misses": misses,
        "get_p50_us": pct(lat, 50),
        "get_p99_us": pct(lat, 99),
        "get_mean_us": float(np.mean(lat)) / 1000,
        "raw_p50_us": pct(floor, 50),
        "raw_p99_us": pct(floor, 99),
        "get_many32_p50_us": pct(batch, 50),
        "get_many32_per_entity_us": pct(batch, 50) / 32,
    }


# -- feast ------------------------------------------------------------------------------------
def bench_feast(
    python: str,
    work: Path,
    entities: np.ndarray,
    event_ts: np.ndarray,
    values: np.ndarray,
    names: list[str],
    lookups: int,
    rows: int | None,
) -> dict[str, Any]:
    if not Path(python).is_file():
        return {
            "error": f"{python} not found; install with: python3 -m venv /tmp/feastvenv && "
            "/tmp/feastvenv/bin/pip install feast"
        }
    n = len(entities) if rows is None else min(rows, len(entities))
    rng = np.random.default_rng(1)
    keys = entities[:n][rng.integers(0, n, lookups)]
    data = work / "feast-data.npz"
    np.savez(data, entities=entities[:n], event_ts=event_ts[:n], values=values[:n], names=np.array(names), keys=keys)
    script = work / "feast_part.py"
    shutil.copyfile(FEAST_SIDE, script)
    t = time.perf_counter()
    proc = subprocess.run(
        [python, str(script), str(data), str(work / "feast"), str(len(keys)), "86400"],
        capture_output=True,
        text=True,
        timeout=3 * 3600,
    )
    wall = time.perf_counter() - t
    shutil.rmtree(work / "feast", ignore_errors=True)
    if proc.returncode != 0:
        return {"error": f"feast run failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"}
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"feast printed no JSON: {proc.stdout[-1000:]} {proc.stderr[-1000:]}"}
    out["wall_s"] = wall
    return out


# -- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="entities cached (default 1M)")
    ap.add_argument("--lookups", type=int, default=200_000, help="timed single-entity lookups")
    ap.add_argument("--reps", type=int, default=3, help="apply repetitions (median)")
    ap.add_argument("--feast-python", default="/tmp/feastvenv/bin/python", help="interpreter of a venv with feast")
    ap.add_argument("--feast-rows", type=int, default=None, help="rows written to Feast (default: all --rows)")
    ap.add_argument("--feast-lookups", type=int, default=5000)
    ap.add_argument("--no-feast", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="features-bench-", dir=args.work))
    res: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, numpy {np.__version__}"
    }
    try:
        names = feature_names()
        entities, event_ts, values = make_data(args.rows, names)
        t = time.perf_counter()
        write_bundle(work / "b1", "maintenance", "1", "snapshot", entities, event_ts, values, names, ttl_s=86400)
        res["bundle_write_s"] = time.perf_counter() - t
        write_bundle(work / "b2", "maintenance", "2", "snapshot", entities, event_ts, values + 1, names, ttl_s=86400)
        res["bundle_mb"] = (work / "b1" / "data.npz").stat().st_size / 1e6
        t = time.perf_counter()
        b1 = read_bundle(work / "b1")
        res["bundle_read_s"] = time.perf_counter() - t
        b2 = read_bundle(work / "b2")

        res["apply"] = bench_apply(work, b1, b2, args.reps)
        cache = FeatureCache(work / "features.db")
        cache.apply(b1)
        cache.apply(b2)
        res["db_mb"] = (work / "features.db").stat().st_size / 1e6
        res["lookup"] = bench_lookup(cache, "maintenance", entities, args.lookups)
        sample_keys = None
        if not args.no_feast:
            res["feast"] = bench_feast(
                args.feast_python, work, entities, event_ts, values, names, args.feast_lookups, args.feast_rows
            )
            sample_keys = res["feast"].get("sample")
        if sample_keys:  # the two stores must agree on the values
            for k, vals in sample_keys.items():
                ours = cache.get("maintenance", k)
                theirs = np.asarray(vals, dtype=np.float32) + 1  # Feast holds version 1 values; the cache version 2
                res.setdefault("feast_agrees", True)
                if ours is None or not np.allclose(ours.values, theirs):
                    res["feast_agrees"] = False
        cache.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
    print(report(res, argv if argv is not None else sys.argv[1:]))
    return 0


def report(res: dict[str, Any], argv: list[str]) -> str:
    a, lk, fe = res["apply"], res["lookup"], res.get("feast", {})
    n = a["rows"]
    lines = [
        f"## Feature cache: {n:,} entities × 18 float32 features ({res['machine']})",
        "",
        "| measurement | edgefleet FeatureCache | baseline | ratio | target |",
        "| --- | --- | --- | --- | --- |",
        f"| single-entity lookup p50 (in-process `get`) | {lk['get_p50_us']:.1f} µs | raw sqlite3 probe {lk['raw_p50_us']:.1f} µs "
        f"| +{lk['get_p50_us'] - lk['raw_p50_us']:.1f} µs | ≤ 15 µs {'✅' if lk['get_p50_us'] <= 15 else '❌'} |",
        f"| single-entity lookup p99 | {lk['get_p99_us']:.1f} µs | raw sqlite3 probe {lk['raw_p99_us']:.1f} µs | | |",
        f"| `get_many` of 32 (one read transaction), p50 | {lk['get_many32_p50_us']:.0f} µs "
        f"({lk['get_many32_per_entity_us']:.1f} µs/entity) | | | |",
    ]
    if "error" not in fe and fe:
        speedup = fe["p50_us"] / lk["get_p50_us"]
        lines += [
            f"| lookup p50 vs Feast {fe['feast_version']} SQLite online store ({fe['rows']:,} rows) | "
            f"{lk['get_p50_us']:.1f} µs | Feast `get_online_features` {fe['p50_us']:.0f} µs (p99 {fe['p99_us']:.0f}) | "
            f"{speedup:.0f}× faster | ≥ 20× {'✅' if speedup >= 20 else '❌'} |",
            f"| load rate: snapshot apply vs Feast `write_to_online_store` | {n / a['apply_onto_empty_s']:,.0f} rows/s | "
            f"{fe['write_rows_per_s']:,.0f} rows/s | {n / a['apply_onto_empty_s'] / fe['write_rows_per_s']:.0f}× | |",
            f"| on-disk size | {res['db_mb']:.0f} MB | Feast {fe['db_bytes'] / 1e6:,.0f} MB (one row per feature) | | |",
        ]
    else:
        lines.append(f"| vs Feast | – | {fe.get('error', 'skipped (--no-feast)')} | | ≥ 20× |")
    lines += [
        f"| snapshot apply onto an empty cache (synchronous=FULL) | {n / a['apply_onto_empty_s']:,.0f} rows/s "
        f"({a['apply_onto_empty_s']:.2f} s) | raw `executemany`, one txn: {n / a['raw_executemany_s']:,.0f} rows/s "
        f"({a['raw_executemany_s']:.2f} s) | {a['ratio_onto_empty']:.2f}× | ≥ 0.8× {'✅' if a['ratio_onto_empty'] >= 0.8 else '❌'} |",
        f"| snapshot apply replacing {n:,} rows (FULL) | {n / a['apply_replace_s']:,.0f} rows/s ({a['apply_replace_s']:.2f} s) "
        f"| same raw `executemany` (empty table) | {a['ratio_replace']:.2f}× | ≥ 0.8× {'✅' if a['ratio_replace'] >= 0.8 else '❌'} |",
        f"| same two applies with synchronous=NORMAL | {a['apply_normal_onto_empty_s']:.2f} s / {a['apply_normal_replace_s']:.2f} s "
        f"| FULL: {a['apply_onto_empty_s']:.2f} s / {a['apply_replace_s']:.2f} s | | |",
        f"| rejected alternative: build new table + rename (replace) | – | {a['raw_rename_swap_replace_s']:.2f} s "
        f"vs delete+insert {a['apply_replace_s']:.2f} s | | |",
        f"| bundle: write (compressed npz) / read+validate+sha256 | {res['bundle_write_s']:.2f} s / {res['bundle_read_s']:.2f} s "
        f"| {res['bundle_mb']:.0f} MB | | |",
        "",
        f"Apply: median of {a['reps']} interleaved runs; lookups: {lk['lookups']:,} uniformly random keys "
        f"({lk['misses']} misses), timed one by one with `perf_counter_ns`."
        + (f" Feast values agree with the cache: {res.get('feast_agrees')}." if "feast_agrees" in res else ""),
        "",
        "Reproduce:",
        "",
        "```",
        "python3 -m venv /tmp/feastvenv && /tmp/feastvenv/bin/pip install feast   # Feast stays out of the project venv",
        ".venv/bin/python bench/features_bench.py " + " ".join(argv),
        "```",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
