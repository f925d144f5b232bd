"""The ``local`` engine: a process pool with one scoring worker per core, and no Ray import.

Workers come from a *forkserver* (``spawn`` where there is none), never from ``fork``: the driver
is multi-threaded by the time it scores (NumPy's BLAS, Arrow and OpenCV pools, the executor's own
threads), and forking a threaded process can deadlock a child on a lock some other thread held
(Python 3.12+ warns about it). The forkserver is a fresh, single-threaded process that imports the
scoring runtime (``PRELOAD``) once; ``warm_up`` starts it while the driver still reads and checks the
input, so its start-up overlaps that work, and every worker is then a cheap fork of it. Workers
build their ``Scorer`` once, then take whole partitions: score, write the part file, report
(part, rows, CPU seconds). Chunks reach the workers pickled through the pool's pipe. As with any
forkserver or spawn pool, each worker imports the caller's ``__main__`` script again (under
``__mp_main__``; its ``if __name__ == "__main__"`` block does not run): ``cloud-batch``'s costs ~30 ms.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext

from cloud_batch.errors import RegistryError
from cloud_batch.score.inputs import Chunk
from cloud_batch.score.worker import ScorerSpec, init_worker, pool_task

OnPart = Callable[..., None]  # (part, rows[, worker CPU seconds])
# The scorer, the TFLite runtimes ``inference.interpreter.default_backend`` tries (the forkserver skips
# one that is not installed), and what Arrow imports on a worker's first table (0.2 s of CPU per worker).
PRELOAD = [
    "cloud_batch.score.worker", "tflite_runtime.interpreter", "ai_edge_litert.interpreter", "pyarrow.compute", "pandas",
]  # fmt: skip


def pool_context() -> BaseContext:
    """The forkserver context with the scoring runtime preloaded (``spawn`` without a forkserver)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def warm_up() -> None:
    """Start the forkserver now (it preloads in the background); a no-op when it already runs."""
    if pool_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def run_local(spec: ScorerSpec, tasks: Sequence[tuple[int, Chunk]], workers: int, on_part: OnPart) -> None:
    """Score every (part, chunk) in ``tasks`` on ``workers`` processes; ``on_part(part, rows, cpu)`` as each is written."""
    if not tasks:
        return
    with ProcessPoolExecutor(
        max_workers=max(1, min(workers, len(tasks))),
        mp_context=pool_context(),
        initializer=init_worker,
        initargs=(spec,),
    ) as pool:
        pending = {pool.submit(pool_task, part, chunk) for part, chunk in tasks}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
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
