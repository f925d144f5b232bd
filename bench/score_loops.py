"""What ``cloud-batch score`` is measured against (``score_bench.py --limit-only``, ``score_callgrind.py``).

* ``raw_loop``: a bare interpreter over inputs quantized beforehand: the limit;
* ``plain_job``: an end-to-end job as one would write it by hand, in one process;
* ``load_rows``: a dataset's rows as model inputs, for both and for the HTTP side;
* ``load_model``: a registry version's manifest and ``LoadedModel``, for both;
* ``limit_input``: the random rows they run on (``--limit-only`` and ``score_callgrind.py`` alike).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edge_agent.inference.runtime import LoadedModel
    from edge_agent.wire.model.manifest import Manifest


def limit_input(stem: Path, name: str, n: int, rng: np.random.Generator) -> Path:
    """Write ``n`` random rows for ``name`` (digits or maintenance) beside ``stem``; returns the file."""
    if name == "digits":
        source = stem.with_suffix(".npy")
        np.save(source, rng.uniform(0, 16, (n, 8, 8, 1)).astype(np.float32))
    else:
        source = stem.with_suffix(".npz")
        np.savez(source, live=rng.normal(10, 3, (n, 4)).astype(np.float32),
                 asset_features=rng.uniform(0, 5, (n, 18)).astype(np.float32))  # fmt: skip
    return source


def load_rows(reg: Path, name: str, source: Path, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` rows of a dataset as model inputs (images decoded the agent's way)."""
    from edge_agent.wire.model.manifest import Manifest

    manifest = Manifest.load(reg / name / "1" / "manifest.json")
    if source.is_dir():
        from edge_agent.inference.preprocess import load_input_file

        files = sorted(source.iterdir())[:n]
        return {"images": np.concatenate([load_input_file(f, manifest)["images"] for f in files])}
    if source.suffix == ".npy":
        return {manifest.inputs[0].name: np.load(source)[:n]}
    with np.load(source) as data:
        return {k: data[k][:n] for k in data.files}


def load_model(reg: Path, name: str) -> tuple[Manifest, LoadedModel]:
    """Version 1 of ``name`` in the registry: its manifest and a ``LoadedModel`` on one thread."""
    from edge_agent.inference.interpreter import RuntimeOptions
    from edge_agent.inference.runtime import LoadedModel
    from edge_agent.wire.model.manifest import Manifest

    manifest = Manifest.load(reg / name / "1" / "manifest.json")
    return manifest, LoadedModel(reg / name / "1" / manifest.file, manifest, RuntimeOptions(num_threads=1, pool_size=1))


def raw_loop(
    reg: Path, name: str, inputs: dict[str, np.ndarray], batch: int, keep: dict[str, list[np.ndarray]] | None = None
) -> tuple[float, float]:
    """Seconds (wall, thread CPU) of a bare interpreter (1 thread) over ``inputs``, quantized beforehand, in batches.

    With ``keep``, each output's batches are appended to ``keep[output name]`` (the plain job needs them).
    """
    from edge_agent.inference.interpreter import RuntimeOptions, open_interpreter, tensor_bindings

    manifest, model = load_model(reg, name)
    specs = {s.name: s for s in manifest.inputs}
    native = {k: model.prepare_input(specs[k], v) for k, v in inputs.items()}
    interp, _ = open_interpreter(model.source, RuntimeOptions(num_threads=1))
    ins, outs = tensor_bindings(interp, manifest)
    n = len(next(iter(native.values())))
    shape: dict[int, tuple[int, ...]] = {}
    t0, c0 = time.perf_counter(), time.thread_time()
    for i in range(0, n, batch):
        chunk = {k: v[i : i + batch] for k, v in native.items()}
        resized = False
        for k, idx in ins:
            if shape.get(idx) != chunk[k].shape:
                interp.resize_tensor_input(idx, list(chunk[k].shape), strict=False)
                shape[idx], resized = chunk[k].shape, True
        if resized:
            interp.allocate_tensors()
        for k, idx in ins:
            interp.set_tensor(idx, chunk[k])
        interp.invoke()
        for out_name, idx in outs:
            value = interp.get_tensor(idx)
            if keep is not None:
                keep.setdefault(out_name, []).append(value)
    return time.perf_counter() - t0, time.thread_time() - c0


def plain_job(reg: Path, name: str, source: Path, out: Path) -> float:
    """CPU seconds of a plain end-to-end job, as one would write it by hand, in one process: read ``source``,
    load the model, quantize, the raw loop, dequantize, write one Parquet file (row index and outputs,
    encoded as ``score``'s output: no dictionaries). No checks, partitions, resume or worker process.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, model = load_model(reg, name)  # dequantizes the outputs (raw_loop loads its own, inside the timed job)
    c0 = time.process_time()
    inputs = load_rows(reg, name, source, sys.maxsize)
    kept: dict[str, list[np.ndarray]] = {}
    raw_loop(reg, name, inputs, 256, keep=kept)  # loads the model and quantizes, then the loop
    outputs = model.finish({k: np.concatenate(v) for k, v in kept.items()}, frozenset())
    n = len(next(iter(inputs.values())))
    columns: dict[str, np.ndarray] = {"row": np.arange(n)}
    for k, v in outputs.items():
        v = v.reshape(n, -1).astype(np.float32, copy=False)
        columns.update({f"{k}_{j}": v[:, j] for j in range(v.shape[1])})
    pq.write_table(pa.table(columns), out, use_dictionary=False)
    return time.process_time() - c0
