"""Recipes: feature tables computed from raw history by the batch job (``--recipe NAME``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cloud_batch.errors import InputError, RegistryError
from cloud_batch.features.tables import FeatureTable, no_missing, read_table
from cloud_batch.progress import Reporter
from cloud_batch.registry.models import Registry

Recipe = Callable[..., FeatureTable]


def maintenance_recipe(
    *,
    history: str | Path | pd.DataFrame | None = None,
    as_of: str | pd.Timestamp | None = None,
    seed: int = 0,
    n_assets: int = 200,
    days: int = 60,
    registry_dir: str | Path | None = None,
    reporter: Reporter | None = None,
) -> FeatureTable:
    """Per-asset aggregates (``train.maintenance.features.asset_features``) of a sensor history.

    The history is ``history`` (a frame, CSV or Parquet with ``train.maintenance.data``'s columns) or,
    without it, ``train.maintenance.data.generate(n_assets, days, seed)`` (the defaults are the data
    the shipped maintenance model was trained on). ``as_of`` defaults to the newest reading and
    is every row's event time. When ``registry_dir`` holds a ``maintenance`` model, its
    ``asset_features`` feature names must be the recipe's.
    """
    from cloud_batch.train.maintenance.data import generate
    from cloud_batch.train.maintenance.features import FEATURE_NAMES, asset_features

    reporter = reporter or Reporter(enabled=False)
    if registry_dir is not None:
        _check_model_features(registry_dir, FEATURE_NAMES)
    if history is None:
        reporter.status(f"generating the synthetic history: {n_assets} assets x {days} days (seed {seed})")
        df = generate(n_assets=n_assets, days=days, seed=seed)
        source = f"recipe maintenance: maintenance_data.generate(n_assets={n_assets}, days={days}, seed={seed})"
    elif isinstance(history, pd.DataFrame):
        df, source = history, "recipe maintenance: the given history"
    else:
        df = read_table(history, text_columns=("asset_id", "event"), progress=reporter.enabled)
        source = f"recipe maintenance: {history}"
        if "timestamp" in df.columns:
            try:
                ts = pd.to_datetime(df["timestamp"], format="ISO8601")
            except (ValueError, TypeError) as exc:
                raise InputError(f"{history}: column 'timestamp' is not ISO-8601 times: {exc}") from exc
            df["timestamp"] = ts.dt.tz_convert("UTC").dt.tz_localize(None) if ts.dt.tz is not None else ts
        if "event" in df.columns:
            df["event"] = df["event"].fillna("")
    if "timestamp" not in df.columns:
        raise InputError("sensor history lacks columns ['timestamp']")
    if as_of is None:
        as_of_ts = pd.Timestamp(df["timestamp"].max())
    else:
        try:
            as_of_ts = pd.Timestamp(as_of)
        except (ValueError, TypeError) as exc:
            raise InputError(f"--as-of {as_of!r} is not a time (e.g. 2024-02-29T23:00)") from exc
        if as_of_ts.tzinfo is not None:
            as_of_ts = as_of_ts.tz_convert("UTC").tz_localize(None)
    reporter.status(f"computing asset_features as of {as_of_ts} over {len(df):,} readings")
    feats = asset_features(df, as_of_ts)
    if tuple(feats.columns) != FEATURE_NAMES:  # asset_features promises this; a device depends on it
        raise InputError(f"asset_features returned columns {list(feats.columns)}, expected {list(FEATURE_NAMES)}")
    entities = np.array([str(i) for i in feats.index], dtype=str)
    epoch = float((as_of_ts.tz_localize("UTC") - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1))
    values = feats.to_numpy(dtype=np.float32)
    no_missing(values, entities, FEATURE_NAMES, source, "missing value (NaN)")
    return FeatureTable(
        entities,
        np.full(len(entities), epoch, dtype="<f8"),
        values,
        FEATURE_NAMES,
        "asset_id",
        "float32",
        True,
        f"{source}, as of {as_of_ts}",
    )


def _check_model_features(registry_dir: str | Path, names: Sequence[str]) -> None:
    """A registered maintenance model must take exactly these features, in this order."""
    registry = Registry(registry_dir)
    try:
        latest = registry.latest("maintenance")
        if latest is None:
            return
        expected = registry.manifest("maintenance", latest).extra.get("feature_names", {}).get("asset_features")
    except (RegistryError, AttributeError):
        return  # no readable maintenance model: nothing to check against
    if expected is not None and list(expected) != list(names):
        raise InputError(
            f"the recipe's features {list(names)} are not the asset_features the registered maintenance "
            f"model {latest} expects ({list(expected)}); devices would feed it the wrong columns"
        )


RECIPES: dict[str, Recipe] = {"maintenance": maintenance_recipe}
