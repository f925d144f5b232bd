"""Synthetic fleet history and the per-asset features computed from it (pandas only, no TensorFlow)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cloud_batch.errors import InputError
from cloud_batch.train.maintenance.data import EVENTS, SENSORS, START, generate
from cloud_batch.train.maintenance.features import (
    EXCURSION_C,
    FEATURE_NAMES,
    LIVE_FEATURES,
    asset_features,
    live_readings,
)


@pytest.fixture(scope="module")
def fleet() -> pd.DataFrame:
    return generate(n_assets=30, days=20, seed=3)


def test_generator_is_seeded_and_shaped(fleet: pd.DataFrame) -> None:
    assert list(fleet.columns) == ["asset_id", "timestamp", *SENSORS, "event"]
    assert len(fleet) == 30 * 20 * 24
    assert fleet["asset_id"].nunique() == 30 and fleet["asset_id"].astype(str).str.fullmatch(r"asset-\d+").all()
    assert set(fleet["event"].unique()) <= set(EVENTS)
    assert generate(n_assets=30, days=20, seed=3).equals(fleet)
    assert not generate(n_assets=30, days=20, seed=4).equals(fleet)
    assert fleet[list(SENSORS)].notna().all().all()


def test_failures_follow_history() -> None:
    """Failures happen, and assets about to fail vibrate more than the fleet: the label is learnable."""
    df = generate(n_assets=100, days=40, seed=0)
    failures = df[df["event"] == "failure"]
    assert len(failures) >= 20
    before = []
    for _, row in failures.iterrows():
        same = df["asset_id"] == row["asset_id"]
        recent = (df["timestamp"] > row["timestamp"] - pd.Timedelta("24h")) & (df["timestamp"] <= row["timestamp"])
        before.append(df.loc[same & recent, "vibration"].mean())
    assert np.mean(before) > df["vibration"].mean() + 1.0


def test_generate_rejects_empty_fleets() -> None:
    with pytest.raises(InputError):
        generate(n_assets=0)


def test_asset_features_shape_and_types(fleet: pd.DataFrame) -> None:
    f = asset_features(fleet, "2024-01-15 06:00")
    assert list(f.columns) == list(FEATURE_NAMES)
    assert f.index.name == "asset_id" and len(f) == 30 and f.index[0] == "asset-0"
    assert (f.dtypes == np.float32).all()
    assert not f.isna().any().any()
    live = live_readings(fleet, "2024-01-15 06:00")
    assert list(live.columns) == list(LIVE_FEATURES) and list(live.index) == list(f.index)


def test_asset_features_never_look_into_the_future(fleet: pd.DataFrame) -> None:
    as_of = pd.Timestamp("2024-01-12 17:00")
    assert asset_features(fleet, as_of).equals(asset_features(fleet[fleet["timestamp"] <= as_of], as_of))
    assert live_readings(fleet, as_of).equals(live_readings(fleet[fleet["timestamp"] <= as_of], as_of))


def test_asset_features_values_on_a_hand_made_history() -> None:
    hours = pd.date_range(START, periods=10 * 24, freq="h")
    n = len(hours)
    df = pd.DataFrame(
        {
            "asset_id": "asset-7",
            "timestamp": hours,
            "temperature": np.where(np.arange(n) == n - 2, 90.0, 60.0),  # one excursion, 2 hours ago
            "vibration": np.arange(n) / 24.0,  # rises by exactly 1 mm/s per day
            "pressure": 6.0,
            "rpm": 1800.0,
            "event": "",
        }
    )
    df.loc[24 * 2, "event"] = "maintenance"  # day 2, 00:00
    df.loc[24 * 5 + 12, "event"] = "failure"  # day 5, 12:00
    as_of = hours[-1]  # day 9, 23:00
    f = asset_features(df, as_of).loc["asset-7"]
    last24 = np.arange(n - 24, n) / 24.0
    assert f["vibration_mean_24h"] == pytest.approx(last24.mean())
    assert f["vibration_std_24h"] == pytest.approx(last24.std(ddof=1), rel=1e-5)
    assert f["vibration_trend_7d"] == pytest.approx(1.0, rel=1e-4)
    assert f["temperature_excursions_7d"] == 1 and EXCURSION_C <= 90.0
    assert f["temperature_mean_24h"] == pytest.approx((23 * 60 + 90) / 24)
    assert f["pressure_std_24h"] == 0 and f["rpm_mean_24h"] == 1800
    assert f["maintenance_count_30d"] == 1 and f["failure_count_30d"] == 1
    assert f["days_since_maintenance"] == pytest.approx(7 + 23 / 24)
    assert f["days_since_failure"] == pytest.approx(4 + 11 / 24)
    # Without any event, "days since" counts from the first reading (a lower bound).
    quiet = asset_features(df.assign(event=""), as_of).loc["asset-7"]
    assert quiet["days_since_maintenance"] == pytest.approx(9 + 23 / 24)


def test_asset_features_errors() -> None:
    df = generate(n_assets=2, days=2, seed=0)
    with pytest.raises(InputError, match="no readings at or before"):
        asset_features(df, "2023-01-01")
    with pytest.raises(InputError, match="lacks columns"):
        asset_features(df.drop(columns=["vibration"]), "2024-01-02")


def test_an_asset_without_readings_gets_no_row_on_pandas_2_and_3(fleet: pd.DataFrame) -> None:
    """``asset_id`` is categorical: a category with no rows is left out, not given median-filled features
    (pandas 2, on Python 3.10, grouped unobserved categories too and ``live_readings`` raised)."""
    as_of = "2024-01-15 06:00"
    without = fleet[fleet["asset_id"] != "asset-3"]
    assert "asset-3" in without["asset_id"].cat.categories  # still a category, no longer observed
    features, live = asset_features(without, as_of), live_readings(without, as_of)
    assert "asset-3" not in features.index and "asset-3" not in live.index
    assert features.equals(asset_features(fleet, as_of).drop(index="asset-3"))
    assert live.equals(live_readings(fleet, as_of).drop(index="asset-3"))
