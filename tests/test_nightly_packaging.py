"""The scheduling files for the nightly pipeline: systemd units, the Dockerfile, the Kubernetes CronJob.

Each is parsed, and the command it runs is parsed with the real ``cloud-batch`` argparse parser: it
must be a ``pipeline run`` with a ``--config``. ``systemd-analyze verify`` checks the units when it is
installed (the ExecStart binary is pointed at this venv's ``cloud-batch`` in a copy, since
/opt/edgefleet does not exist here). Docker and Kubernetes are not available here: those two files
are checked statically only.
"""

from __future__ import annotations

import argparse
import configparser
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cloud_batch.cli.main import build_parser

PACKAGING = Path(__file__).resolve().parent.parent / "packaging"
BIN = Path(sys.executable).parent


def pipeline_run(argv: list[str]) -> argparse.Namespace:
    """``argv`` (after the program name) parsed by the real parser; it must be ``pipeline run --config ...``."""
    args = build_parser().parse_args(argv)
    assert (args.command, args.pipeline_command) == ("pipeline", "run"), argv
    assert args.config is not None and args.as_of is None and not args.dry_run
    return args


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((PACKAGING / name).read_text())
    return parser


def test_the_service_runs_a_valid_pipeline_command_and_the_timer_fires_at_two_persistently() -> None:
    service = unit("cloud-batch-nightly.service")
    argv = shlex.split(service["Service"]["ExecStart"])
    assert Path(argv[0]).name == "cloud-batch"
    assert str(pipeline_run(argv[1:]).config) == "/etc/edgefleet/pipeline.toml"
    assert service["Service"]["Type"] == "oneshot" and service["Service"]["User"] != "root"
    timer = unit("cloud-batch-nightly.timer")["Timer"]
    assert timer["OnCalendar"] == "*-*-* 02:00:00" and timer["Persistent"] == "true"
    assert timer["Unit"] == "cloud-batch-nightly.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_both_units(tmp_path: Path) -> None:
    text = (PACKAGING / "cloud-batch-nightly.service").read_text()
    (tmp_path / "cloud-batch-nightly.service").write_text(
        text.replace("/opt/edgefleet/cloud/bin/cloud-batch", str(BIN / "cloud-batch"))
    )
    shutil.copy(PACKAGING / "cloud-batch-nightly.timer", tmp_path)
    units = [str(tmp_path / "cloud-batch-nightly.service"), str(tmp_path / "cloud-batch-nightly.timer")]
    verify = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, check=False)
    assert verify.returncode == 0, verify.stderr
    assert "cloud-batch-nightly" not in verify.stderr, verify.stderr  # no warning about our units


def test_the_dockerfile_installs_the_cloud_extras_runs_as_non_root_with_the_cloud_batch_entrypoint() -> None:
    lines = [ln.strip() for ln in (PACKAGING / "cloud-batch.Dockerfile").read_text().splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    runs = " ".join(ln for ln in instructions if ln.startswith("RUN "))
    assert 'pip install ".[cloud,batch]"' in runs
    (user,) = [ln.split()[1] for ln in instructions if ln.startswith("USER ")]
    assert user.split(":")[0] not in ("root", "0")
    # USER comes after every RUN: nothing runs as root after it, the pipeline never does.
    assert max(i for i, ln in enumerate(instructions) if ln.startswith("RUN ")) < instructions.index(f"USER {user}")
    (entry,) = [json.loads(ln[len("ENTRYPOINT ") :]) for ln in instructions if ln.startswith("ENTRYPOINT ")]
    (cmd,) = [json.loads(ln[len("CMD ") :]) for ln in instructions if ln.startswith("CMD ")]
    assert entry == ["cloud-batch"]
    pipeline_run(cmd)


def test_the_cronjob_runs_the_same_command_at_two_with_ray_from_the_environment() -> None:
    doc = yaml.safe_load((PACKAGING / "cloud-batch-nightly.cronjob.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "CronJob")
    spec = doc["spec"]
    assert spec["schedule"] == "0 2 * * *" and spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    assert "command" not in container  # the image's entrypoint, cloud-batch, runs the args
    args = pipeline_run(container["args"])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(args.config.parent) in mounts
    env = {e["name"]: e for e in container["env"]}
    assert "configMapKeyRef" in env["RAY_ADDRESS"]["valueFrom"]
    rule = spec["jobTemplate"]["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [1]  # gate failed: no retry
