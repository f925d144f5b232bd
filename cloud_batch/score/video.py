"""Videos for an image model: a video file or a directory of videos, one row per frame.

Rows are every frame of each video (files in name order), keyed ``<file>#<frame index>`` (column
``frame``). The driver counts each file's frames by demuxing it once (container frame counts are
not reliable) and refuses a file OpenCV cannot read. Workers decode their chunk with
``edge_agent.streams.video.video_frames`` and turn each frame into the model's input with
``streams.runner.frame_input``; after the batched ``predict``, ``results`` postprocesses each row
with ``frame_result`` into the ``result`` column (JSON: boxes or classes in source pixels). These
are the functions ``edge-agent predict --video`` and the streams use, so the cloud and the device
give the same boxes for the same frames.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud_batch.errors import InputError
from cloud_batch.score.inputs import InputOptions, InputRows, fingerprint, shown
from edge_agent.errors import EdgeError
from edge_agent.inference.preprocess import Geometry
from edge_agent.streams.runner import frame_input, frame_result
from edge_agent.streams.video import VIDEO_SUFFIXES, video_frames
from edge_agent.wire.model.manifest import Manifest

KEY = "frame"
RESULT = "result"


def frames_in(path: Path) -> int:
    """Frames OpenCV can read from ``path`` (0: none, or not a video)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    n = 0
    try:
        while cap.isOpened() and cap.grab():
            n += 1
    finally:
        cap.release()
    return n


@dataclass
class VideoChunk:
    """Frames to decode and preprocess in the worker; ``results`` postprocesses the scored rows."""

    keys: np.ndarray
    root: str
    manifest: Manifest
    geometries: list[Geometry] = field(default_factory=list)

    def feeds(self) -> dict[str, np.ndarray]:
        wanted: dict[str, list[int]] = {}
        for key in self.keys.tolist():
            name, _, index = key.rpartition("#")
            wanted.setdefault(name, []).append(int(index))
        tensors: list[dict[str, np.ndarray]] = []
        self.geometries = []
        for name, indices in wanted.items():
            chosen, got = set(indices), 0
            path = Path(self.root) / name if Path(self.root).is_dir() else Path(self.root)
            try:
                for index, _, image in video_frames(path, start=min(indices)):
                    if index in chosen:
                        feeds, geometry = frame_input(self.manifest, image)
                        tensors.append(feeds)
                        self.geometries.append(geometry)
                        got += 1
                    if index >= max(indices):
                        break
            except EdgeError as exc:
                raise InputError(f"{name}: {exc}") from exc
            if got != len(chosen):
                raise InputError(f"{name}: {len(chosen) - got} of its frames are no longer readable")
        return {k: np.concatenate([t[k] for t in tensors]) for k in tensors[0]}

    def results(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """The ``result`` column: each row's outputs (real values, flattened) postprocessed, as JSON."""
        specs = {s.name: s for s in self.manifest.outputs}
        rows = []
        for i, geometry in enumerate(self.geometries):
            one = {k: v[i].reshape(1, *[d if d > 0 else 1 for d in specs[k].shape[1:]]) for k, v in outputs.items()}
            rows.append(json.dumps(frame_result(self.manifest, one, geometry), separators=(",", ":")))
        return np.array(rows, dtype=object)


class VideoReader:
    """A video file (``.avi``, ``.mp4``, ...) or a directory of them, not recursive."""

    kind = "video"

    def matches(self, path: Path) -> bool:
        if path.is_file():
            return path.suffix.lower() in VIDEO_SUFFIXES
        return path.is_dir() and any(p.suffix.lower() in VIDEO_SUFFIXES for p in path.iterdir())

    def read(self, path: Path, manifest: Manifest, options: InputOptions) -> InputRows:
        if options.entity_key or options.mapping or options.features:
            raise InputError("--entity-key, --map and --features apply to tabular inputs; video frames are keyed")
        if manifest.preprocessing.get("kind") != "image" or len(manifest.inputs) != 1:
            raise InputError(f"{manifest.name} is not an image model (no image preprocessing in its manifest)")
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        with ThreadPoolExecutor(max_workers=4) as pool:
            counts = list(pool.map(frames_in, files))
        bad = [f.name for f, n in zip(files, counts, strict=True) if n == 0]
        if bad:
            raise InputError(f"{len(bad)} of {len(files)} videos in {path} cannot be decoded: {shown(bad)}")
        keys = np.array([f"{f.name}#{i}" for f, n in zip(files, counts, strict=True) for i in range(n)], dtype=str)
        root, fp = str(path), fingerprint(files, path)

        def slicer(start: int, stop: int) -> VideoChunk:
            return VideoChunk(keys[start:stop], root, manifest)

        return InputRows(self.kind, len(keys), KEY, keys, fp, slicer)


def result_column(chunk: Any, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The scorer's hook: a ``result`` column for chunks that postprocess (videos), else nothing."""
    results = getattr(chunk, "results", None)
    return {RESULT: results(outputs)} if results is not None else {}
