"""``cloud-batch pipeline run|status``: thin commands over ``cloud_batch.pipeline``.

``run`` exits 0 when the run completed and every gate passed, 1 when it completed but a gate
failed (nothing was released: schedulers see it), 2 on an error (a failed step, a held lock, a
bad config), printed as ``error: ...``.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from cloud_batch.cli.common import SubParsers, add_command, add_group

EXIT_GATE_FAILED = 1
GROUP_HELP = "the nightly loop: ingest, retrain, calibrate, gate, release, report"
GROUP_TEXT = "Retrain a model on the fleet's labeled field data every night and release it when it\nbeats production: see docs/nightly.md."
EXAMPLE = "cloud-batch pipeline run --config pipeline.toml\ncloud-batch pipeline status --model maintenance"


def _run(args: argparse.Namespace) -> int:
    from cloud_batch.pipeline.config import load_config
    from cloud_batch.pipeline.context import Run, check_as_of
    from cloud_batch.pipeline.runner import run_pipeline
    from cloud_batch.progress import Reporter

    as_of = check_as_of(args.as_of or dt.datetime.now(dt.timezone.utc).date().isoformat())
    config = load_config(args.config)
    outcome = run_pipeline(Run(config, as_of, dry_run=args.dry_run, reporter=Reporter(not args.no_progress)))
    print(outcome.summary())
    return 0 if outcome.gates_passed else EXIT_GATE_FAILED


def _status(args: argparse.Namespace) -> None:
    from cloud_batch.pipeline.status import format_runs, list_runs, to_json

    runs_dir = args.runs_dir
    if args.config is not None:
        from cloud_batch.pipeline.config import load_config

        runs_dir = load_config(args.config).runs_dir
    runs = list_runs(runs_dir, args.model)
    print(to_json(runs) if args.json else format_runs(runs))


def register_commands(sub: SubParsers) -> None:
    """The ``pipeline`` group: ``run`` and ``status``."""
    group = add_group(
        sub, "pipeline", dest="pipeline_command", help=GROUP_HELP, description=GROUP_TEXT, example=EXAMPLE
    )
    run = add_command(
        group,
        "run",
        handler=_run,
        help="run (or resume) the nightly pipeline of one model",
        description="Steps: ingest, dataset, features, train, quantize, calibrate, gate, register, release,\n"
        "report; outputs under RUNS/<model>/<as-of>/<step>/. A rerun for the same --as-of resumes at\n"
        "the first unfinished step. Exit 0: released (or dry run passed), 1: a gate failed and nothing\n"
        "was released, 2: a step failed (the error names it) or another run holds the model's lock.",
        example="cloud-batch pipeline run --config pipeline.toml\n"
        "cloud-batch pipeline run --config pipeline.toml --as-of 2026-12-01 --dry-run",
    )
    run.add_argument("--config", required=True, type=Path, metavar="FILE.toml", help="the pipeline.toml")
    run.add_argument("--as-of", metavar="YYYY-MM-DD", help="the run's date (default: today, UTC)")
    run.add_argument("--dry-run", action="store_true", help="everything but register and release")
    run.add_argument("--no-progress", action="store_true", help="no progress bars or step lines on stderr")

    status = add_command(
        group,
        "status",
        handler=_status,
        help="list runs, step states, gate outcomes and release ids",
        description="Read RUNS (default ./runs, or the runs_dir of --config) and show every run.",
        example="cloud-batch pipeline status\ncloud-batch pipeline status --model maintenance --json",
    )
    status.add_argument("--model", metavar="M", help="only this model's runs")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument(
        "--runs-dir", type=Path, default=Path("runs"), metavar="DIR", help="runs directory (default: ./runs)"
    )
    status.add_argument(
        "--config", type=Path, metavar="FILE.toml", help="take the runs directory from this pipeline.toml"
    )
