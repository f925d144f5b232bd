"""``cloud-batch features`` on the command line: build and push through the CLI, help texts, console script.

Errors print ``error: ...`` and exit 2 without a traceback; every command's help ends with an example.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cloud_batch.cli import features as features_cli
from cloud_batch.cli.main import build_parser as cloud_parser
from edge_agent.wire.bundle import read_bundle
from edge_agent.wire.topics import features_topic
from tests.broker import Broker, retained
from tests.support.cloud_features import FLEET, SET, frame, push_argv, write_csv

CLI = Path(sys.executable).parent / "cloud-batch"


# -- CLI wiring ---------------------------------------------------------------------------------
def test_cli_build_and_push(
    broker: Broker, key_files: tuple[Path, Path], reg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_csv(frame(6), tmp_path / "stats.csv")
    assert (
        features_cli.main(
            [
                "features",
                "build",
                SET,
                "--version",
                "1",
                "--registry",
                str(reg),
                "--from",
                str(src),
                "--entity-key",
                "camera",
                "--event-ts-col",
                "computed_at",
                "--ttl-s",
                "86400",
                "--stale-policy",
                "serve",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"built: feature set {SET} version 1" in out and "6 entities (camera) x 2 features (float32)" in out
    assert read_bundle(reg / "features" / SET / "1").info.ttl_s == 86400

    assert features_cli.main(push_argv(reg, key_files, broker.url, "--no-progress")) == 0
    out = capsys.readouterr().out
    assert f"pushed feature set {SET} 1 to fleet {FLEET}" in out and features_topic(FLEET, SET) in out
    assert features_topic(FLEET, SET) in retained(broker.url)

    # Errors: `error: ...`, exit 2, no traceback.
    assert (
        features_cli.main(["features", "build", SET, "--version", "2", "--registry", str(reg), "--recipe", "weather"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: unknown recipe 'weather'; recipes: maintenance") and "Traceback" not in err
    assert features_cli.main(push_argv(reg, key_files, broker.url, "--delta-from", "1")) == 2
    assert capsys.readouterr().err == "error: --delta-from 1 is not older than version 1\n"


def test_every_features_command_has_help_ending_with_an_example() -> None:
    parser = cloud_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    features = sub.choices["features"]
    leaves = next(a for a in features._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert sorted(leaves) == ["build", "push"]
    for p in (features, *leaves.values()):
        tail = p.format_help().rstrip().rsplit("Example:", 1)
        assert len(tail) == 2, p.prog
        assert all(line.strip().startswith("cloud-batch features") for line in tail[1].strip().splitlines())
    for flag in (
        "--version",
        "--registry",
        "--from",
        "--entity-key",
        "--recipe",
        "--ttl-s",
        "--stale-policy",
        "--event-ts-col",
    ):
        assert flag in leaves["build"].format_help()
    for flag in ("--version", "--fleet", "--registry", "--key", "--broker", "--delta-from", "--partition-map"):
        assert flag in leaves["push"].format_help()


def test_console_script_wiring(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            str(CLI),
            "features",
            "build",
            "x",
            "--version",
            "1",
            "--registry",
            str(tmp_path),
            "--from",
            str(tmp_path / "nope.csv"),
            "--entity-key",
            "id",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr == f"error: input file not found: {tmp_path / 'nope.csv'}\n"
    proc = subprocess.run(
        [str(CLI), "features", "build", "x", "--version", "1", "--registry", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "one of the arguments --from --recipe is required" in proc.stderr
