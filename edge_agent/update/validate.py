"""Validate an update candidate in a child process, so a model that crashes the interpreter cannot take the agent down.

A ``.tflite`` file is a flatbuffer that the TFLite runtime reads without a verifier: a
malformed or hostile file can segfault the process that loads it. The agent therefore
never loads a candidate itself before it has passed here. ``validate_candidate`` runs
``python -m edge_agent.update.validate`` on the unpacked version directory; the child

1. checks the manifest, size and sha256, loads the model and compares its tensors with the
   manifest (``IncompatibleModelError`` names e.g. a custom op the runtime lacks),
2. re-runs the golden samples (``ValidationError`` with the output and the error),
3. measures the p50 latency of single-sample calls,

and prints one JSON line. The parent turns that line, a death by signal or a timeout into
the agent's own errors; the latency budget is judged by the parent.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_agent.errors import EdgeError, FailedError, IncompatibleModelError, ManifestError, ValidationError
from edge_agent.inference.runtime import DelegateSpec, RuntimeOptions

DEFAULT_RUNS = 30
_ERROR_KINDS: dict[str, type[EdgeError]] = {
    "incompatible": IncompatibleModelError,
    "manifest": ManifestError,
    "validation": ValidationError,
}
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])


def options_to_json(options: RuntimeOptions | None) -> str:
    o = options or RuntimeOptions()
    return json.dumps(
        {
            "num_threads": o.num_threads,
            "delegates": [{"library": d.library, "options": dict(d.options)} for d in o.delegates],
        }
    )


def options_from_json(text: str) -> RuntimeOptions:
    raw = json.loads(text)
    delegates = tuple(
        DelegateSpec(str(d["library"]), {str(k): str(v) for k, v in (d.get("options") or {}).items()})
        for d in raw.get("delegates") or []
    )
    # One interpreter: validation measures a single call's latency, as one request sees it.
    return RuntimeOptions(num_threads=raw.get("num_threads"), delegates=delegates, pool_size=1)


def validate_candidate(
    version_dir: str | Path,
    *,
    max_latency_ms: float | None,
    runtime_options: RuntimeOptions | None = None,
    timeout_s: float = 120,
    runs: int = DEFAULT_RUNS,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Validate ``version_dir`` in a child process; return its report or raise.

    Raises IncompatibleModelError or ManifestError (the model cannot run here), and
    ValidationError (golden samples differ, the child crashed or timed out, or the p50
    latency is above ``max_latency_ms``). The report holds ``name``, ``version``,
    ``p50_ms``, ``golden`` (worst error per output) and ``delegate``. Setting ``stop`` kills
    the child and raises FailedError (the agent is shutting down or the update was aborted).
    """
    # A frozen (PyInstaller) agent has no `python -m`: its own binary runs the child instead.
    child = (
        [sys.executable, VALIDATE_COMMAND]
        if getattr(sys, "frozen", False)
        else [sys.executable, "-m", "edge_agent.update.validate"]
    )
    cmd = [*child, str(version_dir), "--runs", str(runs), "--options", options_to_json(runtime_options)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, start_new_session=True
    )
    deadline = time.monotonic() + timeout_s
    while True:
        if stop is not None and stop.is_set():
            proc.kill()
            proc.communicate()
            raise FailedError(f"validation of {version_dir} stopped")
        try:
            out, err = proc.communicate(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
            break
        except subprocess.TimeoutExpired:  # retrying communicate() loses no output
            if time.monotonic() >= deadline:
                proc.kill()
                proc.communicate()
                raise ValidationError(
                    f"validation of {version_dir} did not finish within {timeout_s:g}s (killed)"
                ) from None
    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
        raise ValidationError(f"validation process crashed ({sig})")
    report = _last_json_line(out)
    if report is None:
        tail = " | ".join(line for line in err.strip().splitlines()[-3:])
        raise ValidationError(f"validation process exited with status {proc.returncode} without a report: {tail}")
    if not report.get("ok"):
        cls = _ERROR_KINDS.get(str(report.get("kind")), ValidationError)
        raise cls(str(report.get("reason") or "validation failed"))
    p50 = float(report["p50_ms"])
    if max_latency_ms is not None and p50 > max_latency_ms:
        raise ValidationError(f"p50 {p50:.3f} ms over the release's budget {max_latency_ms:g} ms")
    return report


def _last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                return doc
    return None


# -- child side ---------------------------------------------------------------------------
def check(version_dir: Path, options: RuntimeOptions, runs: int) -> dict[str, Any]:
    """Everything the child does (also callable in-process by tools that trust the file)."""
    from edge_agent.inference.bench import latency_stats
    from edge_agent.inference.golden import check_golden, load_golden
    from edge_agent.inference.modelpack import verify_version_dir
    from edge_agent.inference.runtime import LoadedModel

    # Manifest, size and sha256 first (no interpreter yet), then load: tensors against the manifest, golden.
    manifest = verify_version_dir(version_dir, run_golden=True, options=options)
    model = LoadedModel(version_dir / manifest.file, manifest, options)
    golden = check_golden(model, load_golden(version_dir / manifest.golden)) if manifest.golden else {}
    sample = model.example_inputs(batch=1, seed=3)
    for _ in range(3):
        model.predict(sample)
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        model.predict(sample)
        times.append(time.perf_counter() - t0)
    stats = latency_stats(times)
    return {
        "ok": True,
        "name": manifest.name,
        "version": manifest.version,
        "p50_ms": stats["p50_ms"],
        "p95_ms": stats["p95_ms"],
        "runs": stats["n"],
        "golden": golden,
        "delegate": model.delegate,
    }


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the agent dies (kill -9), instead of validating for nobody."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


VALIDATE_COMMAND = "__validate__"  # hidden first argument of a frozen edge-agent binary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_agent.update.validate VERSION_DIR``: print one JSON report line; exit 0 if it passed."""
    parser = argparse.ArgumentParser(
        prog="python -m edge_agent.update.validate",
        description="Validate a model version directory (run by the agent in a child process).",
        epilog="Example: python -m edge_agent.update.validate /var/lib/edgefleet/staging/digits-2",
    )
    parser.add_argument("version_dir", type=Path)
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="timed calls for the p50 latency")
    parser.add_argument("--options", default="{}", help="runtime options as JSON (num_threads, delegates)")
    args = parser.parse_args(argv)
    _die_with_parent()
    try:
        report = check(args.version_dir, options_from_json(args.options), args.runs)
    except IncompatibleModelError as exc:
        report = {"ok": False, "kind": "incompatible", "reason": str(exc)}
    except ManifestError as exc:
        report = {"ok": False, "kind": "manifest", "reason": str(exc)}
    except EdgeError as exc:  # ValidationError, RejectedError (sha256/size), RequestError
        report = {"ok": False, "kind": "validation", "reason": str(exc)}
    except Exception as exc:  # the runtime raising something unexpected is still a verdict on the model
        report = {"ok": False, "kind": "validation", "reason": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(report, sort_keys=True), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
