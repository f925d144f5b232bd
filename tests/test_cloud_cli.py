"""``cloud-batch`` wiring: help texts, registering a model, errors as ``error: ...`` with exit code 2.

Runs the installed console script in subprocesses (as a user would); the help texts of every
command are read through ``main()`` in-process, after one ``--help`` of the script. Nothing here trains,
so TensorFlow is never needed; one test checks that it is not even imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_batch.cli.main import build_parser, main
from edge_agent.wire.model.manifest import GOLDEN_FILE, MANIFEST_FILE, MODEL_FILE
from tests.support.cli import subcommands

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "cloud-batch"
DIGITS = REPO / "models" / "digits" / "1"
MAINTENANCE = REPO / "models" / "maintenance" / "1"


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=120)


def all_commands() -> list[list[str]]:
    """Every (sub)command path of the parser, e.g. [], ['train'], ['train', 'digits']."""
    return [[]] + [path for path, _ in subcommands(build_parser())]


def test_every_help_text_ends_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    commands = all_commands()
    assert {"train digits", "train maintenance", "register"} <= {" ".join(c) for c in commands}
    top = run("--help")  # the installed console script once; every command's help through its main()
    assert top.returncode == 0, top.stderr
    assert top.stdout.startswith("usage: cloud-batch")
    for path in commands:
        with pytest.raises(SystemExit) as info:
            main([*path, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        tail = out.rstrip().rsplit("Example:", 1)
        assert len(tail) == 2, f"`cloud-batch {' '.join(path)} --help` has no Example: block"
        example = tail[1].strip().splitlines()
        assert example and all(line.strip().startswith("cloud-batch") for line in example), out


def test_register_a_tflite_then_same_again_is_fine_but_different_is_refused(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    proc = run("register", DIGITS / MODEL_FILE, "--name", "mine", "--version", "1", "--registry", reg)
    assert proc.returncode == 0, proc.stderr
    assert "registered mine version 1" in proc.stdout
    version_dir = reg / "mine" / "1"
    assert sorted(p.name for p in version_dir.iterdir()) == sorted([MODEL_FILE, MANIFEST_FILE, GOLDEN_FILE])
    manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
    assert manifest["name"] == "mine" and manifest["version"] == "1"
    assert [i["name"] for i in manifest["inputs"]] == ["pixels"]

    # Identical content (golden samples from running the model are deterministic): a no-op.
    again = run("register", DIGITS / MODEL_FILE, "--name", "mine", "--version", "1", "--registry", reg)
    assert again.returncode == 0, again.stderr

    before = (version_dir / MODEL_FILE).read_bytes()
    clash = run("register", MAINTENANCE / MODEL_FILE, "--name", "mine", "--version", "1", "--registry", reg)
    assert clash.returncode == 2
    assert clash.stderr.startswith("error: mine version 1 already exists with different content")
    assert "Traceback" not in clash.stderr
    assert (version_dir / MODEL_FILE).read_bytes() == before


def test_register_with_golden_file(tmp_path: Path) -> None:
    # The shipped golden samples name the renamed output ('probs'); a bare registration of the
    # same file exposes 'output_0', so the file does not fit and registration is refused.
    proc = run(
        "register",
        DIGITS / MODEL_FILE,
        "--name",
        "d",
        "--version",
        "2",
        "--registry",
        tmp_path,
        "--golden",
        DIGITS / GOLDEN_FILE,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "golden output 'probs' is not an output of the model" in proc.stderr
    assert not (tmp_path / "d" / "2").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["register", "missing.tflite", "--name", "x", "--version", "1"],
            "error: model file not found: missing.tflite",
        ),
        (["register", str(DIGITS / MODEL_FILE), "--name", "bad/name", "--version", "1"], "error: invalid model name"),
        (["register", str(DIGITS / MODEL_FILE), "--name", "x", "--version", "one"], "error: invalid version 'one'"),
        (
            ["register", str(DIGITS / MODEL_FILE), "--name", "x"],
            "error: the following arguments are required: --version",
        ),
        (["train", "digits", "--epochs", "0"], "error: argument --epochs: must be at least 1, got 0"),
        (["train", "digits", "--epochs", "many"], "error: argument --epochs: expected a whole number, got 'many'"),
        (["train", "cats"], "error: argument MODEL: invalid choice: 'cats'"),
        (["train"], "error: the following arguments are required: MODEL"),
        ([], "error: the following arguments are required: COMMAND"),
        (["train", "maintenance", "--quantization", "int4"], "error: argument --quantization: invalid choice: 'int4'"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_error(tmp_path: Path, args: list[str], message: str) -> None:
    proc = subprocess.run(
        [str(CLI), *args, *(["--registry", str(tmp_path)] if args[:1] == ["register"] else [])],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_into_a_taken_version_fails_before_training(tmp_path: Path) -> None:
    run("register", DIGITS / MODEL_FILE, "--name", "digits", "--version", "1", "--registry", tmp_path)
    proc = run("train", "digits", "--registry", tmp_path, "--version", "1", "--no-progress")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"error: digits version 1 already exists in {tmp_path}; pick another version (next free: 2)"
    )


def test_main_returns_2_and_prints_error_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["register", str(tmp_path / "nope.tflite"), "--name", "x", "--version", "1", "--registry", str(tmp_path)])
        == 2
    )
    assert capsys.readouterr().err == f"error: model file not found: {tmp_path / 'nope.tflite'}\n"


def test_cli_without_training_never_imports_tensorflow() -> None:
    code = (
        "import sys, cloud_batch.cli.main as c, cloud_batch.train.digits, cloud_batch.train.maintenance.job, cloud_batch.registry.models;"
        "c.build_parser().format_help();"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras'}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
