"""A lone surrogate as an entity id or set name: a clear error from ``FeatureCache`` and the CLI, never a traceback.

Over HTTP a JSON ``"\\ud800"`` decodes to one; from a shell, bytes that are not UTF-8 in argv become
one (Python's surrogateescape). SQLite cannot bind either (UnicodeEncodeError).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import RequestError
from edge_agent.features.cache import FeatureCache
from edge_agent.wire.bundle import read_bundle, write_bundle
from tests.support.telemetry import BIN


def test_feature_cache_and_cli_refuse_a_lone_surrogate(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_bundle(
        tmp_path / "bundle", "maintenance", "1", "snapshot", ["pump-1"], [time.time()],
        np.array([[1.5]], np.float32), ["vib"], ttl_s=None,
    )  # fmt: skip
    cache = FeatureCache(data / "features.db")
    cache.apply(read_bundle(tmp_path / "bundle"))
    assert cache.get("maintenance", "pump-1") is not None
    for call in (
        lambda: cache.get("maintenance", "pump-\udcff"),
        lambda: cache.get("maint\ud800", "pump-1"),
        lambda: cache.get_many("maintenance", ["pump-1", "\udcff"]),
    ):
        with pytest.raises(RequestError, match="lone surrogate"):
            call()
    cache.close()

    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    for set_name, entity in ((b"maintenance", b"pump-\xff"), (b"maint\xed\xa0\x80", b"pump-1")):
        argv = [
            os.fsencode(BIN / "edge-agent"),
            b"features",
            b"get",
            set_name,
            entity,
            b"--data-dir",
            os.fsencode(data),
        ]
        proc = subprocess.run(argv, env=env, capture_output=True, timeout=60)
        err = proc.stderr.decode(errors="replace")
        assert proc.returncode in (1, 2) and "Traceback" not in err, err
        assert err.startswith("error: ") and "lone surrogate" in err, err
