"""The ``local`` engine: a process pool with one scoring worker per core, and no Ray import.

Workers come from a *forkserver* (``spawn`` where there is none), never from ``fork``: the driver
is multi-threaded by the time it scores (NumPy's BLAS, Arrow and OpenCV pools, the executor's own
threads), and forking a threaded process can deadlock a child on a lock some other thread held
(Python 3.12+ warns about it). The forkserver is a fresh, single-threaded process that imports the
scoring runtime (``PRELOAD``) once; ``warm_up`` starts it while the driver still reads and checks the
input, so its start-up overlaps that work, and every worker is then a cheap fork of it. Workers
build their ``Scorer`` once, then take whole partitions: score, write the part file, report
(part, rows, CPU seconds). Checked rows (``ArrayChunk``) are not pickled: every reader leaves them
in a file (``stored``), the input itself or its scratch rows (``RowSink``), and the workers map them
there (``MappedChunk``); pickling 1,000,000 maintenance rows to one worker and back out of the
pipe cost ~0.2 s of CPU. Other chunks (image and video file names) are pickled through the pool's
pipe. As with any
forkserver or spawn pool, each worker imports the caller's ``__main__`` script again (under
``__mp_main__``; its ``if __name__ == "__main__"`` block does not run); ``cloud-batch``'s finds
its CLI preloaded (``CLI``).
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.context import BaseContext

import numpy as np

from cloud_batch.errors import RegistryError
from cloud_batch.score.inputs import FLOAT32, ArrayChunk, Chunk, Keys
from cloud_batch.score.worker import ScorerSpec, init_worker, pool_task
from edge_agent.inference.interpreter import runtime_preload

OnPart = Callable[..., None]  # (part, rows[, worker CPU seconds])
# This module (its chunks) and the scorer, the TFLite runtime ``inference.interpreter.default_backend``
# loads (``runtime_preload``), and what Arrow imports on a worker's first table (0.2 s of CPU per worker).
PRELOAD = ["cloud_batch.score.local", "pyarrow.compute", "pandas"]


# Each worker imports the caller's ``__main__`` script again; the ``cloud-batch`` script imports the CLI
# (10-20 ms of CPU per worker). When the CLI is the running program the forkserver preloads it once, so
# the workers find it imported. (The forkserver's own remedy, "__main__" in the preload list, does
# nothing on CPython 3.10-3.13: ``ensure_running`` looks for the key ``main_path`` in the preparation
# data, which names it ``init_main_from_path``.)
CLI = "cloud_batch.cli.main"


def pool_context() -> BaseContext:
    """The forkserver context with the scoring runtime preloaded (``spawn`` without a forkserver)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD + runtime_preload() + [m for m in (CLI,) if m in sys.modules])
    return ctx


def warm_up() -> None:
    """Start the forkserver now (it preloads in the background); a no-op when it already runs."""
    if pool_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


# glibc's malloc serves an array above its (dynamic) mmap threshold with fresh pages and hands them
# back when it is freed, so every partition's temporaries (quantizing, dequantizing, columns) page
# fault again: 12,700 minor faults and ~10% of a worker's CPU for 100,000 digits rows on
# ai-edge-litert. A worker lives for one run, so it keeps its heap instead (below 32 MiB, the
# largest threshold glibc takes on 64-bit; larger arrays are mapped as before).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_ARRAY_BYTES = 32 << 20
HEAP_KEEP_BYTES = 512 << 20


def keep_heap() -> bool:
    """Have glibc's malloc keep freed memory for reuse in this process; False where it cannot (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - a C library without mallopt (macOS)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_ARRAY_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, HEAP_KEEP_BYTES) == 1)


def start_worker(spec: ScorerSpec) -> None:
    """Pool initializer: keep the heap (``keep_heap``), then build the worker's scorer."""
    keep_heap()
    init_worker(spec)


_MAPS: dict[str, mmap.mmap] = {}  # in a worker: the files it has mapped (the input, the scratch rows)


@dataclass
class MappedChunk:
    """An ``ArrayChunk`` whose arrays a worker maps: ``arrays[name] = (file, offset, dtype, shape)``."""

    keys: Keys
    arrays: dict[str, tuple[str, int, str, tuple[int, ...]]]

    def feeds(self) -> dict[str, np.ndarray]:
        out = {}
        for name, (path, offset, dt, shape) in self.arrays.items():
            if path not in _MAPS:
                with open(path, "rb") as fh:
                    _MAPS[path] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            out[name] = np.frombuffer(_MAPS[path], np.dtype(dt), int(np.prod(shape)), offset).reshape(shape)
        return out


def mapped(tasks: Sequence[tuple[int, Chunk]]) -> list[tuple[int, Chunk]]:
    """``tasks`` with every ``ArrayChunk`` whose rows all lie in files (``stored``) as a ``MappedChunk``;
    any other chunk as it is (pickled through the pool's pipe)."""
    out: list[tuple[int, Chunk]] = []
    for part, chunk in tasks:
        if type(chunk) is ArrayChunk and chunk.stored and not chunk.arrays:  # a subclass may do more in feeds()
            spots = {name: (rows.file, rows.offset, FLOAT32.str, rows.shape) for name, rows in chunk.stored.items()}
            chunk = MappedChunk(chunk.keys, spots)
        out.append((part, chunk))
    return out


def run_local(spec: ScorerSpec, tasks: Sequence[tuple[int, Chunk]], workers: int, on_part: OnPart) -> None:
    """Score every (part, chunk) in ``tasks`` on ``workers`` processes; ``on_part(part, rows, cpu)`` as each is written."""
    if tasks:
        _run_pool(spec, mapped(tasks), workers, on_part)


def _run_pool(spec: ScorerSpec, tasks: Sequence[tuple[int, Chunk]], workers: int, on_part: OnPart) -> None:
    with ProcessPoolExecutor(
        max_workers=max(1, min(workers, len(tasks))),
        mp_context=pool_context(),
        initializer=start_worker,
        initargs=(spec,),
    ) as pool:
        pending = {pool.submit(pool_task, part, chunk) for part, chunk in tasks}
        try:
            while pending:
                # FIRST_COMPLETED: each partition is reported (progress, the merge) as it is written, not when all
                # are (FIRST_EXCEPTION returns only then, or at an error).
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: f.exception() is not None):  # report what was written first
                    on_part(*fut.result())
        except BrokenProcessPool as exc:
            raise RegistryError(
                f"a scoring worker died while running {spec.version_dir} (the runtime crashed or was killed); "
                "the partitions written so far are kept: rerun to resume"
            ) from exc
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
