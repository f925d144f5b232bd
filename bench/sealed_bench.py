"""Encrypted (sealed) models vs plain ones: seal, open, load, predict, memory (issue #14 section 5).

    .venv/bin/python bench/sealed_bench.py [--rounds 7]

For digits (models/digits/1) and the int8 MobileNetV2 (bench/out/mobilenet_v2_int8.tflite, built by
bench/make_mobilenet.py), one run measures, alternating plain and sealed, ``--rounds`` times each:

- ``seal``: the cloud's ``seal_version_dir`` (AES-256-GCM + X25519 key wrap + manifest);
- ``load``: what the model server does on a swap, ``ModelStore.load`` (plain: the interpreter maps
  the file; sealed: unwrap, decrypt into memory, ``Interpreter(model_content=...)``), pool of 1;
- ``open``: the decryption alone (``model_source``);
- ``predict p50``: 300 single-sample calls on the loaded model.

Memory is not measured here: in one process the allocator reuses the previous round's buffers, so
VmRSS deltas were noise (0.0-3.8 MB). By construction a sealed model holds its plaintext as
anonymous memory (model size, per process) where a plain one maps its file (evictable page cache).

Prints a markdown table and the command.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from make_mobilenet import bench_models  # noqa: E402  (bench/ is on sys.path: run as a script)

from edge_agent.inference.bench import latency_stats  # noqa: E402
from edge_agent.inference.runtime import RuntimeOptions  # noqa: E402
from edge_agent.models import sealed  # noqa: E402
from edge_agent.models.store import ModelStore  # noqa: E402

OPTIONS = RuntimeOptions(num_threads=1, pool_size=1)


def one(store: ModelStore, name: str, calls: int) -> tuple[float, float]:
    """(load s, predict p50 ms) for the store's version 1 of ``name``."""
    gc.collect()
    t0 = time.perf_counter()
    model = store.load(name, "1", OPTIONS)
    load_s = time.perf_counter() - t0
    sample = model.example_inputs(batch=1, seed=3)
    model.predict(sample)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        model.predict(sample)
        times.append(time.perf_counter() - t)
    del model
    return load_s, latency_stats(times)["p50_ms"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sealed-bench-"))
    key_path, pub_path = sealed.generate_fleet_key(work / "keys")
    pub = sealed.load_fleet_pub(pub_path)
    models = bench_models(work / "registry")
    rows = []
    try:
        for label, vdir in models.items():
            name = vdir.parent.name
            plain_store = ModelStore(work / f"plain-{label}")
            plain_store.install_dir(vdir, verify=False)
            sealed_store = ModelStore(work / f"sealed-{label}", fleet_key=key_path)
            seal_s: list[float] = []
            for i in range(args.rounds):
                t0 = time.perf_counter()
                sealed.seal_version_dir(vdir, work / f"s-{label}-{i}", pub)
                seal_s.append(time.perf_counter() - t0)
            sealed_store.install_dir(work / f"s-{label}-0", verify=False)
            vd = sealed_store.version_dir(name, "1")
            manifest = sealed_store.manifest(name, "1")
            res: dict[str, list[tuple[float, float]]] = {"plain": [], "sealed": []}
            opens = []
            for _ in range(args.rounds):  # alternating, so drift hits both alike
                res["plain"].append(one(plain_store, name, args.calls))
                res["sealed"].append(one(sealed_store, name, args.calls))
                t0 = time.perf_counter()
                sealed_store.open_source(vd, manifest)
                opens.append(time.perf_counter() - t0)
            size = manifest.size

            def med(kind: str, i: int, res: dict[str, list[tuple[float, float]]] = res) -> float:
                return statistics.median(r[i] for r in res[kind])

            rows.append(
                f"| {label} | {size / 1e6:.2f} | {statistics.median(seal_s) * 1e3:.1f} "
                f"| {statistics.median(opens) * 1e3:.2f} "
                f"| {med('plain', 0) * 1e3:.1f} | {med('sealed', 0) * 1e3:.1f} "
                f"| {med('plain', 1):.4f} | {med('sealed', 1):.4f} |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| model | MB | seal ms | open ms | load plain ms | load sealed ms | p50 plain ms | p50 sealed ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    print(f"\n    .venv/bin/python bench/sealed_bench.py --rounds {args.rounds} --calls {args.calls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
