"""One scoring worker: the device's ``LoadedModel`` on the registry's artifact, one interpreter, one thread.

``Scorer.score(chunk)`` converts the whole chunk to the model's native types once (the runtime's
own check and quantization, element-wise, so the same numbers as per batch), runs it through the
interpreter in batches of ``batch_size`` (resized to the batch, as on the device), dequantizes the
outputs once, and returns an Arrow table: the key column, every output in real values (``<out>``
for one value per row, else ``<out>_<i>``), and for a classifier (the manifest has labels)
``top_class`` (label index) and ``top_score``. ``write_part`` stores a scored partition (temp file,
rename; see ``parts.py`` for why without fsync). Both engines call only these.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from cloud_batch.errors import InputError, RegistryError
from cloud_batch.score.inputs import Chunk, key_array
from cloud_batch.score.parts import local_part
from cloud_batch.score.video import result_column
from edge_agent.errors import EdgeError
from edge_agent.inference.interpreter import RUNTIME_ENV, runtime_label
from edge_agent.inference.runtime import LoadedModel, RuntimeOptions
from edge_agent.wire.model.manifest import MANIFEST_FILE, Manifest

TOP_CLASS, TOP_SCORE = "top_class", "top_score"
WRITE_BUFFER = 1 << 20


@dataclass(frozen=True)
class ScorerSpec:
    """What a worker needs to build its scorer (picklable, sent once per worker)."""

    version_dir: str
    batch_size: int
    key_name: str
    staging: str
    runtime: str | None = None  # the driver's ``runtime_label()``: a worker on another runtime refuses to score


def output_columns(manifest: Manifest) -> list[str]:
    """The output's value columns, in order (after the key column)."""
    cols: list[str] = []
    for spec in manifest.outputs:
        width = int(np.prod(spec.shape[1:])) if len(spec.shape) > 1 else 1
        cols += [spec.name] if width == 1 else [f"{spec.name}_{i}" for i in range(width)]
    if is_classifier(manifest):
        cols += [TOP_CLASS, TOP_SCORE]
    return cols


def is_classifier(manifest: Manifest) -> bool:
    return bool(manifest.labels) and len(manifest.outputs) == 1


def write_part(staging: str | Path, part: int, table: pa.Table) -> None:
    """Store partition ``part``: a hidden temp file renamed into place, so it exists only complete.

    An uncompressed Arrow IPC file: a staging file, which the merge reads back as it is and encodes once.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{part}_", suffix=".tmp", dir=staging)
    os.close(fd)
    try:
        # Buffered: Arrow writes each column buffer (and its padding) with a call of its own, half the cost unbuffered.
        with (
            pa.output_stream(tmp, compression=None, buffer_size=WRITE_BUFFER) as sink,
            pa.ipc.new_file(sink, table.schema) as writer,
        ):
            writer.write_table(table)
        os.replace(tmp, local_part(staging, part))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Scorer:
    """A LoadedModel with one interpreter (``num_threads=1``) that scores chunks into Arrow tables."""

    def __init__(self, spec: ScorerSpec) -> None:
        self.spec = spec
        if spec.runtime is not None and (mine := runtime_label()) != spec.runtime:
            raise RegistryError(
                f"this worker's TFLite runtime is {mine}, the run's is {spec.runtime}: outputs would differ "
                f"(set {RUNTIME_ENV} and install the same runtime on every node)"
            )
        self.manifest = Manifest.load(Path(spec.version_dir) / MANIFEST_FILE)
        options = RuntimeOptions(
            num_threads=1, pool_size=1, max_batch=spec.batch_size, max_resident_batch=spec.batch_size
        )
        self.model = LoadedModel(Path(spec.version_dir) / self.manifest.file, self.manifest, options)

    def score(self, chunk: Chunk) -> pa.Table:
        feeds = chunk.feeds()
        n = len(chunk.keys)
        try:
            native = {s.name: self.model.prepare_input(s, feeds[s.name]) for s in self.manifest.inputs}
            outputs = self.model.finish(self.model.run_rows(native, self.spec.batch_size), frozenset())
        except EdgeError as exc:
            raise InputError(f"rows the model refuses: {exc}") from exc
        columns: dict[str, np.ndarray] = {self.spec.key_name: key_array(chunk.keys)}
        for spec in self.manifest.outputs:
            values = outputs[spec.name].reshape(n, -1).astype(np.float32, copy=False)
            if values.shape[1] == 1:
                columns[spec.name] = values[:, 0]
            else:
                columns.update({f"{spec.name}_{i}": values[:, i] for i in range(values.shape[1])})
            if is_classifier(self.manifest):
                top = values.argmax(axis=1)  # the score is the value there: max(axis=1) costs 4x argmax's time
                columns[TOP_CLASS] = top.astype(np.int64, copy=False)
                columns[TOP_SCORE] = np.take_along_axis(values, top[:, None], axis=1)[:, 0]
        columns.update(result_column(chunk, outputs))  # video: boxes
        return pa.table(columns)

    def run_part(self, part: int, chunk: Chunk) -> int:
        """Score ``chunk`` and write it as partition ``part``; returns its rows."""
        table = self.score(chunk)
        write_part(self.spec.staging, part, table)
        return table.num_rows


# -- process-pool worker state (one Scorer per worker process) ------------------------------------
_SCORER: Scorer | None = None
_CPU = 0.0


def init_worker(spec: ScorerSpec) -> None:
    """Pool initializer: build this process's scorer once."""
    global _SCORER
    _SCORER = Scorer(spec)


def pool_task(part: int, chunk: Chunk) -> tuple[int, int, float]:
    """Pool task: score and write one partition; returns (part, rows, this worker's CPU seconds since its last task)."""
    global _CPU
    if _SCORER is None:  # pragma: no cover - the initializer always ran
        raise RuntimeError("scoring worker not initialised")
    rows = _SCORER.run_part(part, chunk)
    cpu, _CPU = time.process_time() - _CPU, time.process_time()
    return part, rows, cpu
