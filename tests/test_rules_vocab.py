"""Named vocabularies keep their frozen on-disk spelling: local shadow request states."""

from __future__ import annotations

import json
from pathlib import Path

from edge_agent.update.shadow import local
from edge_agent.update.shadow.local import RequestState


def test_shadow_request_states_keep_their_on_disk_values(tmp_path: Path) -> None:
    assert [s.value for s in RequestState] == [
        "requested", "shadowing", "health_check", "promoted", "rejected", "rolled_back", "failed",
    ]  # fmt: skip
    req = local.ShadowRequest("digits", "2", {"shadow_rate": 0.5}, state=RequestState.ROLLED_BACK, previous="1")
    local.save(tmp_path, req)
    assert json.loads(local.request_path(tmp_path, "digits").read_text())["state"] == "rolled_back"
    back = local.load(tmp_path, "digits")
    assert back is not None and back.state is RequestState.ROLLED_BACK and back.state in local.FINAL
    assert f"{back.state}: {back.reason}" == "rolled_back: None"  # what the CLI prints
    assert local.ShadowRequest("digits", "2", {}).state in local.PENDING
