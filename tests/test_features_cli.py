"""The ``edge-agent features`` CLI handlers (parser built here; cli.py wires ``add_commands``): apply, get, list, examples."""

from __future__ import annotations

import argparse
import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from edge_agent.cli.features import add_commands
from edge_agent.errors import EdgeError
from edge_agent.wire.bundle import write_bundle


# -- CLI handlers (parser built here; cli.py wires add_commands) ----------------------------
def _cli(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="edge-agent")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = int(args.handler(args))
        except EdgeError as exc:  # what cli.main does
            print(f"error: {exc}", file=err)
            code = 1
    return code, out.getvalue(), err.getvalue()


def test_cli_apply_get_list(tmp_path: Path) -> None:
    import time

    data = str(tmp_path / "data")
    now = time.time()
    path = tmp_path / "bundle"
    write_bundle(
        path,
        "maintenance",
        "3",
        "snapshot",
        ["pump-1", "pump-2"],
        [now - 100, now - 7200],
        np.array([[1.5, 2.0], [3.0, 4.0]], np.float32),
        ["vib", "temp"],
        ttl_s=3600,
    )

    code, out, _ = _cli("features", "list", "--data-dir", data)
    assert code == 0 and "no feature sets" in out
    code, out, err = _cli("features", "get", "maintenance", "pump-1", "--data-dir", data)
    assert code == 1 and "error: no feature cache" in err

    code, out, _ = _cli("features", "apply", str(path), "--data-dir", data)
    assert code == 0 and "applied maintenance version 3 (snapshot, was none): 2 rows" in out
    code, out, _ = _cli("features", "apply", str(path), "--data-dir", data)
    assert code == 0 and "already applied" in out

    code, out, _ = _cli("features", "get", "maintenance", "pump-1", "--json", "--data-dir", data)
    assert code == 0, out
    doc = json.loads(out)
    assert doc["features"] == {"vib": 1.5, "temp": 2.0} and doc["version"] == "3" and doc["expired"] is False
    assert 99 < doc["age_s"] < 3600 and doc["event_ts"] == pytest.approx(now - 100)
    code, out, _ = _cli("features", "get", "maintenance", "pump-1", "--data-dir", data)
    assert code == 0 and "version 3" in out and "vib" in out and "fresh" in out

    code, out, err = _cli("features", "get", "maintenance", "pump-9", "--data-dir", data)
    assert code == 1 and "error: feature set 'maintenance' has no entity 'pump-9'" in err
    code, out, err = _cli("features", "get", "other", "pump-1", "--data-dir", data)
    assert code == 1 and "error: no feature set 'other'" in err
    code, out, err = _cli("features", "get", "maintenance", "pump-2", "--json", "--data-dir", data)
    assert code == 1 and "expired" in err and json.loads(out)["expired"] is True

    code, out, _ = _cli("features", "list", "--json", "--data-dir", data)
    (s,) = json.loads(out)
    assert (s["name"], s["version"], s["rows"], s["some_expired"]) == ("maintenance", "3", 2, True)
    assert s["newest_age_s"] == pytest.approx(100, abs=60)
    code, out, _ = _cli("features", "list", "--data-dir", data)
    assert code == 0 and "maintenance" in out and "some expired" in out

    bad = tmp_path / "bad"
    write_bundle(bad, "maintenance", "2", "snapshot", ["x"], now, [[1, 2]], ["vib", "temp"], ttl_s=60)
    code, _, err = _cli("features", "apply", str(bad), "--data-dir", data)
    assert code == 1 and "error: bundle maintenance@2" in err and "not newer" in err


def test_cli_commands_have_examples() -> None:
    parser = argparse.ArgumentParser(prog="edge-agent")
    sub = parser.add_subparsers(dest="command", required=True)
    group = add_commands(sub)
    assert "Example:" in group.format_help()
    for name in ("get", "list", "apply"):
        sp = group._subparsers._group_actions[0].choices[name]  # argparse keeps subparsers here
        assert "Example:" in sp.format_help() and f"edge-agent features {name}" in sp.format_help()
        assert "--data-dir" in sp.format_help()
