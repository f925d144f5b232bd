"""``edge-agent predict MODEL --video FILE [--every N] [--out results.jsonl]``: the thin command over ``streams.video``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.errors import RequestError
from edge_agent.fsutil import fsync_dir

if TYPE_CHECKING:
    from edge_agent.inference.runtime import LoadedModel


def predict_video(model: LoadedModel, args: argparse.Namespace) -> int:
    """Write one JSON line per processed frame to ``--out`` (or stdout), with a progress bar on a terminal (stderr)."""
    from edge_agent.streams.video import frame_count, terminal_progress, video_results, write_jsonl

    if args.every < 1:
        raise RequestError(f"--every must be at least 1, got {args.every}")
    results = video_results(model, args.video, args.every)
    # No bar when the lines themselves go to the terminal: it would be drawn over them.
    to_terminal = args.out is None and sys.stdout.isatty()
    progress = None if to_terminal else terminal_progress(frame_count(args.video), args.every)
    try:
        if args.out is None:
            write_jsonl(results, sys.stdout, progress)
            return 0
        out: Path = args.out
        tmp = out.with_name(f".{out.name}.part")
        try:
            with open(tmp, "w") as f:
                n = write_jsonl(results, f, progress)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        if progress is not None:
            progress.close()  # end the bar's line before any message
    tmp.replace(out)  # all lines or none: a killed run leaves no half file under the name
    fsync_dir(out.parent)
    print(f"{n} frames -> {out}", file=sys.stderr)
    return 0
