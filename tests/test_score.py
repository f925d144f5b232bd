"""``cloud-batch score`` on the local engine: every input kind, the output's shape and metadata, reruns, publishing.

Expected values come from the device runtime itself (``LoadedModel.predict`` on the same artifact,
one row at a time): the batch path must give the same numbers, bit for bit.
"""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

from cloud_batch.cli.main import main
from cloud_batch.errors import InputError
from cloud_batch.features.build import FeatureRegistry
from cloud_batch.score import parts
from cloud_batch.score.inputs import ArrayChunk, InputOptions, RowNumbers, StoredRows, fingerprint
from cloud_batch.score.job import score
from cloud_batch.score.local import MappedChunk, mapped
from cloud_batch.score.npfiles import NumpyReader
from cloud_batch.score.parts import Merger, local_part, read_metadata, staging_dir, written
from cloud_batch.score.worker import write_part
from edge_agent.inference.preprocess import load_input_file
from edge_agent.inference.runtime import LoadedModel
from edge_agent.wire.model.manifest import Manifest
from tests.support.score import LIVE, digits_rows, live_frame, read_scores, score_registry, write_images


@pytest.fixture
def sreg(tmp_path: Path) -> Path:
    return score_registry(tmp_path / "registry")


def _device(reg: Path, name: str) -> LoadedModel:
    manifest = Manifest.load(reg / name / "1" / "manifest.json")
    return LoadedModel(reg / name / "1" / manifest.file, manifest)


def _one_by_one(model: LoadedModel, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(next(iter(inputs.values())))
    outs = [model.predict({k: v[i : i + 1] for k, v in inputs.items()}) for i in range(n)]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def test_digits_npy_matches_the_device_runtime_row_by_row(sreg: Path, tmp_path: Path) -> None:
    x = digits_rows(300)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "scores.parquet"
    result = score(
        sreg, "digits", "1", tmp_path / "x.npy", out, workers=2, batch_size=64, partition_rows=70, progress=False
    )
    assert (result.rows, result.parts, result.skipped_parts) == (300, 5, 0)
    df = read_scores(out)
    assert df["row"].tolist() == list(range(300))  # input order kept
    probs = df[[f"probs_{i}" for i in range(10)]].to_numpy()
    expected = _one_by_one(_device(sreg, "digits"), {"pixels": x})["probs"]
    assert np.array_equal(probs, expected)
    assert df["top_class"].tolist() == expected.argmax(axis=1).tolist()
    assert np.array_equal(df["top_score"].to_numpy(), expected.max(axis=1))
    meta = read_metadata(out)
    assert meta is not None
    manifest = Manifest.load(sreg / "digits" / "1" / "manifest.json")
    assert (meta["model"], meta["version"], meta["engine"], meta["rows"]) == ("digits", "1", "local", 300)
    assert meta["artifact_sha256"] == manifest.sha256
    data = (tmp_path / "x.npy").read_bytes()  # the documented fingerprint: XXH3-128 over name, size and bytes
    assert (
        meta["input_fingerprint"] == "xxh3-128:" + xxhash.xxh3_128(f"x.npy\0{len(data)}\0".encode() + data).hexdigest()
    )
    assert not staging_dir(out).exists()
    groups = pq.read_metadata(out).row_group(0)  # scores and keys are plain: a dictionary of unique values is waste
    assert {
        groups.column(i).path_in_schema for i in range(groups.num_columns) if groups.column(i).has_dictionary_page
    } == {"top_class"}


def test_rerun_with_same_arguments_is_a_no_op(sreg: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", digits_rows(50))
    out = tmp_path / "s.parquet"
    score(sreg, "digits", "1", tmp_path / "x.npy", out, workers=1, progress=False)
    before = out.read_bytes()
    again = score(sreg, "digits", "1", tmp_path / "x.npy", out, workers=1, progress=False)
    assert again.skipped_parts == again.parts == 1 and out.read_bytes() == before


def test_maintenance_from_columns_and_feature_set_with_entity_key(sreg: Path, tmp_path: Path) -> None:
    df = live_frame(120)
    df.to_parquet(tmp_path / "live.parquet")
    out = tmp_path / "m.parquet"
    score(sreg, "maintenance", "1", tmp_path / "live.parquet", out, entity_key="asset_id", features="asset_features",
          workers=2, partition_rows=50, progress=False)  # fmt: skip
    got = read_scores(out)
    assert list(got.columns) == ["asset_id", "failure_prob"]  # no labels: not a classifier
    assert got["asset_id"].tolist() == df["asset_id"].tolist()
    bundle = FeatureRegistry(sreg).read("asset_features", "1")
    order = [list(bundle.entities).index(a) for a in df["asset_id"]]
    inputs = {"live": df[list(LIVE)].to_numpy(np.float32), "asset_features": bundle.values[order]}
    expected = _one_by_one(_device(sreg, "maintenance"), inputs)["failure_prob"][:, 0]
    assert np.array_equal(got["failure_prob"].to_numpy(), expected)


def test_csv_directory_and_map_give_the_same_rows(sreg: Path, tmp_path: Path) -> None:
    df = live_frame(90).rename(columns={"temperature": "t"})
    parts = tmp_path / "csvs"
    parts.mkdir()
    df.iloc[:40].to_csv(parts / "a.csv", index=False)
    df.iloc[40:].to_csv(parts / "b.csv", index=False)
    out = tmp_path / "m.parquet"
    mapping = {"live": ["t", "vibration", "pressure", "rpm"]}
    score(sreg, "maintenance", "1", parts, out, entity_key="asset_id", mapping=mapping, features="asset_features@1",
          workers=1, progress=False)  # fmt: skip
    single = tmp_path / "one.csv"
    df.to_csv(single, index=False)
    out2 = tmp_path / "m2.parquet"
    score(sreg, "maintenance", "1", single, out2, entity_key="asset_id", mapping=mapping, features="asset_features",
          workers=1, progress=False)  # fmt: skip
    assert read_scores(out).equals(read_scores(out2))


def test_npz_with_every_input_by_name(sreg: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    arrays = {"live": rng.normal(10, 3, (40, 4)).astype(np.float32), "asset_features": rng.uniform(0, 5, (40, 18))}
    np.savez(tmp_path / "m.npz", **arrays)
    out = tmp_path / "m.parquet"
    score(sreg, "maintenance", "1", tmp_path / "m.npz", out, workers=1, progress=False)
    expected = _one_by_one(_device(sreg, "maintenance"), arrays)["failure_prob"][:, 0]
    assert np.array_equal(read_scores(out)["failure_prob"].to_numpy(), expected)


def test_image_directory_decoded_like_the_agent_and_bad_files_left_out(sreg: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    names = write_images(images, digits_rows(12))
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "i.parquet"
    result = score(sreg, "digits", "1", images, out, workers=2, partition_rows=5, progress=False)
    assert result.undecodable == ["broken.png"] and result.rows == 12
    got = read_scores(out)
    assert got["file"].tolist() == names
    manifest = Manifest.load(sreg / "digits" / "1" / "manifest.json")
    tensors = np.concatenate([load_input_file(images / n, manifest)["pixels"] for n in names])
    expected = _one_by_one(_device(sreg, "digits"), {"pixels": tensors})["probs"]
    assert np.array_equal(got[[f"probs_{i}" for i in range(10)]].to_numpy(), expected)


def test_cli_publish_features_builds_a_set_that_features_build_reads_unchanged(
    sreg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live_frame(50).to_parquet(tmp_path / "live.parquet")  # 50 rows, one per asset
    out = tmp_path / "scores.parquet"
    args = ["score", "maintenance", "--version", "1", "--registry", str(sreg), "--input", str(tmp_path / "live.parquet"),
            "--output", str(out), "--entity-key", "asset_id", "--features", "asset_features", "--workers", "1",
            "--publish-features", "maintenance_scores", "--features-version", "1", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "maintenance_scores version 1" in capsys.readouterr().out
    published = FeatureRegistry(sreg).read("maintenance_scores", "1")
    assert published.info.feature_names == ("failure_prob",) and published.info.entity_key == "asset_id"
    scores = read_scores(out).set_index("asset_id")["failure_prob"]
    assert np.array_equal(published.values[:, 0], scores.loc[list(published.entities)].to_numpy())
    # `features build --from` takes the output as it is
    assert main(["features", "build", "again", "--version", "1", "--registry", str(sreg), "--from", str(out),
                 "--entity-key", "asset_id", "--no-progress"]) == 0  # fmt: skip
    again = FeatureRegistry(sreg).read("again", "1")
    assert np.array_equal(again.values, published.values)
    assert json.loads(pq.read_schema(out).metadata[b"edgefleet.score"])["rows"] == 50


def test_a_torn_or_short_partition_is_scored_again(sreg: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", digits_rows(300))
    reference, out = tmp_path / "reference.parquet", tmp_path / "o.parquet"
    score(sreg, "digits", "1", tmp_path / "x.npy", reference, workers=1, partition_rows=100, progress=False)

    def stop(parts: int, rows: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score(sreg, "digits", "1", tmp_path / "x.npy", out, workers=1, partition_rows=100, progress=False, on_part=stop)
    staging = staging_dir(out)
    for path in written(staging).values():
        path.unlink()
    part0 = pq.read_table(reference).slice(0, 100)
    write_part(staging, 0, part0)
    torn = local_part(staging, 0).read_bytes()[:-20]  # what a power cut can leave without fsync
    local_part(staging, 0).write_bytes(torn)
    write_part(staging, 1, part0.slice(0, 10))  # a complete footer, rows missing
    pq.write_table(part0, staging / "2_ray.parquet")  # Ray's kind of partition, torn too
    (staging / "2_ray.parquet").write_bytes((staging / "2_ray.parquet").read_bytes()[:-20])
    write_part(staging, 7, part0)  # not a partition of this run
    again = score(sreg, "digits", "1", tmp_path / "x.npy", out, workers=1, partition_rows=100, progress=False)
    assert again.skipped_parts == 0
    assert out.read_bytes() == reference.read_bytes()


class _SubChunk(ArrayChunk):
    """A subclass may do more in ``feeds()``: shipped as it is."""


def test_rows_in_files_are_mapped_by_the_workers_and_other_chunks_are_pickled(tmp_path: Path) -> None:
    x, keys = digits_rows(300), np.arange(300, dtype=np.int64)
    np.save(tmp_path / "x.npy", x)
    rows = StoredRows(str(tmp_path / "x.npy"), (tmp_path / "x.npy").stat().st_size - x.nbytes, x.shape)
    tasks: list[tuple[int, ArrayChunk]] = [
        (p, ArrayChunk(keys[a : a + 100], {}, {"pixels": rows.rows(a, a + 100)}))
        for p, a in enumerate(range(0, 300, 100))
    ]
    held = ArrayChunk(keys[:1], {"pixels": x[:1]})
    tasks += [(3, held), (4, _SubChunk(keys[:1], {}, {"pixels": rows.rows(0, 1)}))]  # held rows, a subclass
    shipped = mapped(tasks)
    assert shipped[3][1] is held and shipped[4][1] is tasks[4][1]  # shipped as they are (pickled)
    for (part, sent), (same, chunk) in zip(tasks[:3], shipped[:3], strict=True):
        assert isinstance(chunk, MappedChunk) and part == same and np.array_equal(chunk.keys, sent.keys)
        assert np.array_equal(chunk.feeds()["pixels"], sent.feeds()["pixels"])


def test_the_merge_appends_partitions_in_order_as_they_appear(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    staging = staging_dir(out)
    staging.mkdir()
    table = [pa.table({"row": np.arange(a, a + 3), "p": np.full(3, a, np.float32)}) for a in (0, 3, 6)]
    merger = Merger(out, 3, {"rows": 9})
    write_part(staging, 1, table[1])
    merger.advance(1)
    assert merger.next == 0  # partition 0 first
    write_part(staging, 0, table[0])
    merger.advance(0)  # and 1, reported before
    assert merger.next == 2 and not out.exists()
    with pytest.raises(InputError, match=r"partition 2 .* missing"):
        merger.finish()
    merger.close()
    assert [p.name for p in staging.iterdir() if p.name.startswith(".")] == []  # the temp file is gone
    merger = Merger(out, 3, {"rows": 9})
    write_part(staging, 2, table[2])
    assert merger.finish() == 9
    assert pq.read_table(out)["row"].to_pylist() == list(range(9)) and not staging.exists()
    assert read_metadata(out) == {"rows": 9}


def test_the_merge_joins_small_partitions_into_row_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parts, "ROW_GROUP_ROWS", 100)
    out = tmp_path / "o.parquet"
    staging_dir(out).mkdir()
    merger = Merger(out, 7, {"rows": 210})
    for part in range(7):
        write_part(staging_dir(out), part, pa.table({"row": np.arange(30 * part, 30 * part + 30)}))
        merger.advance(part)
    assert merger.finish() == 210
    meta = pq.read_metadata(out)
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [120, 90]  # 4 parts, then the rest
    assert pq.read_table(out)["row"].to_pylist() == list(range(210))


def test_plain_npz_members_are_mapped_where_they_lie_and_score_as_read_ones(sreg: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    live = rng.normal(10, 3, (300, 4)).astype(np.float32)  # the model's rows as they are: mapped in place
    assets = rng.uniform(0, 5, (300, 18))  # float64: converted into scratch rows
    np.savez(tmp_path / "plain.npz", live=live, asset_features=assets)
    np.savez_compressed(tmp_path / "packed.npz", live=live, asset_features=assets)
    manifest = Manifest.load(sreg / "maintenance" / "1" / "manifest.json")
    plain_rows = NumpyReader().read(tmp_path / "plain.npz", manifest, InputOptions(sreg, scratch=tmp_path / "s1"))
    plain = plain_rows.chunk(100, 200)
    assert isinstance(plain, ArrayChunk) and plain.arrays == {}
    assert plain.stored["live"].file == str(tmp_path / "plain.npz")  # mapped where it lies
    assert Path(plain.stored["asset_features"].file).parent == tmp_path / "s1"  # float64: converted, in scratch rows
    packed_rows = NumpyReader().read(tmp_path / "packed.npz", manifest, InputOptions(sreg, scratch=tmp_path / "s2"))
    packed = packed_rows.chunk(100, 200)
    assert isinstance(packed, ArrayChunk) and {Path(r.file).parent for r in packed.stored.values()} == {tmp_path / "s2"}
    [(_, worker_view)] = mapped([(1, plain)])
    assert isinstance(worker_view, MappedChunk)
    feeds = worker_view.feeds()
    assert np.array_equal(feeds["live"], live[100:200])
    assert np.array_equal(feeds["asset_features"], assets[100:200].astype(np.float32))
    plain_rows.close()
    packed_rows.close()
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()
    outs = [tmp_path / "plain.parquet", tmp_path / "packed.parquet"]
    for name, out in zip(["plain.npz", "packed.npz"], outs, strict=True):
        score(sreg, "maintenance", "1", tmp_path / name, out, workers=2, partition_rows=64, progress=False)
    assert pq.read_table(outs[0]).equals(pq.read_table(outs[1]))


def test_rows_already_in_the_file_are_checked_in_one_pass_and_never_held_by_the_driver(
    sreg: Path, tmp_path: Path
) -> None:
    """A plain float32 .npy/.npz is fingerprinted and checked a block at a time: the driver's peak stays far
    below the file's size, the chunks only say where the rows lie, and the fingerprint is the documented one."""
    x = digits_rows(40_000)  # 10 MB
    np.save(tmp_path / "x.npy", x)
    rng = np.random.default_rng(4)
    live, assets = rng.normal(10, 3, (5_000, 4)).astype(np.float32), rng.uniform(0, 5, (5_000, 18)).astype(np.float32)
    np.savez(tmp_path / "m.npz", live=live, asset_features=assets)
    for name, path, arrays in (("digits", tmp_path / "x.npy", {"pixels": x}),
                               ("maintenance", tmp_path / "m.npz", {"live": live, "asset_features": assets})):  # fmt: skip
        manifest = Manifest.load(sreg / name / "1" / "manifest.json")
        tracemalloc.start()
        try:
            rows = NumpyReader().read(path, manifest, InputOptions(sreg))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 3 << 20, f"the driver held {peak:,} bytes reading {path.stat().st_size:,}"
        assert rows.fingerprint == fingerprint([path], path)
        chunk = rows.chunk(1_000, 2_000)
        assert isinstance(chunk, ArrayChunk) and chunk.arrays == {} and set(chunk.stored) == set(arrays)
        assert chunk.keys == RowNumbers(1_000, 2_000) and rows.keys == RowNumbers(
            0, len(x if name == "digits" else live)
        )
        feeds = chunk.feeds()
        assert all(np.array_equal(feeds[k], v[1_000:2_000].reshape(feeds[k].shape)) for k, v in arrays.items())
        assert chunk.loaded().stored == {} and chunk.loaded().feeds().keys() == feeds.keys()  # what Ray is sent


def overlapping_npz(path: Path, live: np.ndarray, assets: np.ndarray) -> np.ndarray:
    """A crafted .npz whose ``live.npy`` member (local header, .npy header, rows) lies inside the bytes of
    ``asset_features.npy``, its rows on the same float32 grid; returns ``asset_features`` as stored."""

    def npy(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, arr, version=(1, 0))
        return buf.getvalue()

    def local(name: bytes, size: int) -> bytes:
        return struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, size, size, len(name), 0) + name

    def central(name: bytes, size: int, offset: int) -> bytes:
        fields = (20, 20, 0, 0, 0, 0, 0, size, size, len(name), 0, 0, 0, 0, 0, offset)
        return struct.pack("<4s6H3I5H2I", b"PK\x01\x02", *fields) + name

    live_npy = npy(live)
    inner = local(b"live.npy", len(live_npy)) + live_npy
    head_a = npy(assets)[: -assets.nbytes]
    data = bytearray(assets.tobytes())
    at = (-(len(inner) - live.nbytes)) % 4 + 8  # live's rows start on a multiple of 4 bytes into the data
    data[at : at + len(inner)] = inner
    outer = local(b"asset_features.npy", len(head_a) + len(data)) + head_a
    body = outer + bytes(data)
    cd = central(b"asset_features.npy", len(head_a) + len(data), 0)
    cd += central(b"live.npy", len(live_npy), len(outer) + at)
    eocd = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 2, 2, len(cd), len(body), 0)
    path.write_bytes(body + cd + eocd)
    return np.frombuffer(bytes(data), np.float32).reshape(assets.shape)


def test_npz_members_that_overlap_are_not_read_in_one_pass(sreg: Path, tmp_path: Path) -> None:
    """Only a crafted .npz has members that share bytes; the one-pass check would hash and check a wrong
    sequence of bytes there, so the reader loads them one by one: the documented fingerprint, the rows as stored."""
    rng = np.random.default_rng(5)
    live, assets = rng.normal(10, 3, (50, 4)).astype(np.float32), rng.uniform(0, 5, (50, 18)).astype(np.float32)
    stored = overlapping_npz(tmp_path / "m.npz", live, assets)
    assert np.isfinite(stored).all() and not np.array_equal(stored, assets)  # live's bytes are inside it
    manifest = Manifest.load(sreg / "maintenance" / "1" / "manifest.json")
    rows = NumpyReader().read(tmp_path / "m.npz", manifest, InputOptions(sreg))
    assert rows.fingerprint == fingerprint([tmp_path / "m.npz"], tmp_path / "m.npz")
    feeds = rows.chunk(0, 50).feeds()
    assert np.array_equal(feeds["live"], live) and np.array_equal(feeds["asset_features"], stored)
