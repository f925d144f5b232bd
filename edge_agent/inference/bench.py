"""In-process latency benchmark: the raw TFLite interpreter against the agent's ``predict``.

Both run in one process, interleaved in rounds, so machine noise hits them alike.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from edge_agent.inference.interpreter import open_interpreter, tensor_bindings
from edge_agent.inference.runtime import LoadedModel


def latency_stats(samples_s: list[float] | np.ndarray, wall_s: float | None = None) -> dict[str, float]:
    """p50/p95/p99/mean in milliseconds and throughput (calls/s) from per-call seconds."""
    a = np.asarray(samples_s, dtype=np.float64) * 1e3
    out = {
        "n": int(a.size),
        "p50_ms": float(np.percentile(a, 50)),
        "p95_ms": float(np.percentile(a, 95)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
    }
    total = wall_s if wall_s is not None else float(a.sum()) / 1e3
    out["throughput_per_s"] = float(a.size / total) if total > 0 else float("inf")
    return out


def bench_in_process(model: LoadedModel, iterations: int = 2000, rounds: int = 4, batch: int = 1) -> dict[str, Any]:
    """Time ``invoke`` on a bare interpreter and ``model.predict`` on the same inputs.

    The raw path gets pre-quantized inputs and does set_tensor/invoke/get_tensor only;
    the agent path includes input checks, (de)quantization and the interpreter pool.
    """
    inputs = model.example_inputs(batch=batch, seed=7)
    interp, _ = open_interpreter(model.source, model.options)
    ins, out_bindings = tensor_bindings(interp, model.manifest)
    shapes = {d["index"]: tuple(d["shape"]) for d in interp.get_input_details()}
    specs = {s.name: s for s in model.manifest.inputs}
    feeds = []
    for name, idx in ins:
        arr = model.prepare_input(specs[name], inputs[name])
        if shapes[idx] != arr.shape:
            interp.resize_tensor_input(idx, list(arr.shape), strict=False)
        feeds.append((idx, arr))
    interp.allocate_tensors()
    outs = [idx for _, idx in out_bindings]

    def raw_call() -> None:
        for idx, arr in feeds:
            interp.set_tensor(idx, arr)
        interp.invoke()
        for idx in outs:
            interp.get_tensor(idx)

    def agent_call() -> None:
        model.predict(inputs)

    per_round = max(1, iterations // rounds)
    times: dict[str, list[float]] = {"raw": [], "agent": []}
    walls = {"raw": 0.0, "agent": 0.0}
    for fn in (raw_call, agent_call):  # warm-up
        for _ in range(min(50, per_round)):
            fn()
    clock = time.perf_counter
    for _ in range(rounds):
        for key, fn in (("raw", raw_call), ("agent", agent_call)):
            bucket = times[key]
            w0 = clock()
            for _ in range(per_round):
                t0 = clock()
                fn()
                bucket.append(clock() - t0)
            walls[key] += clock() - w0
    raw, agent = latency_stats(times["raw"], walls["raw"]), latency_stats(times["agent"], walls["agent"])
    return {
        "model": model.name,
        "version": model.version,
        "batch": batch,
        "delegate": model.delegate,
        "raw": raw,
        "agent": agent,
        "overhead_p50": agent["p50_ms"] / raw["p50_ms"] if raw["p50_ms"] else float("nan"),
    }
