"""Synthetic, seeded sensor history for a fleet of machines (the predictive-maintenance demo data).

Real fleet data is private, so we simulate it, but with the structure that makes the
problem real: failures are caused by history, not by the current reading alone. Each
asset wears between maintenances; wear raises the chance that a latent fault starts; a
fault makes vibration climb over days and makes temperature excursions frequent; the
failure hazard grows with fault age, excursions and time since maintenance. Maintenance
and failure (followed by repair) reset the asset.

One row per asset and hour::

    asset_id   timestamp            temperature  vibration  pressure  rpm     event
    asset-0    2024-01-01 00:00:00  64.1         3.02       6.11      1791.0  ""

``asset_id`` is categorical (fast grouping); ``temperature`` in °C, ``vibration`` RMS velocity
in mm/s, ``pressure`` in bar, ``rpm`` in revolutions per minute; ``event`` is ``""``,
``"maintenance"`` or ``"failure"`` (the event happened right after that reading).
Timestamps are naive UTC.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cloud_batch.errors import InputError

START = pd.Timestamp("2024-01-01 00:00:00")
EVENTS = ("", "maintenance", "failure")
SENSORS = ("temperature", "vibration", "pressure", "rpm")


def generate(n_assets: int = 200, days: int = 60, seed: int = 0, start: pd.Timestamp = START) -> pd.DataFrame:
    """Simulate ``n_assets`` machines for ``days`` days of hourly readings; same seed, same frame."""
    if n_assets < 1 or days < 1:
        raise InputError(f"need at least one asset and one day, got n_assets={n_assets}, days={days}")
    rng = np.random.default_rng(seed)
    hours = days * 24
    n = n_assets

    # Per-asset constants: every machine is a little different.
    base_temp = rng.normal(64.0, 3.0, n)
    base_vib = rng.normal(3.0, 0.4, n).clip(1.5, None)
    base_pres = rng.normal(6.0, 0.4, n)
    base_rpm = rng.normal(1800.0, 150.0, n)
    wear_rate = rng.lognormal(np.log(1.0 / (30 * 24)), 0.35, n)  # ~1.0 after 30 days
    maint_every = rng.uniform(20, 40, n) * 24  # scheduled service interval, hours
    phase = rng.uniform(0, 2 * np.pi, n)

    # State, started mid-life so "time since maintenance" differs from the first hour.
    since_maint = rng.uniform(0, 1, n) * maint_every
    wear = since_maint * wear_rate
    fault_age = np.full(n, -1.0)  # -1: no fault; else hours since the fault started

    temp = np.empty((hours, n))
    vib = np.empty((hours, n))
    pres = np.empty((hours, n))
    rpm = np.empty((hours, n))
    event = np.zeros((hours, n), np.int8)

    for t in range(hours):
        daily = np.sin(2 * np.pi * (t % 24) / 24 + phase)
        faulty = fault_age >= 0
        # A latent fault starts more often on worn machines.
        start_p = 0.0012 * (0.3 + wear**2)
        new_fault = ~faulty & (rng.random(n) < start_p)
        fault_age = np.where(new_fault, 0.0, np.where(faulty, fault_age + 1, -1.0))
        faulty = fault_age >= 0
        severity = np.where(faulty, np.minimum(fault_age / (5 * 24), 2.0), 0.0)  # ramps over ~5 days

        excursion = rng.random(n) < (0.01 + 0.12 * severity)
        spike = excursion * rng.uniform(10, 18, n)
        temp[t] = base_temp + 2.0 * daily + 3.0 * wear + 4.0 * severity + spike + rng.normal(0, 0.8, n)
        vib[t] = base_vib * (1 + 0.15 * wear) + 2.2 * severity**1.5 + rng.normal(0, 0.25, n)
        pres[t] = base_pres - 0.35 * severity + 0.1 * daily + rng.normal(0, 0.12, n)
        rpm[t] = base_rpm + 40.0 * daily - 60.0 * severity + rng.normal(0, 15.0, n)

        # Failure hazard: driven by the fault's age, excursions and overdue service.
        hazard = faulty * (0.0025 + 0.01 * severity**2) * (1 + 1.5 * excursion) * (1 + 0.3 * wear)
        failed = rng.random(n) < hazard
        serviced = ~failed & (since_maint >= maint_every)
        event[t] = np.where(failed, 2, np.where(serviced, 1, 0))

        # Repair after a failure and scheduled service both reset the machine; service
        # usually catches a latent fault.
        caught = serviced & (rng.random(n) < 0.8)
        reset = failed | serviced
        since_maint = np.where(reset, 0.0, since_maint + 1)
        wear = np.where(reset, 0.0, wear + wear_rate)
        fault_age = np.where(failed | caught, -1.0, fault_age)

    ids = np.array([f"asset-{i}" for i in range(n)])
    stamps = start + pd.to_timedelta(np.arange(hours), unit="h")
    frame = pd.DataFrame(
        {
            "asset_id": pd.Categorical(np.tile(ids, hours), categories=ids),
            "timestamp": np.repeat(stamps.values, n),
            "temperature": temp.ravel().round(2),
            "vibration": vib.ravel().clip(0, None).round(3),
            "pressure": pres.ravel().round(3),
            "rpm": rpm.ravel().round(1),
            "event": pd.Categorical.from_codes(event.ravel(), categories=list(EVENTS)),
        }
    )
    return frame.sort_values(["asset_id", "timestamp"], kind="stable").reset_index(drop=True)
