"""Shared fixtures: real TFLite models from the shipped registry in models/, real stores on disk."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import pytest

# tflite-runtime must be loaded before TensorFlow: TF first makes every later tflite-runtime load
# fail with "vector::reserve". Some tests import TF (to build models), so pin the order here.
import edge_agent.inference.runtime  # noqa: F401

pytest_plugins = ["tests.apiserver"]  # the API fixtures: model_server, api

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
PYTHON = sys.executable


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[list[str], argparse.ArgumentParser]]:
    """Every subcommand of a CLI parser with its path, e.g. (["models", "install"], its parser)."""
    found: list[tuple[list[str], argparse.ArgumentParser]] = []

    def walk(p: argparse.ArgumentParser, path: list[str]) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found.append((path + [name], sub))
                    walk(sub, path + [name])

    walk(parser, [])
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def digits_dir() -> Path:
    """The shipped int8 digits model version directory."""
    path = MODELS / "digits" / "1"
    assert (path / "manifest.json").is_file(), "models/digits/1 missing: run `make models`"
    return path


@pytest.fixture
def store(tmp_path: Path, digits_dir: Path):
    """A model store in a temp data dir with the shipped digits model installed and active."""
    from edge_agent.models.store import ModelStore

    s = ModelStore(tmp_path / "data")
    s.install_dir(digits_dir)
    return s
