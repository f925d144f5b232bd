"""Registries and datasets for the ``cloud-batch score`` tests: the shipped models, seeded rows, images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from cloud_batch.features.build import FeatureRegistry, write_snapshot
from cloud_batch.features.tables import FeatureTable
from tests.support.env import MODELS

LIVE = ("temperature", "vibration", "pressure", "rpm")
N_ASSETS = 50


def score_registry(root: Path) -> Path:
    """A registry with the shipped digits 1 and maintenance 1, and an ``asset_features`` set version 1."""
    for name in ("digits", "maintenance"):
        shutil.copytree(MODELS / name / "1", root / name / "1")
    features = asset_feature_names(root)
    rng = np.random.default_rng(3)
    table = FeatureTable(
        entities=np.array([f"asset-{i}" for i in range(N_ASSETS)]),
        event_ts=np.full(N_ASSETS, 1.7e9),
        values=rng.uniform(0, 5, (N_ASSETS, len(features))).astype(np.float32),
        features=tuple(features),
        entity_key="asset_id",
    )
    write_snapshot(root, "asset_features", "1", table)
    assert FeatureRegistry(root).versions("asset_features") == ["1"]
    return root


def asset_feature_names(root: Path) -> list[str]:
    import json

    manifest = json.loads((root / "maintenance" / "1" / "manifest.json").read_text())
    return list(manifest["feature_joins"]["asset_features"]["features"])


def digits_rows(n: int, seed: int = 0) -> np.ndarray:
    """``n`` digit-like inputs [n, 8, 8, 1] in the model's raw range 0..16 (float32)."""
    return np.random.default_rng(seed).uniform(0, 16, (n, 8, 8, 1)).astype(np.float32)


def live_frame(n: int, seed: int = 1, assets: int = N_ASSETS) -> pd.DataFrame:
    """``n`` rows of live sensor readings with an ``asset_id``, rows cycling over the assets."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "asset_id": [f"asset-{i % assets}" for i in range(n)],
            "temperature": rng.normal(70, 5, n),
            "vibration": rng.normal(1, 0.2, n),
            "pressure": rng.normal(30, 2, n),
            "rpm": rng.normal(1500, 50, n),
        }
    )


def write_images(directory: Path, pixels: np.ndarray) -> list[str]:
    """Each [8, 8, 1] row (0..16) as a grayscale PNG the digits preprocessing maps back; returns the names."""
    import cv2

    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(pixels):
        gray = (255 - np.rint(img[..., 0] * 255 / 16)).astype(np.uint8)  # the manifest inverts
        name = f"img-{i:04d}.png"
        cv2.imwrite(str(directory / name), gray)
        names.append(name)
    return names


def read_scores(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()
