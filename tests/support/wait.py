"""Waiting in tests: poll a condition until it holds, with a deadline and a clear failure."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any


def until(cond: Callable[[], Any], timeout: float, step: float = 0.02) -> Any:
    """Poll ``cond`` until it returns something truthy; that value, or None when ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() >= deadline:
            return value or None
        time.sleep(step)


def wait_for(
    cond: Callable[[], Any],
    timeout: float = 30.0,
    what: str = "condition",
    *,
    proc: subprocess.Popen[Any] | None = None,
    detail: Callable[[], str] | None = None,
    step: float = 0.02,
) -> Any:
    """``until`` (every ``step`` s), failing the test on timeout, or as soon as ``proc`` exits; ``detail()`` (a log)
    is appended."""

    def check() -> Any:
        value = cond()
        if not value and proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited (rc {proc.returncode}) while waiting for {what}{_more(detail)}")
        return value

    value = until(check, timeout, step)
    if not value:
        raise AssertionError(f"timed out waiting for {what}{_more(detail)}")
    return value


def _more(detail: Callable[[], str] | None) -> str:
    return f"\n{detail()}" if detail is not None else ""
