"""The shadow child: loads the candidate (and the reference copy of the active version), runs the copies, keeps the figures.

It runs in its own process (``inference.childproc``: forked from the preloaded forkserver, or
``python -m edge_agent.models.shadow.child --fd N`` / the frozen binary's ``__shadow__``), so
its invocations and comparisons never hold the agent's GIL. Over its one connection it gets a
setup message (JSON: the two versions' directories, the fleet key file that opens a sealed
one, the runtime options, the figures to resume from), answers ``{"ready": ...}`` or ``{"error": ...}``, then runs the
copies of every ``blob.pack``ed message and of the shared ``ring`` (mapped once; the agent names
its filled slots, the child answers ``{"freed": n}`` with the figures once it ran them) and
otherwise reports the figures so far every ``REPORT_EVERY_S`` while they change. A closed connection ends it.
It loads at nice 10, then (setup ``"idle"``) runs ``SCHED_IDLE`` until the agent gives it nice 10
back because it starved (``priority``).

Copies are run in batches padded to one size (one interpreter shape: a new batch size would
resize the interpreter, which costs more than the invocations): ``BATCH_ROWS`` rows for a model
whose padded batch stays within ``PAD_BUDGET_S`` at its warm-up latency, fewer (down to 1) for
a costly one, where padding would waste more than the per-call overhead it saves. Latency is
compared like with like: a batch also runs on the private reference copy of the active version
(alternating which runs first), so both p50s are measured in this process on the same inputs:
every batch until ``MIN_PAIRS`` pairs are kept, then every ``REFERENCE_EVERY``-th (the reference
is the shadow's largest cost after the candidate). Without a reference, the active version's own
times are used.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.inference.childproc import die_with_parent, fd_main, lower_priority, options_from_json
from edge_agent.inference.runtime import LoadedModel
from edge_agent.models.sealed import load_fleet_key, model_source
from edge_agent.models.shadow import priority
from edge_agent.models.shadow.blob import Block, read
from edge_agent.models.shadow.compare import compare
from edge_agent.models.shadow.ring import RingView
from edge_agent.wire.model.manifest import MANIFEST_FILE, Manifest

log = logging.getLogger(__name__)

SHADOW_COMMAND = "__shadow__"  # hidden first argument of a frozen edge-agent binary (cli.main)
MODULE = "edge_agent.models.shadow.child"
BATCH_ROWS = 4  # copies are run in batches padded to at most this many rows (longer runs raised the p99)
PAD_BUDGET_S = 0.001  # ... as long as a padded batch costs at most this at the warm-up latency per row
MIN_PAIRS = 32  # every batch is timed on the reference copy until this many latency pairs are kept ...
REFERENCE_EVERY = 8  # ... then every 8th (200 copies in 4-row batches: 50 batches, 36 timed)
KEEP_LATENCIES = 4096  # latency pairs kept for the p50 ratio (the most recent)
KEEP_STATE_PAIRS = 64  # ... of which a restarted agent resumes with this many
REPORT_EVERY_S = 0.25  # figures go to the agent at most this often (each report wakes the agent and costs a parse)


def load(spec: Mapping[str, Any], options: str) -> LoadedModel:
    """One version from its directory (a sealed one opened into this process's memory with the fleet key)."""
    version_dir = Path(spec["dir"])
    manifest = Manifest.load(version_dir / MANIFEST_FILE)
    key = load_fleet_key(spec["fleet_key"]) if spec.get("fleet_key") else None
    model = LoadedModel(model_source(version_dir, manifest, key), manifest, options_from_json(options))
    model.warmup(3)
    return model


class Tally:
    """The figures so far (``ShadowFigures`` fields but ``dropped``, which the agent counts).

    ``state()`` is what a restarted agent resumes from (``Tally(state)``): the counts and the most
    recent ``KEEP_STATE_PAIRS`` latency pairs (kept small: it is reported a few times a second).
    """

    def __init__(self, state: Mapping[str, Any] | None = None) -> None:
        s = state or {}
        self.samples, self.rows = int(s.get("samples", 0)), int(s.get("rows", 0))
        self.agree, self.errors, self.batches = int(s.get("agree", 0)), int(s.get("errors", 0)), 0
        self.abs_sum = float(s.get("abs_sum", 0.0))
        self.latency: deque[tuple[float, float]] = deque(maxlen=KEEP_LATENCIES)  # (active s, candidate s)
        self.latency.extend((float(a), float(c)) for a, c in s.get("pairs", []))

    def state(self) -> dict[str, Any]:
        pairs = [[round(a, 9), round(c, 9)] for a, c in list(self.latency)[-KEEP_STATE_PAIRS:]]
        counts = {"samples": self.samples, "rows": self.rows, "agree": self.agree, "errors": self.errors}
        return {**counts, "abs_sum": self.abs_sum, "pairs": pairs}

    def to_dict(self) -> dict[str, Any]:
        ratio = None
        if self.latency:
            pairs = np.asarray(self.latency, dtype=np.float64)
            active_p50 = float(np.median(pairs[:, 0]))
            ratio = float(np.median(pairs[:, 1])) / active_p50 if active_p50 > 0 else None
        rows = self.rows
        return {
            "samples": self.samples,
            "agreement": self.agree / rows if rows else None,
            "mean_abs_diff": self.abs_sum / rows if rows else None,
            "latency_ratio": ratio,
            "errors": self.errors,
        }


class Shadow:
    """Runs blocks of copies on ``candidate`` (and, timed beside it, ``reference``) into a ``Tally``."""

    def __init__(self, candidate: LoadedModel, reference: LoadedModel | None, tally: Tally | None = None) -> None:
        self.candidate, self.reference = candidate, reference
        self.size = batch_rows(candidate)
        self.tally = tally or Tally()
        self.timed = 0  # batches timed on the reference: which version runs first alternates

    def run(self, block: Block) -> None:
        """Every copy of ``block``, consecutive copies together in batches of at most ``size`` rows."""
        bounds = np.cumsum([0, *block.rows]).tolist()
        i = 0
        while i < len(block.rows):
            j = i + 1
            while j < len(block.rows) and bounds[j + 1] - bounds[i] <= self.size:
                j += 1
            self._run(block, i, j, bounds)
            i = j

    def _run(self, block: Block, i: int, j: int, bounds: list[int]) -> None:
        lo, hi = bounds[i], bounds[j]
        inputs = {n: _padded(a, lo, hi, self.size) for n, a in block.inputs.items()}
        active = {n: a if not a.ndim else a[lo:hi] for n, a in block.outputs.items()}
        # The reference runs first on every other timed batch: neither version gets the warmer caches.
        t = self.tally
        timed = self.reference is not None and (len(t.latency) < MIN_PAIRS or t.batches % REFERENCE_EVERY == 0)
        first = timed and self.timed % 2 == 0
        self.timed += timed
        t.batches += 1
        active_s = sum(block.seconds[i:j])
        if first and self.reference is not None:
            active_s = _timed(self.reference, inputs)[1]
        out, cand_s = _timed(self.candidate, inputs)
        if out is None and j - i > 1:  # find the copies that fail on their own
            for k in range(i, j):
                self._run(block, k, k + 1, bounds)
            return
        if out is None:
            t.errors += 1
            return
        if timed and not first and self.reference is not None:
            active_s = _timed(self.reference, inputs)[1]
        n, agree, mad = compare(active, {k: v if not v.ndim else v[: hi - lo] for k, v in out.items()})
        t.samples += j - i
        t.rows += n
        t.agree += agree
        t.abs_sum += mad * n if np.isfinite(mad) else 0.0
        if timed or self.reference is None:
            t.latency.append((active_s, cand_s))


def batch_rows(model: LoadedModel) -> int:
    """The padded batch size: ``BATCH_ROWS`` (within the model's batch limits), halved until the batch
    costs at most ``PAD_BUDGET_S`` at the warm-up latency (batch 1) per row, down to 1."""
    size = max(1, min(BATCH_ROWS, model.max_batch, model.options.max_resident_batch))
    per_row = model.warm_latency_s or 0.0
    while size > 1 and size * per_row > PAD_BUDGET_S:
        size //= 2
    return size


def _padded(a: np.ndarray, lo: int, hi: int, size: int) -> np.ndarray:
    """Rows ``lo:hi`` of ``a`` padded with zeros to ``size`` rows (a fixed interpreter shape)."""
    if not a.ndim:
        return a
    part = a[lo:hi]
    if hi - lo >= size:
        return part
    return np.concatenate([part, np.zeros((size - (hi - lo), *a.shape[1:]), a.dtype)])


def _timed(model: LoadedModel, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray] | None, float]:
    """``model.predict(inputs)`` and its seconds; None for the outputs when it raised."""
    t0 = time.perf_counter()
    try:
        out = model.predict(inputs)
    except Exception as exc:
        log.debug("shadow %s %s failed: %s", model.name, model.version, exc)
        return None, time.perf_counter() - t0
    return out, time.perf_counter() - t0


def serve(conn: Connection) -> None:
    """The child's life: setup, then one figures answer per message, until the connection closes.

    It loads at nice 10 and, with setup ``"idle"``, runs the copies ``SCHED_IDLE`` (``priority``).
    """
    lower_priority(priority.NICE)
    try:
        setup = json.loads(conn.recv_bytes())
        try:
            candidate = load(setup["candidate"], setup["options"])
            reference = load(setup["reference"], setup["options"]) if setup.get("reference") else None
        except Exception as exc:  # a verdict on the candidate: the agent rejects with it
            conn.send_bytes(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
            return
        shadow = Shadow(candidate, reference, Tally(setup.get("resume")))
        if setup.get("idle"):
            priority.go_idle()
        conn.send_bytes(json.dumps({"ready": True, "pid": os.getpid(), "priority": priority.current()}).encode())
        _run(conn, shadow)
    except (EOFError, OSError):  # the agent closed the connection (stop) or died
        return
    finally:
        conn.close()


def _run(conn: Connection, shadow: Shadow) -> None:
    """Messages in; the figures out every REPORT_EVERY_S while they change (waiting messages or not)."""
    last, dirty = time.monotonic(), True  # a first report: resumed figures show without traffic
    ring: RingView | None = None  # the agent's shared ring of copies, once it is sent
    while True:
        due = last + REPORT_EVERY_S - time.monotonic()
        if dirty and (due <= 0 or not conn.poll(due)):
            conn.send_bytes(json.dumps(_report(shadow)).encode())
            last, dirty = time.monotonic(), False
            continue
        message = read(conn.recv_bytes())
        if isinstance(message, list):
            for block in message:
                shadow.run(block)
        elif "ring" in message:
            ring = RingView(message["ring"], recv_handle(conn))
        elif ring is not None:  # {"slots": [start, n]}: copies in the shared ring, freed once run
            start, n = message["slots"]
            for block in ring.blocks(start, n):
                shadow.run(block)
            conn.send_bytes(json.dumps({"freed": n, **_report(shadow)}).encode())  # one wake-up of the agent
            last, dirty = time.monotonic(), False
            continue
        dirty = True


def _report(shadow: Shadow) -> dict[str, Any]:
    return {**shadow.tally.to_dict(), "state": shadow.tally.state(), "priority": priority.current()}


def serve_forked(conn: Connection) -> None:
    """The forkserver child's entry point."""
    die_with_parent()
    serve(conn)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_agent.models.shadow.child --fd N``: serve the agent on the inherited descriptor N."""
    return fd_main(argv, MODULE, "Run a shadow candidate for the agent (started by the agent, not by hand).", serve)


if __name__ == "__main__":
    sys.exit(main())
