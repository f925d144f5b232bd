"""The ``ray`` engine: a Ray Data pipeline, partitions → ``map_batches`` on an actor pool → ``write_parquet``.

``ray.data.from_items`` (one row per pending partition, one block each) → ``map_batches`` over a pool
of ``workers`` actors, each holding one ``Scorer`` (one interpreter, one thread, one CPU), which turns
a partition into its scored Arrow table plus a ``part`` column → ``write_parquet`` into the staging
directory, partitioned by ``part`` with Arrow's *filename* flavour (``7_<uuid>_<task>-0.parquet``,
the ``part`` column dropped from the data) through ``renamefs``, so a partition file appears only
complete. The driver watches the staging directory for the progress bar. Each chunk goes to the object
store as an object of its own, with its rows read (``ArrayChunk.loaded``): a node of a cluster may not
see the input file, and an actor fetches only the partitions it scores. Ray is imported here only,
lazily: it is the ``batch`` extra.

Why the input end is not ``read_parquet``/``read_csv``/``read_images`` (docs/batch.md): the input is
read and checked whole by the driver before any work (errors name row and column), a partition is a
fixed row range that a rerun must be able to skip, and Ray's readers neither number rows nor cut
blocks at those ranges; ``read_images`` decodes with PIL, not the agent's OpenCV path.

Without ``address`` a local cluster is started with ``workers`` CPUs and shut down afterwards; a
cluster that is already initialised in this process is used as it is and left running.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cloud_batch.errors import InputError
from cloud_batch.score.inputs import ArrayChunk, Chunk
from cloud_batch.score.local import OnPart
from cloud_batch.score.parts import written
from cloud_batch.score.renamefs import rename_on_close_fs
from cloud_batch.score.worker import Scorer, ScorerSpec
from edge_agent.inference.interpreter import RUNTIME_ENV, selected_runtime

PART = "part"
POLL_S = 0.25


def _loaded(chunk: Chunk) -> Chunk:
    return chunk.loaded() if isinstance(chunk, ArrayChunk) else chunk


class _RayScorer:
    """A scoring actor: builds its Scorer once, then fetches and scores the partitions it is given."""

    def __init__(self, spec: ScorerSpec, chunks: dict[int, Any]) -> None:
        self.scorer = Scorer(spec)
        self.chunks = chunks  # partition -> the ObjectRef of its chunk

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import ray

        (part,) = (int(p) for p in batch[PART])
        table = self.scorer.score(ray.get(self.chunks[part]))
        return table.add_column(0, PART, pa.array(np.full(table.num_rows, part, dtype=np.int64)))


def _connect(ray: Any, workers: int, address: str | None) -> bool:
    """Start or join a cluster unless this process is already connected; True when this call did.

    The job's workers are told the driver's runtime choice (``EDGEFLEET_RUNTIME__BACKEND``); a worker whose
    runtime still differs refuses to score (``Scorer``).
    """
    if ray.is_initialized():
        return False
    common = {
        "log_to_driver": False,
        "configure_logging": False,
        "runtime_env": {"env_vars": {RUNTIME_ENV: selected_runtime()[0]}},
    }
    try:
        if address:
            ray.init(address=address, **common)
        else:
            # "local": a new cluster even when `ray start` left its address in /tmp/ray (ray.init() would join that)
            ray.init(address="local", num_cpus=workers, include_dashboard=False, **common)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputError(f"cannot start or reach the Ray cluster {address or '(local)'}: {exc}") from exc
    return True


def run_ray(
    spec: ScorerSpec, tasks: Sequence[tuple[int, Chunk]], workers: int, on_part: OnPart, address: str | None
) -> None:
    """Score ``tasks`` on a Ray cluster (``address``, else a local one); ``on_part(part, rows)`` as each is written."""
    try:
        import ray
    except ImportError as exc:
        raise InputError("--engine ray needs Ray: pip install 'edgefleet[batch]'") from exc
    if not tasks:
        return
    started = _connect(ray, workers, address)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        # One object per partition, rows read (not the file): the driver holds one partition at a time, and
        # an actor fetches only the partitions it scores (a node of a cluster, not the whole input).
        chunks = {part: ray.put(_loaded(chunk)) for part, chunk in tasks}
        ds = ray.data.from_items([{PART: part} for part, _ in tasks], override_num_blocks=len(tasks))
        scored = ds.map_batches(
            _RayScorer,
            fn_constructor_args=(spec, chunks),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, len(tasks)))),
            num_cpus=1,
        )
        with ThreadPoolExecutor(1, thread_name_prefix="ray-write") as pool:
            write = pool.submit(
                scored.write_parquet, spec.staging, filesystem=rename_on_close_fs(), partition_cols=[PART],
                partitioning_flavor="filename", try_create_dir=False,
            )  # fmt: skip
            _watch(write, Path(spec.staging), {part: len(chunk.keys) for part, chunk in tasks}, on_part)
    except ray.exceptions.RayError as exc:
        cause = _input_error(exc)
        if cause is not None:
            raise InputError(str(cause).splitlines()[-1]) from exc
        raise
    finally:
        if started:
            ray.shutdown()


def _watch(write: Any, staging: Path, pending: dict[int, int], on_part: OnPart) -> None:
    """Report each partition as its file appears, until ``write`` is done (its error, if any, is raised)."""
    while pending:
        finished = write.done()
        for part in set(written(staging)) & set(pending):
            on_part(part, pending.pop(part))
        if finished:
            break
        time.sleep(POLL_S)
    write.result()


def _input_error(exc: BaseException) -> BaseException | None:
    """The InputError a scoring actor raised, found through Ray's wrappers."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, InputError):
            return seen
        as_cause = getattr(seen, "as_instanceof_cause", None)
        if as_cause is not None:
            cause = as_cause()
            if isinstance(cause, InputError):
                return cause
        seen = seen.__cause__
    return None
