"""One row against two on this CPU: the raw interpreter per batch size, and the agent's ``predict`` with
and without ``row_pad``, side by side in one run.

    .venv/bin/python bench/row_pad_bench.py            # digits and maintenance, 5 rounds: ~20 s

Per round, for each shipped model: a bare interpreter (``num_threads=1``, inputs already in the
native type) timed at 1, 2 and 4 rows; then two ``LoadedModel``s, one as ``warmup`` left it (its
``row_pad`` is printed) and one forced to ``row_pad = 1``, timed alternately on the same one-row
inputs. Medians over rounds of each round's median.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_agent.inference.interpreter import default_backend  # noqa: E402
from edge_agent.inference.runtime import LoadedModel, RuntimeOptions  # noqa: E402
from edge_agent.wire.model.manifest import MANIFEST_FILE, Manifest  # noqa: E402


def median_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def raw_us(path: Path, batch: int, calls: int) -> float:
    """A bare interpreter's set_tensor + invoke at ``batch`` rows of zeros."""
    it = default_backend().interpreter(model_path=str(path), num_threads=1)
    ins = it.get_input_details()
    for d in ins:
        it.resize_tensor_input(d["index"], [batch, *d["shape"][1:]])
    it.allocate_tensors()
    xs = [(d["index"], np.zeros([batch, *d["shape"][1:]], d["dtype"])) for d in ins]

    def call() -> None:
        for idx, x in xs:
            it.set_tensor(idx, x)
        it.invoke()

    return median_us(call, calls)


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
            for b in (1, 2, 4):
                rows[f"r{b}"].append(raw_us(path, b, args.calls))
            chosen = LoadedModel(path, manifest, RuntimeOptions(num_threads=1))
            chosen.warmup()
            pads.append(chosen.row_pad)
            one = LoadedModel(path, manifest, RuntimeOptions(num_threads=1))
            x = chosen.example_inputs(1, seed=1)
            for model, key in ((chosen, "chosen"), (one, "one"), (one, "one"), (chosen, "chosen")):
                rows[key].append(median_us(lambda m=model, x=x: m.predict(x), args.calls // 2))
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(
            f"| {name} | {med['r1']:.1f} | {med['r2']:.1f} | {med['r4']:.1f} | {'/'.join(map(str, sorted(set(pads))))} "
            f"| {med['chosen']:.1f} | {med['one']:.1f} |"
        )
    print(f"\nReproduce: `.venv/bin/python bench/row_pad_bench.py --rounds {args.rounds} --calls {args.calls}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
