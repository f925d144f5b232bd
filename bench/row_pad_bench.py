"""One row against two on this CPU: the raw interpreter per batch size, and the agent's ``predict`` with
and without ``row_pad``, side by side in one run.

    .venv/bin/python bench/row_pad_bench.py            # digits and maintenance, 5 rounds: ~20 s

Per round, for each shipped model, two ``LoadedModel``s (``num_threads=1``): one as ``warmup`` left
it (its ``row_pad`` is printed) and one never warmed up (``row_pad = 1``), each through
``edge_agent.inference.bench.bench_in_process`` (a bare interpreter on the same inputs, already in
the native type, interleaved with the agent's ``predict``) at one row; then the bare interpreter alone
at 2 and 4 rows. p50s, median over rounds.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_agent.inference.bench import bench_in_process  # noqa: E402
from edge_agent.inference.interpreter import default_backend  # noqa: E402
from edge_agent.inference.runtime import LoadedModel, RuntimeOptions  # noqa: E402
from edge_agent.wire.model.manifest import MANIFEST_FILE, Manifest  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--models", default="digits,maintenance")
    args = ap.parse_args(argv)
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "?")
    flags = next((ln for ln in info if ln.startswith("flags")), "")
    avx = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    print(f"# {platform.machine()} ({cpu}, {avx}), {default_backend().name}, python {platform.python_version()}")
    print(
        "| model | raw 1 row µs | raw 2 rows µs | raw 4 rows µs | row_pad chosen | predict, 1 row as chosen µs "
        "| predict, row_pad = 1 µs |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models.split(","):
        d = REPO / "models" / name / "1"
        path, manifest = d / "model.tflite", Manifest.load(d / MANIFEST_FILE)
        rows: dict[str, list[float]] = {k: [] for k in ("r1", "r2", "r4", "chosen", "one")}
        pads = []
        for _ in range(args.rounds):
            chosen = LoadedModel(path, manifest, RuntimeOptions(num_threads=1))
            chosen.warmup()
            pads.append(chosen.row_pad)
            one = LoadedModel(path, manifest, RuntimeOptions(num_threads=1))  # row_pad stays 1: no warmup
            plain = bench_in_process(one, args.calls, rounds=2)
            padded = bench_in_process(chosen, args.calls, rounds=2)
            rows["r1"].append(plain["raw"]["p50_ms"] * 1e3)
            rows["one"].append(plain["agent"]["p50_ms"] * 1e3)
            rows["chosen"].append(padded["agent"]["p50_ms"] * 1e3)
            for b in (2, 4):
                rows[f"r{b}"].append(bench_in_process(one, args.calls // 2, rounds=1, batch=b)["raw"]["p50_ms"] * 1e3)
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(
            f"| {name} | {med['r1']:.1f} | {med['r2']:.1f} | {med['r4']:.1f} | {'/'.join(map(str, sorted(set(pads))))} "
            f"| {med['chosen']:.1f} | {med['one']:.1f} |"
        )
    print(f"\nReproduce: `.venv/bin/python bench/row_pad_bench.py --rounds {args.rounds} --calls {args.calls}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
