"""A directory of images for an image model, decoded with OpenCV exactly as ``edge-agent predict`` does.

Rows are the directory's image files in name order, keyed by file name (column ``file``). Before
any scoring, every file is test-decoded (threads; OpenCV releases the GIL): files it cannot decode
are counted and listed, then left out, or refused under ``--strict``. Workers decode their chunk
with ``edge_agent.inference.preprocess.load_input_file``, the agent's own path, so the tensors are
the device's tensors.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloud_batch.errors import InputError
from cloud_batch.score.inputs import InputOptions, InputRows, fingerprint, shown
from edge_agent.errors import RequestError
from edge_agent.inference.preprocess import IMAGE_SUFFIXES, load_input_file
from edge_agent.wire.model.manifest import Manifest

KEY = "file"


@dataclass
class ImageChunk:
    """Image files to decode and preprocess in the worker."""

    keys: np.ndarray
    root: str
    manifest: Manifest

    def feeds(self) -> dict[str, np.ndarray]:
        name = self.manifest.inputs[0].name
        tensors = []
        for rel in self.keys.tolist():
            try:
                tensors.append(load_input_file(os.path.join(self.root, rel), self.manifest)[name])
            except RequestError as exc:
                raise InputError(f"{rel}: {exc}") from exc
        return {name: np.concatenate(tensors)}


def _decodes(path: Path) -> bool:
    import cv2

    # A reduced decode is enough to know OpenCV can read the file, at a fraction of the cost.
    return cv2.imread(str(path), cv2.IMREAD_REDUCED_GRAYSCALE_4) is not None


class ImageReader:
    """A directory of image files (``.png``, ``.jpg``, ...), not recursive."""

    kind = "images"

    def matches(self, path: Path) -> bool:
        return path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())

    def read(self, path: Path, manifest: Manifest, options: InputOptions) -> InputRows:
        if options.entity_key or options.mapping or options.features:
            raise InputError(
                "--entity-key, --map and --features apply to tabular inputs; images are keyed by file name"
            )
        if manifest.preprocessing.get("kind") != "image" or len(manifest.inputs) != 1:
            raise InputError(f"{manifest.name} is not an image model (no image preprocessing in its manifest)")
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
            ok = list(pool.map(_decodes, files))
        bad = [f.name for f, good in zip(files, ok, strict=True) if not good]
        if bad and options.strict:
            raise InputError(f"{len(bad)} of {len(files)} images in {path} cannot be decoded: {shown(bad)}")
        keep = [f for f, good in zip(files, ok, strict=True) if good]
        if not keep:
            raise InputError(f"{path}: none of its {len(files)} images can be decoded: {shown(bad)}")
        keys = np.array([f.name for f in keep], dtype=str)
        root, fp = str(path), fingerprint(files, path)

        def slicer(start: int, stop: int) -> ImageChunk:
            return ImageChunk(keys[start:stop], root, manifest)

        return InputRows(self.kind, len(keys), KEY, keys, fp, slicer, skipped=bad)
