"""The shipped maintenance model and its joined feature set: where it lives, the set's name, its feature order.

Shared by ``tests/test_join.py`` and ``tests/test_join_manifest.py``.
"""

from __future__ import annotations

import json

from edge_agent.wire.model.manifest import MANIFEST_FILE
from tests.support.env import MODELS

MAINT = MODELS / "maintenance" / "1"
SET = "asset_features"
FEATURES = json.loads((MAINT / MANIFEST_FILE).read_text())["feature_names"]["asset_features"]
