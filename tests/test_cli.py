"""CLI wiring: every command has help with an example and is documented; exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.cli.main import build_parser, main
from tests.support.cli import subcommands

REPO = Path(__file__).resolve().parents[1]
EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")


def _subcommands(parser) -> list[tuple[str, object]]:
    return [(" ".join(path), sub) for path, sub in subcommands(parser)]


def test_every_command_has_an_example_and_is_documented() -> None:
    docs = (REPO / "docs" / "api.md").read_text()
    commands = _subcommands(build_parser())
    assert {
        "run",
        "models install",
        "models activate",
        "models rollback",
        "models list",
        "predict",
        "status",
        "bench",
    } <= {n for n, _ in commands}
    for name, sub in commands:
        assert "Example:" in sub.format_help(), name
        assert f"edge-agent {name}" in docs, f"`edge-agent {name}` is not documented in docs/api.md"


def test_every_cloud_batch_command_has_an_example_and_is_documented() -> None:
    from cloud_batch.cli.main import build_parser as cloud_parser

    docs = (REPO / "docs" / "api.md").read_text()
    for name, sub in _subcommands(cloud_parser()):
        assert "Example:" in sub.format_help(), name
        if sub._subparsers is None:  # a leaf command
            wanted = (
                "cloud-batch rollout status|advance|abort" if name.startswith("rollout ") else f"cloud-batch {name}"
            )
            assert wanted in docs, f"`{wanted}` is not documented in docs/api.md"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGE_AGENT, *args], capture_output=True, text=True, timeout=120)


def test_models_lifecycle_through_the_console_script(tmp_path: Path, digits_dir: Path) -> None:
    d = str(tmp_path / "data")
    tflite = str(digits_dir / "model.tflite")
    r = run("models", "install", tflite, "--name", "digits", "--data-dir", d)
    assert r.returncode == 0, r.stderr
    assert "installed digits version 1" in r.stdout
    assert run("models", "install", tflite, "--name", "digits", "--version", "5", "--data-dir", d).returncode == 0
    rows = json.loads(run("models", "list", "--json", "--data-dir", d).stdout)
    assert rows[0]["active"] == "1" and rows[0]["versions"] == ["1", "5"]
    assert run("models", "activate", "digits", "5", "--data-dir", d).returncode == 0
    assert json.loads(run("models", "list", "--json", "--data-dir", d).stdout)[0]["active"] == "5"
    r = run("models", "rollback", "digits", "--data-dir", d)
    assert r.returncode == 0 and "version 1" in r.stdout
    assert "digits" in run("models", "list", "--data-dir", d).stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["models", "activate", "digits", "9"], "no installed version '9'"),
        (["models", "activate", "nothere", "1"], "no installed version"),
        (["models", "rollback", "digits"], "no previous version"),
        (["models", "install", "/nonexistent.tflite", "--name", "x"], "not found"),
        (["models", "install", "{junk}", "--name", "x"], "cannot load"),
        (["models", "install", "{model}", "--name", "../evil"], "invalid model name"),
        (["models", "install", "{model}", "--name", "ok", "--version", "v1"], "invalid version"),
        (["predict", "digits", "--input", "/nonexistent.npy"], "not found"),
        (["predict", "digits", "--input", "{junk}"], "unsupported input file type"),
        (["predict", "nothere", "--input", "{junk}"], "not installed"),
    ],
)
def test_errors_are_clear_and_exit_1(
    tmp_path: Path, store, digits_dir: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a model")
    args = [a.replace("{junk}", str(junk)).replace("{model}", str(digits_dir / "model.tflite")) for a in args]
    before = store.list()
    assert main([*args, "--data-dir", str(store.root.parent)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert store.list() == before


def test_usage_errors_exit_2() -> None:
    r = run("models", "activate", "digits")
    assert r.returncode == 2 and "usage:" in r.stderr
    assert run("frobnicate").returncode == 2
    r = run("run", "--listen", "nonsense", "--data-dir", "/tmp/never-created-edgefleet")
    assert r.returncode == 1 and "HOST:PORT" in r.stderr


def _digits(n: int = 3):
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images[:n].astype(np.float32)[..., None], d.target[:n]


def test_predict_npy_json_and_image(tmp_path: Path, store) -> None:
    import cv2

    x, y = _digits(3)
    d = str(store.root.parent)
    np.save(tmp_path / "x.npy", x)
    out = json.loads(run("predict", "digits", "--input", str(tmp_path / "x.npy"), "--json", "--data-dir", d).stdout)
    assert out["model_version"] == "1"
    assert [int(v) for v in out["labels"]] == list(y)
    (tmp_path / "x.json").write_text(json.dumps({"pixels": x.tolist()}))
    out = json.loads(run("predict", "digits", "--input", str(tmp_path / "x.json"), "--json", "--data-dir", d).stdout)
    assert [int(v) for v in out["labels"]] == list(y)
    img = (255 - x[0, :, :, 0] * (255 / 16)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "d.png"), cv2.resize(img, (64, 64), interpolation=cv2.INTER_NEAREST))
    r = run("predict", "digits", "--input", str(tmp_path / "d.png"), "--data-dir", d)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"digits v1: {y[0]}")


def test_bench_reports_percentiles(store) -> None:
    r = run("bench", "digits", "--iterations", "200", "--json", "--data-dir", str(store.root.parent))
    res = json.loads(r.stdout)
    for key in ("raw", "agent"):
        assert set(res[key]) >= {"p50_ms", "p95_ms", "p99_ms", "throughput_per_s"}
        assert res[key]["n"] == 200


def test_status_without_running_agent(store) -> None:
    r = run("status", "--json", "--data-dir", str(store.root.parent), "--listen", "127.0.0.1:1")
    out = json.loads(r.stdout)
    assert out["running"] is False and out["store"][0]["active"] == "1"


def test_hidden_validate_command_runs_the_validation_child(digits_dir: Path) -> None:
    """A frozen (PyInstaller) agent validates candidates by re-running its own binary with this command."""
    r = run("__validate__", str(digits_dir), "--runs", "3")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["ok"] is True and report["name"] == "digits"


def test_models_install_of_hostile_files_is_a_clean_error_and_installs_nothing(
    tmp_path: Path, digits_dir: Path
) -> None:
    """The untrusted file is loaded only in the isolated validation child: a crash is an `error:` line, exit 1."""
    import random

    from tests.support.models import BROKEN_MODEL_REASONS, crashing_model

    valid = (digits_dir / "model.tflite").read_bytes()
    d = str(tmp_path / "data")
    hostile = {"truncated": valid[: len(valid) // 3], "segfault": crashing_model(valid), "empty": b""}
    rng = random.Random(15)
    for n in range(4):  # byte mutations in the flatbuffer's tables and offsets
        data = bytearray(valid)
        for _ in range(24):
            data[rng.randrange(0, 2048)] = rng.randrange(256)
        hostile[f"mutated-{n}"] = bytes(data)
    outcomes = {}
    for label, data in hostile.items():
        path = tmp_path / f"{label}.tflite"
        path.write_bytes(data)
        r = run("models", "install", str(path), "--name", "digits", "--data-dir", d)
        assert r.returncode in (0, 1), f"{label}: exit {r.returncode} (a signal?) {r.stderr}"
        assert "Traceback" not in r.stderr, f"{label}: {r.stderr}"
        if r.returncode:
            assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        outcomes[label] = r.returncode, r.stderr.strip()
    assert outcomes["segfault"] in [(1, f"error: {reason}") for reason in BROKEN_MODEL_REASONS]  # crash or refusal
    assert outcomes["truncated"][0] == 1 and outcomes["empty"][0] == 1
    installed = sum(1 for code, _ in outcomes.values() if code == 0)
    listing = json.loads(run("models", "list", "--json", "--data-dir", d).stdout)
    assert len(listing[0]["versions"] if listing else []) == installed, "a failed install left a version behind"
    # A good model still installs afterwards.
    assert run("models", "install", str(digits_dir / "model.tflite"), "--name", "ok", "--data-dir", d).returncode == 0
