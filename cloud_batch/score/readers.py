"""The readers ``cloud-batch score`` knows, tried in order; a new kind of input (video) is one more entry."""

from __future__ import annotations

from pathlib import Path

from cloud_batch.errors import InputError
from cloud_batch.score.images import ImageReader
from cloud_batch.score.inputs import InputOptions, InputRows, Reader
from cloud_batch.score.npfiles import NumpyReader
from cloud_batch.score.tabular import TableReader
from cloud_batch.score.video import VideoReader
from edge_agent.wire.model.manifest import Manifest


def readers() -> list[Reader]:
    """Every reader, in the order they are tried."""
    return [TableReader(), NumpyReader(), ImageReader(), VideoReader()]


def open_input(path: str | Path, manifest: Manifest, options: InputOptions) -> InputRows:
    """Read and check ``path`` for ``manifest``'s model with the first reader that takes it."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"input not found: {p}")
    for reader in readers():
        if reader.matches(p):
            return reader.read(p, manifest, options)
    if p.is_dir():
        raise InputError(f"{p} holds no Parquet/CSV files, no images and no videos")
    raise InputError(f"unsupported input {p}: use Parquet/CSV files, .npy/.npz, a directory of images or videos")
