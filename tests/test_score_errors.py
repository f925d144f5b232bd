"""Every bad input to ``cloud-batch score`` is ``error: ...`` with exit 2 before any work: no output, no partitions."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cloud_batch.cli.main import main
from cloud_batch.features.build import write_snapshot
from cloud_batch.features.tables import FeatureTable
from cloud_batch.score.parts import scratch_dir, staging_dir
from tests.support.score import N_ASSETS, asset_feature_names, digits_rows, live_frame, score_registry, write_images

Setup = Callable[[Path], tuple[Path, list[str]]]  # tmp -> (input, extra args)


@pytest.fixture(scope="module")
def sreg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return score_registry(tmp_path_factory.mktemp("score-errors") / "registry")


def _table(tmp: Path, df: pd.DataFrame, name: str = "live.parquet") -> Path:
    path = tmp / name
    df.to_csv(path, index=False) if name.endswith(".csv") else df.to_parquet(path)
    return path


def _maint(df: pd.DataFrame, *extra: str, name: str = "live.parquet") -> Setup:
    return lambda tmp: (_table(tmp, df, name), ["--entity-key", "asset_id", "--features", "asset_features", *extra])


def _with_nan() -> pd.DataFrame:
    df = live_frame(30)
    df.loc[16, "vibration"] = np.nan
    return df


def _images(tmp: Path) -> tuple[Path, list[str]]:
    write_images(tmp / "imgs", digits_rows(3))
    (tmp / "imgs" / "zz-bad.jpg").write_bytes(b"not a jpeg")
    return tmp / "imgs", ["--strict"]


CASES: dict[str, tuple[str, Setup, str]] = {
    "missing columns, named": (
        "maintenance", _maint(live_frame(10).drop(columns=["rpm", "pressure"])), "missing columns 'pressure', 'rpm'"),
    "non-numeric column": (
        "maintenance", _maint(live_frame(10).assign(rpm="fast")), "not numeric (input 'live')"),
    "NaN names row and column": (
        "maintenance", _maint(_with_nan()), "NaN in row 17, column 'vibration'"),
    "empty table": (
        "maintenance", _maint(live_frame(0), name="empty.csv"), "is empty: no rows to score"),
    "unknown model": (
        "nope", _maint(live_frame(5)), "model 'nope' is not in the registry"),
    "unknown feature set version": (
        "maintenance", _maint(live_frame(5), "--features", "asset_features@9"), "has no version '9'"),
    "entity missing from the feature set": (
        "maintenance", _maint(live_frame(5, assets=80).iloc[[0, 1]].assign(asset_id=["asset-0", "asset-77"])),
        "1 entity not in feature set asset_features 1: 'asset-77' (first in row 2)"),
    "joined input without --features": (
        "maintenance", lambda tmp: (_table(tmp, live_frame(5)), []), "give --features asset_features[@VERSION]"),
    "--map of an unknown input": (
        "maintenance", _maint(live_frame(5), "--map", "speed=rpm"), "--map names unknown inputs 'speed'"),
    "--map syntax": ("maintenance", _maint(live_frame(5), "--map", "live"), "expected INPUT=COL1,COL2"),
    "npy of the wrong shape": (
        "digits", lambda tmp: (_npy(tmp, np.zeros((4, 7), np.float32)), []), "do not fit input 'pixels'"),
    "npy with NaN": (
        "digits", lambda tmp: (_npy(tmp, np.where(np.arange(64) == 9, np.nan, 1.0).reshape(1, 8, 8, 1)), []),
        "NaN in row 1, column element 9"),
    "float32 npy with an infinity (read in place, then named)": (
        "digits", lambda tmp: (_npy(tmp, _with_inf(digits_rows(3))), []), "an infinite value in row 3, column element 28"),
    "npy header with a NUL byte": ("digits", lambda tmp: (_nul_header_npy(tmp), []), "cannot read"),
    "npz member shorter than its header": ("digits", lambda tmp: (_short_npz(tmp), []), "cannot read"),
    "npz member that is not an array": ("digits", lambda tmp: (_zip(tmp, "pixels", b"not an array"), []), "not an .npy array"),
    "npz member with corrupt compressed data": (
        "digits", lambda tmp: (_zip(tmp, "pixels.npy", _npy_bytes(digits_rows(4)), zipfile.ZIP_DEFLATED, corrupt=True), []), "cannot read"),
    "npz member of Python objects": (
        "digits", lambda tmp: (_npz(tmp, pixels=np.array([None] * 3, dtype=object)), []), "cannot read"),
    "undecodable image under --strict": ("digits", _images, "1 of 4 images in"),
    "input not found": ("digits", lambda tmp: (tmp / "none.npy", []), "input not found"),
    "output not Parquet": ("digits", lambda tmp: (_npy(tmp, digits_rows(2)), ["--output", str(tmp / "o.csv")]),
                           "ending in .parquet"),
    "--publish-features without its version": (
        "digits", lambda tmp: (_npy(tmp, digits_rows(2)), ["--publish-features", "s"]), "needs --features-version"),
    "--publish-features with repeated keys": (
        "maintenance", _maint(live_frame(60), "--publish-features", "s", "--features-version", "1"), "10 keys repeat"),
}  # fmt: skip


def _with_inf(rows: np.ndarray) -> np.ndarray:
    assert rows.dtype == np.float32  # the model's rows as they are: the one-pass check finds it, the load names it
    rows[2, 3, 4, 0] = np.inf
    return rows


def _npy(tmp: Path, arr: np.ndarray) -> Path:
    np.save(tmp / "x.npy", arr)
    return tmp / "x.npy"


def _npz(tmp: Path, **arrays: np.ndarray) -> Path:
    np.savez(tmp / "x.npz", **arrays)  # type: ignore[arg-type]
    return tmp / "x.npz"


def _zip(tmp: Path, name: str, data: bytes, method: int = zipfile.ZIP_STORED, corrupt: bool = False) -> Path:
    with zipfile.ZipFile(tmp / "x.npz", "w", method) as zf:
        zf.writestr(name, data)
    if corrupt:  # garble the deflate stream (zlib.error), past the 30-byte header and the name
        raw = bytearray((tmp / "x.npz").read_bytes())
        raw[30 + len(name) + 5 : 30 + len(name) + 13] = b"\xff" * 8
        (tmp / "x.npz").write_bytes(bytes(raw))
    return tmp / "x.npz"


def _npy_bytes(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, arr)
    return out.getvalue()


def _nul_header_npy(tmp: Path) -> Path:
    """A NUL byte in the header: numpy's fallback tokenizer raises TokenError on Python 3.12+."""
    head = bytearray(_npy_bytes(digits_rows(2)))
    head[20] = 0
    (tmp / "x.npy").write_bytes(bytes(head))
    return tmp / "x.npy"


def _short_npz(tmp: Path) -> Path:
    """A plain (stored, read in place) member whose .npy header promises 100 rows, with 2 rows of data."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (100, 8, 8, 1)})
    return _zip(tmp, "pixels.npy", head.getvalue() + digits_rows(2).tobytes())


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_before_any_work(
    case: str, sreg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, setup, message = CASES[case]
    source, extra = setup(tmp_path)
    out = tmp_path / "out.parquet"
    args = ["score", model, "--version", "1", "--registry", str(sreg), "--input", str(source), "--output", str(out),
            "--workers", "1", "--no-progress", *extra]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert not out.exists() and not staging_dir(out).exists() and not scratch_dir(out).exists()


def test_a_feature_set_that_lacks_joined_features_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = score_registry(tmp_path / "registry")
    names = asset_feature_names(reg)
    thin = FeatureTable(
        entities=np.array([f"asset-{i}" for i in range(N_ASSETS)]), event_ts=np.full(N_ASSETS, 1.7e9),
        values=np.ones((N_ASSETS, 5), np.float32), features=tuple(names[:5]), entity_key="asset_id",
    )  # fmt: skip
    write_snapshot(reg, "asset_features", "2", thin)
    source = _table(tmp_path, live_frame(5))
    out = tmp_path / "out.parquet"
    args = ["score", "maintenance", "--version", "1", "--registry", str(reg), "--input", str(source), "--output",
            str(out), "--entity-key", "asset_id", "--features", "asset_features@2", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"feature set asset_features 2 lacks features '{names[5]}'" in err and "Traceback" not in err, err
    assert not out.exists() and not staging_dir(out).exists()


def test_unknown_version_lists_the_known_ones(sreg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "x.npy", digits_rows(2))
    args = ["score", "digits", "--version", "7", "--registry", str(sreg), "--input", str(tmp_path / "x.npy"),
            "--output", str(tmp_path / "o.parquet"), "--no-progress"]  # fmt: skip
    assert main(args) == 2
    assert "model 'digits' has no version '7'" in capsys.readouterr().err


def test_output_from_other_arguments_needs_overwrite(
    sreg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "a.npy", digits_rows(20, seed=1))
    np.save(tmp_path / "b.npy", digits_rows(20, seed=2))
    out = tmp_path / "o.parquet"
    base = ["score", "digits", "--version", "1", "--registry", str(sreg), "--output", str(out), "--workers", "1",
            "--no-progress"]  # fmt: skip
    assert main([*base, "--input", str(tmp_path / "a.npy")]) == 0
    first = out.read_bytes()
    assert main([*base, "--input", str(tmp_path / "b.npy")]) == 2
    assert "written with other arguments (input_fingerprint" in capsys.readouterr().err
    assert out.read_bytes() == first
    assert main([*base, "--input", str(tmp_path / "b.npy"), "--overwrite"]) == 0
    assert out.read_bytes() != first
    (tmp_path / "plain.parquet").write_bytes(b"not parquet")
    plain = [a if a != str(out) else str(tmp_path / "plain.parquet") for a in base]
    assert main([*plain, "--input", str(tmp_path / "a.npy")]) == 2
    assert "is not a score output" in capsys.readouterr().err


def test_undecodable_images_are_counted_and_listed_without_strict(
    sreg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, _ = _images(tmp_path)
    args = ["score", "digits", "--version", "1", "--registry", str(sreg), "--input", str(source),
            "--output", str(tmp_path / "o.parquet"), "--workers", "1", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "left out 1 undecodable images: zz-bad.jpg" in capsys.readouterr().out
