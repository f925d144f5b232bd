"""The Feast part of bench/features_bench.py: run by the interpreter of a separate venv with feast installed.

Feast is never a project dependency; ``features_bench.bench_feast`` copies this file into its scratch
directory and runs it there::

    python feast_side.py DATA.npz WORKDIR N_LOOKUPS TTL_S

It writes every row of DATA.npz to Feast's SQLite online store (``write_to_online_store``, 100,000 rows a
call), times ``get_online_features`` for one entity per key in DATA.npz's ``keys``, and prints one JSON line.
"""

import json
import logging
import os
import shutil
import sys
import time
import warnings

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
from datetime import timedelta  # noqa: E402

import feast  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from feast import Entity, FeatureStore, FeatureView, Field, FileSource, ValueType  # noqa: E402
from feast.infra.online_stores.sqlite import SqliteOnlineStoreConfig  # noqa: E402
from feast.repo_config import RepoConfig  # noqa: E402
from feast.types import Float32  # noqa: E402

data, work, n_lookups, ttl = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
with np.load(data, allow_pickle=False) as z:
    ents, ts, vals, names, keys = z["entities"], z["event_ts"], z["values"], [str(x) for x in z["names"]], z["keys"]
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
df = pd.DataFrame(vals, columns=names)
df.insert(0, "asset_id", ents.astype(object))
df["event_timestamp"] = pd.to_datetime(ts, unit="s", utc=True)
df.head(10).to_parquet(os.path.join(work, "source.parquet"))
cfg = RepoConfig(
    project="bench",
    registry=os.path.join(work, "registry.db"),
    provider="local",
    online_store=SqliteOnlineStoreConfig(path=os.path.join(work, "online.db")),
    entity_key_serialization_version=3,
)
store = FeatureStore(config=cfg)
asset = Entity(name="asset", join_keys=["asset_id"], value_type=ValueType.STRING)
src = FileSource(path=os.path.join(work, "source.parquet"), timestamp_field="event_timestamp")
fv = FeatureView(
    name="maintenance",
    entities=[asset],
    ttl=timedelta(seconds=ttl),
    schema=[Field(name=n, dtype=Float32) for n in names],
    source=src,
    online=True,
)
store.apply([asset, fv])
t = time.perf_counter()
for i in range(0, len(df), 100_000):
    store.write_to_online_store("maintenance", df.iloc[i : i + 100_000])
write_s = time.perf_counter() - t
refs = [f"maintenance:{n}" for n in names]
keys = keys.tolist()
for k in keys[:50]:
    store.get_online_features(features=refs, entity_rows=[{"asset_id": k}]).to_dict()
lat = []
for k in keys:
    t0 = time.perf_counter_ns()
    store.get_online_features(features=refs, entity_rows=[{"asset_id": k}]).to_dict()
    lat.append(time.perf_counter_ns() - t0)
lat = np.array(lat) / 1000.0
sample = {
    k: [store.get_online_features(features=refs, entity_rows=[{"asset_id": k}]).to_dict()[n][0] for n in names]
    for k in keys[:3]
}
print(
    json.dumps(
        {
            "feast_version": feast.__version__,
            "python": sys.version.split()[0],
            "rows": len(df),
            "write_s": write_s,
            "write_rows_per_s": len(df) / write_s,
            "p50_us": float(np.percentile(lat, 50)),
            "p99_us": float(np.percentile(lat, 99)),
            "lookups": len(keys),
            "sample": sample,
            "db_bytes": os.path.getsize(os.path.join(work, "online.db")),
        }
    )
)
