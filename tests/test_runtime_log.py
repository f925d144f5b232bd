"""The runtimes' own C++ log lines stay off the user's terminal: DEBUG log records instead (#16).

ai-edge-litert prints ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`` straight to fd 2
when a process first allocates tensors; tflite-runtime prints nothing there. Both are checked
against the real runtime in a fresh process, and the capture itself against real fd 2 writes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.inference.interpreter import default_backend, native_log_to_debug

LOGGER = "edge_agent.inference.interpreter"


def test_native_lines_become_debug_records_and_other_output_reaches_stderr(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """What C++ code writes to fd 2 in the block: runtime-style lines are logged, anything else is put back."""
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG, logger=LOGGER), native_log_to_debug("some-runtime"):
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"another thread's line\n")
        os.write(2, b"E0000 00:00:1700000000.000000   12 op.cc:34] absl says no\n")
    err = capfd.readouterr().err
    assert err == "another thread's line\n"
    logged = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert logged == [
        (LOGGER, logging.DEBUG, "some-runtime: INFO: Created TensorFlow Lite XNNPACK delegate for CPU."),
        (LOGGER, logging.DEBUG, "some-runtime: E0000 00:00:1700000000.000000   12 op.cc:34] absl says no"),
    ]


def test_loading_a_model_prints_nothing_unless_debug_is_asked_for(digits_dir: Path) -> None:
    """A fresh process (the runtime logs once per process) loads digits: stderr stays empty at INFO."""
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=sys.argv[2], format='%(levelname)s %(name)s: %(message)s')\n"
        "from edge_agent.inference.runtime import RuntimeOptions, open_interpreter\n"
        "open_interpreter(sys.argv[1], RuntimeOptions())\n"
    )
    model = str(digits_dir / "model.tflite")
    quiet = subprocess.run([sys.executable, "-c", code, model, "INFO"], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    debug = subprocess.run([sys.executable, "-c", code, model, "DEBUG"], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 0, debug.stderr
    if default_backend().name == "ai-edge-litert":
        assert f"DEBUG {LOGGER}: ai-edge-litert: INFO: Created TensorFlow Lite XNNPACK delegate" in debug.stderr
