"""Progress display for batch jobs: status lines and an epoch bar, on stderr via rich.

Training takes seconds to minutes; a silent terminal looks hung. Everything goes to
stderr so stdout stays the job's result (scriptable). ``enabled=False`` makes every call a
no-op, for tests and ``--no-progress``.

The console writes to its own duplicate of the stderr file descriptor, so the bar keeps
drawing while ``tf_env.quiet_native_output`` swallows TensorFlow's C++ chatter on fd 2.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Reporter:
    """Status lines plus a per-epoch progress bar for Keras ``fit``."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(file=_private_stderr(), log_path=False) if enabled else Console(stderr=True, quiet=True)

    def status(self, message: str) -> None:
        """Print one status line (rich markup allowed)."""
        if self.enabled:
            self.console.log(message)

    def keras_callback(self, epochs: int, label: str = "training") -> Any:
        """A Keras callback that drives a progress bar over ``epochs`` (a no-op one when disabled)."""
        import keras  # imported late: TF must be loaded via tf_env first

        reporter = self

        class _EpochBar(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.progress: Progress | None = None
                self.task: Any = None

            def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
                if not reporter.enabled:
                    return
                self.progress = Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[metrics]}"),
                    TimeElapsedColumn(),
                    console=reporter.console,
                    transient=False,
                )
                self.progress.start()
                self.task = self.progress.add_task(label, total=epochs, metrics="")

            def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                if self.progress is not None:
                    shown = " ".join(f"{k}={_num(v)}" for k, v in (logs or {}).items())
                    self.progress.update(self.task, advance=1, metrics=shown)

            def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
                if self.progress is not None:
                    self.progress.stop()
                    self.progress = None

        return _EpochBar()


def _num(value: Any) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return str(value)


def _private_stderr() -> IO[str]:
    """A text stream on a dup of fd 2, unaffected by later redirections of fd 2."""
    try:
        return os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding="utf-8", errors="replace")
    except (AttributeError, OSError, ValueError):  # e.g. a captured sys.stderr without a real fd
        return sys.stderr
