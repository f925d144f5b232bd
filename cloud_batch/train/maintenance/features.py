"""Per-asset features for predictive maintenance, computed from raw sensor history.

These are the ``asset_features`` input of the ``maintenance`` model. They live in their own
module (no TensorFlow import) because the same function must feed both training and,
later, the feature store that pushes each asset's current aggregates to its device: a
model is only as good as the agreement between the features it was trained on and the
ones it is served with.

The history frame has the columns written by ``maintenance.data.generate``: ``asset_id``,
``timestamp``, the sensors in ``LIVE_FEATURES`` and ``event`` (``""``, ``"maintenance"``,
``"failure"``). ``asset_id`` is categorical, so every ``groupby`` says ``observed=True`` (pandas 3's
default): an asset with no reading at or before ``as_of`` gets no row on pandas 2 (Python 3.10) either.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cloud_batch.errors import InputError

LIVE_FEATURES: tuple[str, ...] = ("temperature", "vibration", "pressure", "rpm")

# The order is the column order of the model's ``asset_features`` input: append, never reorder.
FEATURE_NAMES: tuple[str, ...] = (
    "temperature_mean_24h",
    "temperature_std_24h",
    "temperature_mean_7d",
    "temperature_std_7d",
    "vibration_mean_24h",
    "vibration_std_24h",
    "vibration_mean_7d",
    "vibration_std_7d",
    "vibration_trend_7d",  # least-squares slope, mm/s per day
    "pressure_mean_24h",
    "pressure_std_24h",
    "rpm_mean_24h",
    "rpm_std_24h",
    "temperature_excursions_7d",  # readings at or above EXCURSION_C
    "maintenance_count_30d",
    "failure_count_30d",
    "days_since_maintenance",
    "days_since_failure",
)

EXCURSION_C = 80.0
_REQUIRED = ("asset_id", "timestamp", "event", *LIVE_FEATURES)
DAY = pd.Timedelta("1D")


def _check(df: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    missing = [c for c in _REQUIRED if c not in df.columns]
    if missing:
        raise InputError(f"sensor history lacks columns {missing}")
    hist = df[df["timestamp"] <= as_of]
    if hist.empty:
        raise InputError(f"no readings at or before {as_of}")
    return hist


def _since(hist: pd.DataFrame, kind: str, as_of: pd.Timestamp, first: pd.Series) -> pd.Series:
    """Days since the last ``kind`` event; since the first reading when there was none (a lower bound)."""
    last = hist.loc[hist["event"] == kind].groupby("asset_id", observed=True)["timestamp"].max()
    when = last.reindex(first.index).fillna(first)
    return (as_of - when) / DAY


def asset_features(df: pd.DataFrame, as_of: pd.Timestamp | str) -> pd.DataFrame:
    """Aggregates of each asset's history up to and including ``as_of``, indexed by ``asset_id``.

    Windows end at ``as_of`` (24 hours, 7 days, 30 days for event counts). Columns are
    ``FEATURE_NAMES``, float32, no NaN: a window with a single reading has std 0.
    """
    as_of = pd.Timestamp(as_of)
    hist = _check(df, as_of)
    w7 = hist[hist["timestamp"] > as_of - 7 * DAY]
    w24 = w7[w7["timestamp"] > as_of - DAY]
    first = hist.groupby("asset_id", observed=True)["timestamp"].min()
    out = pd.DataFrame(index=first.index)

    g24 = w24.groupby("asset_id", observed=True)[list(LIVE_FEATURES)]
    g7 = w7.groupby("asset_id", observed=True)[["temperature", "vibration"]]
    m24, s24, m7, s7 = g24.mean(), g24.std(), g7.mean(), g7.std()
    for col in ("temperature", "vibration"):
        out[f"{col}_mean_24h"] = m24[col]
        out[f"{col}_std_24h"] = s24[col]
        out[f"{col}_mean_7d"] = m7[col]
        out[f"{col}_std_7d"] = s7[col]
    for col in ("pressure", "rpm"):
        out[f"{col}_mean_24h"] = m24[col]
        out[f"{col}_std_24h"] = s24[col]

    # Vibration trend: slope of a straight-line fit over the last 7 days (per asset, vectorised).
    t = (w7["timestamp"] - as_of) / DAY
    v = w7["vibration"]
    sums = pd.DataFrame({"asset_id": w7["asset_id"], "t": t, "v": v, "tv": t * v, "tt": t * t}).groupby(
        "asset_id", observed=True
    )
    mean = sums[["t", "v", "tv", "tt"]].mean()
    var_t = mean["tt"] - mean["t"] ** 2
    out["vibration_trend_7d"] = ((mean["tv"] - mean["t"] * mean["v"]) / var_t.where(var_t > 0)).fillna(0.0)

    out["temperature_excursions_7d"] = (w7["temperature"] >= EXCURSION_C).groupby(w7["asset_id"], observed=True).sum()
    w30 = hist[hist["timestamp"] > as_of - 30 * DAY]
    for kind in ("maintenance", "failure"):
        out[f"{kind}_count_30d"] = (w30["event"] == kind).groupby(w30["asset_id"], observed=True).sum()
    out["days_since_maintenance"] = _since(hist, "maintenance", as_of, first)
    out["days_since_failure"] = _since(hist, "failure", as_of, first)

    out = out.reindex(columns=list(FEATURE_NAMES))
    # Std of a one-reading window is NaN; an asset silent for a whole window has no means either.
    out.index = out.index.astype(str)
    out = out.fillna({c: 0.0 for c in FEATURE_NAMES if "_std_" in c or "_count_" in c or "excursions" in c})
    for col in FEATURE_NAMES:
        if out[col].isna().any():
            out[col] = out[col].fillna(out[col].median()).fillna(0.0)
    out.index.name = "asset_id"
    return out.astype(np.float32)


def live_readings(df: pd.DataFrame, as_of: pd.Timestamp | str) -> pd.DataFrame:
    """Each asset's latest reading at or before ``as_of`` (the model's ``live`` input), indexed by ``asset_id``."""
    as_of = pd.Timestamp(as_of)
    hist = _check(df, as_of)
    last = hist.loc[hist.groupby("asset_id", observed=True)["timestamp"].idxmax()]
    out = last.set_index(last["asset_id"].astype(str))[list(LIVE_FEATURES)].astype(np.float32)
    out.index.name = "asset_id"
    return out
