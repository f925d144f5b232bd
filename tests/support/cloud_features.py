"""Inputs for the ``cloud-batch features build`` / ``features push`` tests: per-camera frames, CSVs, argv.

``frame`` makes per-camera stats whose rows depend only on the camera, so versions differ only where
asked; ``build_csv`` builds a version from one; ``push_argv`` is the CLI's push of version 1.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from cloud_batch.features.build import build

FLEET = "plant-7"
SET = "cam_stats"


NOW = 1_790_000_000.0


def frame(n: int = 6, *, shift: float = 0.0, drop: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Per-camera stats; each row depends only on its camera's number, so versions differ only where asked."""
    ids = [f"cam-{i}" for i in range(n) if f"cam-{i}" not in drop] + list(extra)
    num = np.array([int(i.split("-")[1]) for i in ids])
    return pd.DataFrame(
        {
            "camera": ids,
            "fps_mean": (10 + (num * 7.3) % 20).round(3) + shift,
            "dropped_frames": (num * 37) % 100,
            "computed_at": [f"2026-11-0{1 + k % 9}T12:00:00Z" for k in num],
        }
    )


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path, index=False)
    return path


def build_csv(reg: Path, version: str, df: pd.DataFrame, tmp: Path, **kw):
    src = write_csv(df, tmp / f"in-{version}-{uuid.uuid4().hex[:6]}.csv")
    return build(reg, SET, version, source=src, entity_key="camera", event_ts_col="computed_at", progress=False, **kw)


def push_argv(reg: Path, key_files: tuple[Path, Path], url: str, *extra: str) -> list[str]:
    """``cloud-batch features push`` of version 1 to the test fleet, plus ``extra`` options."""
    where = ["--fleet", FLEET, "--registry", str(reg), "--key", str(key_files[0]), "--broker", url]
    return ["features", "push", SET, "--version", "1", *where, *extra]
