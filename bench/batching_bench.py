"""Dynamic batching on vs off (#13 section 4), and the agent's p50 at c=1 before vs after the change.

    .venv/bin/python bench/make_mobilenet.py            # once: bench/out/mobilenet_v2_int8.tflite
    .venv/bin/python bench/batching_bench.py [--quick] [--rounds 2]

Three real `edge-agent run` processes over one data dir (shipped digits + MobileNetV2-int8), one at a
time, in alternating order each round so they share the machine's noise:

* ``off``  - this code, no ``[models.*.batching]``;
* ``on``   - this code, ``[models.mobilenet.batching]`` max_batch_size 8, max_queue_delay_us 2000 and
  ``[models.digits.batching]`` max_batch_size 16, max_queue_delay_us 100;
* ``HEAD`` - the committed code (``git archive HEAD``), batching off, digits only: the c=1
  regression check (it compares against the whole working tree, other in-progress work included).

Each runs tritonclient.http (binary tensors, FP32, batch 1 per request, one synchronous client per
thread) at concurrency 1, 8 and 16 on both models; the mean batch comes from the statistics extension
(inference_count / execution_count over the run). A row is the median over rounds. Markdown on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gitcode import tree_at, tree_env  # noqa: E402
from bench.run import free_port, http_bench, mobilenet_path, start_agent  # noqa: E402
from edge_agent.inference.bench import bench_in_process  # noqa: E402
from edge_agent.inference.runtime import RuntimeOptions  # noqa: E402
from edge_agent.models.serving import ModelServer  # noqa: E402
from edge_agent.models.store import ModelStore  # noqa: E402

BATCHING_ON = {
    "EDGEFLEET_MODELS__MOBILENET__BATCHING__MAX_BATCH_SIZE": "8",
    "EDGEFLEET_MODELS__MOBILENET__BATCHING__MAX_QUEUE_DELAY_US": "2000",
    "EDGEFLEET_MODELS__DIGITS__BATCHING__MAX_BATCH_SIZE": "16",
    "EDGEFLEET_MODELS__DIGITS__BATCHING__MAX_QUEUE_DELAY_US": "100",
}
DELAY_US = {"mobilenet": 2000, "digits": 100}


def mode_env(mode: str, head: Path) -> dict[str, str]:
    """The agent's extra environment for ``mode``."""
    if mode == "on":
        return BATCHING_ON
    if mode == "HEAD":
        return tree_env(head)
    return {}


def counts(port: int, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) from the statistics extension; zeros on HEAD (no extension)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{model}/stats", timeout=10) as r:
            s = json.loads(r.read())["model_stats"][0]
            return int(s["inference_count"]), int(s["execution_count"])
    except OSError:
        return 0, 0


def run_mode(data_dir: Path, mode: str, head: Path, inputs: dict[str, np.ndarray], n: dict[str, int]) -> dict[str, Any]:
    port = free_port()
    agent = start_agent(data_dir, port, mode_env(mode, head))
    out: dict[str, Any] = {}
    try:
        for model, x in inputs.items():
            if mode == "HEAD" and model != "digits":
                continue  # HEAD is the c=1 regression check on digits only
            for conc in (1, 8, 16):
                before = counts(port, model)
                r = http_bench(port, model, x, True, max(n[model] * max(1, conc // 4), 40), conc)
                after = counts(port, model)
                execs = after[1] - before[1]
                r["mean_batch"] = (after[0] - before[0]) / execs if execs else None
                out[f"{model}/{conc}"] = r
                print(mode, model, conc, f"p50 {r['p50_ms']:.3f} ms", f"{r['throughput_per_s']:,.0f}/s", r["mean_batch"], file=sys.stderr, flush=True)  # fmt: skip
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
    return out


def invoke_per_row(store: ModelStore, quick: bool) -> str:
    """In process, one interpreter: the agent's predict p50 per row at batch 1 and 8 (can a batch pay at all?)."""
    server = ModelServer(store, RuntimeOptions(pool_size=1))
    server.sync()
    lines = ["| model | batch | predict p50 ms | per row ms | per row vs batch 1 |", "| --- | --- | --- | --- | --- |"]
    for name, iters in (("mobilenet", 8 if quick else 16), ("digits", 400 if quick else 4000)):
        base = 0.0
        for batch in (1, 8):
            p50 = bench_in_process(server.get(name), iterations=iters, rounds=2, batch=batch)["agent"]["p50_ms"]
            base = base or p50
            lines.append(f"| {name} | {batch} | {p50:.3f} | {p50 / batch:.3f} | {p50 / batch / base:.2f}× |")
    server.stop()
    return "\n".join(lines)


def median(runs: list[dict[str, Any]], key: str, field: str) -> float:
    vals = [r[key][field] for r in runs if r[key].get(field) is not None]
    return float(statistics.median(vals)) if vals else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--invoke-only", action="store_true", help="only the in-process per-row table")
    args = ap.parse_args()
    scale = 0.2 if args.quick else 1.0
    n = {"digits": int(3000 * scale), "mobilenet": int(60 * scale)}
    work = Path(tempfile.mkdtemp(prefix="edgefleet-batching-"))
    try:
        head, _ = tree_at("HEAD", work)
        store = ModelStore(work / "data")
        store.install_dir(REPO / "models" / "digits" / "1")
        store.install_file(mobilenet_path(), "mobilenet")
        print(invoke_per_row(store, args.quick) + "\n", flush=True)
        if args.invoke_only:
            return 0
        from sklearn.datasets import load_digits

        inputs = {
            "mobilenet": np.random.default_rng(0).uniform(0, 1, (1, 224, 224, 3)).astype(np.float32),
            "digits": load_digits().images[:1].astype(np.float32)[..., None],
        }
        runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": [], "HEAD": []}
        for i in range(args.rounds):
            order = ["off", "on", "HEAD"] if i % 2 == 0 else ["HEAD", "on", "off"]
            for mode in order:
                runs[mode].append(run_mode(work / "data", mode, head, inputs, n))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(runs, args.rounds))
    return 0


def report(runs: dict[str, list[dict[str, Any]]], rounds: int) -> str:
    lines = [
        "| model | c | off p50 ms | on p50 ms | p50 cost | delay | off req/s | on req/s | gain | mean batch (on) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model in ("mobilenet", "digits"):
        for conc in (1, 8, 16):
            key = f"{model}/{conc}"
            p_off, p_on = median(runs["off"], key, "p50_ms"), median(runs["on"], key, "p50_ms")
            t_off, t_on = median(runs["off"], key, "throughput_per_s"), median(runs["on"], key, "throughput_per_s")
            cost = p_on - p_off
            lines.append(
                f"| {model} | {conc} | {p_off:.3f} | {p_on:.3f} | {cost:+.3f} ms"
                f"{' (**over**)' if cost * 1000 > DELAY_US[model] else ''} | {DELAY_US[model]} µs | "
                f"{t_off:,.0f} | {t_on:,.0f} | {t_on / t_off:.2f}× | {median(runs['on'], key, 'mean_batch'):.2f} |"
            )
    p_head, p_now = median(runs["HEAD"], "digits/1", "p50_ms"), median(runs["off"], "digits/1", "p50_ms")
    lines += [
        "",
        f"Agent p50 at c=1 on digits, batching off: this code {p_now:.3f} ms, HEAD {p_head:.3f} ms "
        f"({(p_now / p_head - 1) * 100:+.1f}%); median of {rounds} rounds.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
