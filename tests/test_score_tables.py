"""Parquet/CSV inputs to ``cloud-batch score``, and arrays that need converting, are streamed: a block at a
time (for tables, only the columns needed) into scratch rows that the workers map; errors name the file
and its row; nothing is left behind."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cloud_batch.errors import InputError
from cloud_batch.features.tables import table_blocks
from cloud_batch.score import inputs
from cloud_batch.score.inputs import ArrayChunk, InputOptions, RowNumbers, fingerprint
from cloud_batch.score.job import score
from cloud_batch.score.npfiles import NumpyReader
from cloud_batch.score.parts import scratch_dir, staging_dir
from cloud_batch.score.tabular import TableReader
from edge_agent.wire.model.manifest import Manifest
from tests.support.score import digits_rows, live_frame, read_scores, score_registry

JOIN = {"entity_key": "asset_id", "features": "asset_features"}


@pytest.fixture(scope="module")
def sreg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return score_registry(tmp_path_factory.mktemp("score-tables") / "registry")


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 7 rows for the maintenance table's 5 columns read (asset_id and the 4 live ones)."""
    monkeypatch.setattr(inputs, "BLOCK_BYTES", 7 * 8 * 5)
    assert inputs.rows_per_block(8 * 5) == 7


def test_a_wide_table_is_read_a_block_at_a_time_and_never_held_whole(
    sreg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """64 pixel columns of 40,000 rows (20 MB as float64) beside 16 unused ones, in row groups of 4,000:
    the driver's Python-side peak stays near one 1 MiB block, and the chunks point into scratch rows."""
    monkeypatch.setattr(inputs, "BLOCK_BYTES", 1 << 20)
    x = digits_rows(40_000)
    cols = {f"c{i}": x.reshape(len(x), 64)[:, i].astype(np.float64) for i in range(64)}
    unused = {f"u{i}": np.arange(len(x), dtype=np.float64) for i in range(16)}
    path = tmp_path / "wide.parquet"
    pd.DataFrame(unused | cols).to_parquet(path, row_group_size=4_000)
    manifest = Manifest.load(sreg / "digits" / "1" / "manifest.json")
    options = InputOptions(sreg, mapping={"pixels": list(cols)}, scratch=tmp_path / "scratch")
    tracemalloc.start()
    try:
        rows = TableReader().read(path, manifest, options)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 << 20, f"the driver held {peak:,} bytes reading a {len(x) * 64 * 8:,}-byte table"
    assert rows.n == len(x) and rows.keys == RowNumbers(0, len(x))
    assert rows.fingerprint == fingerprint([path], path)
    chunk = rows.chunk(12_000, 13_000)
    assert isinstance(chunk, ArrayChunk) and chunk.arrays == {} and set(chunk.stored) == {"pixels"}
    assert np.array_equal(chunk.feeds()["pixels"], x[12_000:13_000])
    assert rows.scratch == tmp_path / "scratch" and rows.scratch.is_dir()
    rows.close()
    assert not (tmp_path / "scratch").exists()


@pytest.mark.usefixtures("small_blocks")
def test_small_blocks_score_the_same_rows_as_one_block(sreg: Path, tmp_path: Path) -> None:
    df = live_frame(120)
    df.to_parquet(tmp_path / "live.parquet", row_group_size=50)
    csvs = tmp_path / "csvs"
    csvs.mkdir()
    df.iloc[:45].to_csv(csvs / "a.csv", index=False)
    df.iloc[45:].to_csv(csvs / "b.csv", index=False)
    outs = []
    for source in (tmp_path / "live.parquet", csvs):
        out = tmp_path / f"scores-{source.stem}.parquet"
        score(sreg, "maintenance", "1", source, out, workers=1, progress=False, **JOIN)  # type: ignore[arg-type]
        outs.append(read_scores(out))
        assert not scratch_dir(out).exists() and not staging_dir(out).exists()
    inputs.BLOCK_BYTES = 8 << 20  # one block per file (the fixture restores the default)
    score(sreg, "maintenance", "1", tmp_path / "live.parquet", tmp_path / "one.parquet", workers=1, progress=False,
          **JOIN)  # type: ignore[arg-type]  # fmt: skip
    one = read_scores(tmp_path / "one.parquet")
    assert one["asset_id"].tolist() == df["asset_id"].tolist()
    assert outs[0].equals(one) and outs[1].equals(one)


def _refusal(sreg: Path, tmp: Path, source: Path) -> str:
    out = tmp / "out.parquet"
    with pytest.raises(InputError) as err:
        score(sreg, "maintenance", "1", source, out, workers=1, progress=False, **JOIN)  # type: ignore[arg-type]
    assert not out.exists() and not staging_dir(out).exists() and not scratch_dir(out).exists()
    return str(err.value)


@pytest.mark.usefixtures("small_blocks")
def test_errors_in_later_blocks_name_the_file_and_its_row(sreg: Path, tmp_path: Path) -> None:
    df = live_frame(40)
    df.loc[16, "vibration"] = np.nan  # row 17, in the third block of 7
    df.to_parquet(tmp_path / "nan.parquet")
    assert "nan.parquet: NaN in row 17, column 'vibration'" in _refusal(sreg, tmp_path, tmp_path / "nan.parquet")

    text = live_frame(30).astype({"rpm": object})
    text.loc[24, "rpm"] = "fast"  # only the fourth block of the CSV has text
    text.to_csv(tmp_path / "text.csv", index=False)
    assert "column 'rpm' (object) not numeric (input 'live')" in _refusal(sreg, tmp_path, tmp_path / "text.csv")

    keys = live_frame(30)
    keys.loc[9, "asset_id"] = None
    keys.to_parquet(tmp_path / "keys.parquet")
    assert "entity column 'asset_id' is empty in row 10" in _refusal(sreg, tmp_path, tmp_path / "keys.parquet")

    lost = live_frame(30)
    lost.loc[[1, 22], "asset_id"] = ["asset-700", "asset-900"]  # in the first and the fourth block
    lost.to_parquet(tmp_path / "lost.parquet")
    assert "2 entities not in feature set asset_features 1: 'asset-700', 'asset-900' (first in row 2)" in _refusal(
        sreg, tmp_path, tmp_path / "lost.parquet"
    )

    parts = tmp_path / "parts"
    parts.mkdir()
    live_frame(20).to_csv(parts / "a.csv", index=False)
    second = live_frame(20)
    second.loc[11, "rpm"] = np.inf
    second.to_csv(parts / "b.csv", index=False)
    live_frame(20).drop(columns=["rpm"]).to_csv(parts / "c.csv", index=False)
    assert f"{parts / 'c.csv'} is missing column 'rpm'" in _refusal(sreg, tmp_path, parts)  # headers first
    (parts / "c.csv").unlink()
    assert f"{parts / 'b.csv'}: an infinite value in row 12, column 'rpm'" in _refusal(sreg, tmp_path, parts)


def test_a_killed_runs_scratch_rows_are_removed_by_the_next_run(sreg: Path, tmp_path: Path) -> None:
    live_frame(30).to_csv(tmp_path / "live.csv", index=False)
    out = tmp_path / "out.parquet"
    stray = scratch_dir(out)
    stray.mkdir()
    (stray / "0.f32").write_bytes(b"\0" * 64)  # what a run killed while converting left
    score(sreg, "maintenance", "1", tmp_path / "live.csv", out, workers=1, progress=False, **JOIN)  # type: ignore[arg-type]
    assert read_scores(out)["asset_id"].tolist() == live_frame(30)["asset_id"].tolist()
    assert not stray.exists()


def test_blocks_report_how_far_into_the_file_they_are(tmp_path: Path) -> None:
    """``on_bytes`` drives the "reading" bar: it grows block by block and ends at the file's size."""
    df = live_frame(3_000)
    df.to_parquet(tmp_path / "t.parquet", row_group_size=1_000)
    df.to_csv(tmp_path / "t.csv", index=False)
    for path in (tmp_path / "t.parquet", tmp_path / "t.csv"):
        seen: list[int] = []
        blocks = list(
            table_blocks(path, ["asset_id", "rpm"], text_columns=["asset_id"], rows=700, on_bytes=seen.append)
        )
        assert sum(len(b["rpm"]) for b in blocks) == 3_000 and len(seen) == len(blocks) > 1
        assert seen == sorted(seen) and seen[-1] == path.stat().st_size, (path.name, seen)
        whole = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)  # what read_table gives
        assert np.array_equal(np.concatenate([b["rpm"] for b in blocks]), whole["rpm"].to_numpy())


def test_no_room_for_the_converted_rows_is_a_clear_error(sreg: Path, tmp_path: Path) -> None:
    """A real write failure (the file size limit, as a full disk would be): an InputError, nothing left behind."""
    live_frame(20_000).to_parquet(tmp_path / "live.parquet")
    out = tmp_path / "out.parquet"
    script = f"""
import resource, signal
from cloud_batch.errors import InputError
from cloud_batch.score.job import score
from cloud_batch.score.npfiles import NumpyReader
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
try:
    score({str(sreg)!r}, "maintenance", "1", {str(tmp_path / "live.parquet")!r}, {str(out)!r}, workers=1,
          progress=False, entity_key="asset_id", features="asset_features")
except InputError as exc:
    print("InputError:", exc)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "InputError: cannot keep the input's converted rows in" in proc.stdout and "File too large" in proc.stdout
    assert not out.exists() and not staging_dir(out).exists() and not scratch_dir(out).exists()


def test_an_array_to_convert_is_read_a_block_at_a_time(
    sreg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A float64 .npy (20 MB) is checked and converted into scratch rows 1 MiB at a time; errors name the
    row across blocks; a Fortran-order array, which has no row blocks, is still loaded and converted."""
    monkeypatch.setattr(inputs, "BLOCK_BYTES", 1 << 20)
    x = digits_rows(40_000).astype(np.float64)
    np.save(tmp_path / "x.npy", x)
    manifest = Manifest.load(sreg / "digits" / "1" / "manifest.json")
    tracemalloc.start()
    try:
        rows = NumpyReader().read(tmp_path / "x.npy", manifest, InputOptions(sreg, scratch=tmp_path / "s"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 << 20, f"the driver held {peak:,} bytes converting a {x.nbytes:,}-byte array"
    chunk = rows.chunk(30_000, 31_000)
    assert isinstance(chunk, ArrayChunk) and Path(chunk.stored["pixels"].file).parent == tmp_path / "s"
    assert np.array_equal(chunk.feeds()["pixels"], x[30_000:31_000].astype(np.float32))
    rows.close()
    x[30_000, 2, 3, 0] = np.nan
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(InputError, match=r"NaN in row 30001, column element 19 "):
        NumpyReader().read(tmp_path / "x.npy", manifest, InputOptions(sreg, scratch=tmp_path / "s"))
    assert not (tmp_path / "s").exists()
    f = np.asfortranarray(digits_rows(500).astype(np.float64))
    np.save(tmp_path / "f.npy", f)
    rows = NumpyReader().read(tmp_path / "f.npy", manifest, InputOptions(sreg, scratch=tmp_path / "s"))
    assert np.array_equal(rows.chunk(0, 500).feeds()["pixels"], f.astype(np.float32))
    rows.close()
