"""The local engine's process pool: a worker that dies, partitions reported as they are written, no fork
from the threaded driver, workers that keep their heap."""

from __future__ import annotations

import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cloud_batch.errors import InputError, RegistryError
from cloud_batch.score.inputs import ArrayChunk
from cloud_batch.score.job import score
from cloud_batch.score.local import pool_context, run_local
from cloud_batch.score.parts import read_part, written
from cloud_batch.score.worker import ScorerSpec
from tests.support.score import digits_rows, score_registry


@pytest.fixture
def sreg(tmp_path: Path) -> Path:
    return score_registry(tmp_path / "registry")


class _DyingChunk(ArrayChunk):
    """A chunk whose worker dies as it starts on it, as when the runtime crashes (imported by the worker)."""

    def feeds(self) -> dict[str, np.ndarray]:
        os.kill(os.getpid(), signal.SIGKILL)
        return super().feeds()


def test_a_worker_that_dies_is_a_clean_error_and_the_partitions_written_stay(sreg: Path, tmp_path: Path) -> None:
    x, keys = digits_rows(200), np.arange(200, dtype=np.int64)
    staging = tmp_path / "staging"
    staging.mkdir()
    spec = ScorerSpec(str(sreg / "digits" / "1"), 64, "row", str(staging))
    tasks = [(0, ArrayChunk(keys[:100], {"pixels": x[:100]})), (1, _DyingChunk(keys[100:], {"pixels": x[100:]}))]
    reported: list[int] = []
    with pytest.raises(RegistryError, match=r"a scoring worker died .* rerun to resume"):
        run_local(spec, tasks, 1, lambda part, rows, cpu: reported.append(part))
    assert reported == [0] and set(written(staging)) == {0}
    assert read_part(written(staging)[0]).num_rows == 100


@dataclass
class _GatedChunk(ArrayChunk):
    """Scored only once the driver has reported an earlier partition (``gate`` exists): a pool that reports
    partitions only when all are done fails it."""

    gate: str = ""

    def feeds(self) -> dict[str, np.ndarray]:
        deadline = time.monotonic() + 20
        while not os.path.exists(self.gate):
            if time.monotonic() > deadline:
                raise InputError("partition 0 was not reported while the pool was still scoring")
            time.sleep(0.01)
        return super().feeds()


def test_each_partition_is_reported_as_soon_as_it_is_written(sreg: Path, tmp_path: Path) -> None:
    """The progress bar and the merge follow the partitions as they finish, not all at the end."""
    x, keys = digits_rows(200), np.arange(200, dtype=np.int64)
    staging, gate = tmp_path / "staging", tmp_path / "reported-0"
    staging.mkdir()
    spec = ScorerSpec(str(sreg / "digits" / "1"), 64, "row", str(staging))
    tasks = [(0, ArrayChunk(keys[:100], {"pixels": x[:100]})),
             (1, _GatedChunk(keys[100:], {"pixels": x[100:]}, gate=str(gate)))]  # fmt: skip
    reported: list[int] = []

    def on_part(part: int, rows: int, cpu: float) -> None:
        reported.append(part)
        gate.touch()

    run_local(spec, tasks, 1, on_part)
    assert reported == [0, 1] and set(written(staging)) == {0, 1}


def test_workers_are_not_forked_from_the_threaded_driver(sreg: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", digits_rows(50))
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "error", message=r".*use of fork\(\) may lead to deadlocks", category=DeprecationWarning
        )
        result = score(sreg, "digits", "1", tmp_path / "x.npy", tmp_path / "s.parquet", workers=1, progress=False)
    assert pool_context().get_start_method() in ("forkserver", "spawn")
    assert result.worker_cpu_s is not None and result.worker_cpu_s > 0


def test_a_scoring_worker_keeps_its_heap_on_glibc() -> None:
    """``keep_heap`` (run by every local worker first) is accepted by glibc's mallopt on this Linux."""
    import subprocess
    import sys

    code = "from cloud_batch.score.local import keep_heap; print(keep_heap())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
