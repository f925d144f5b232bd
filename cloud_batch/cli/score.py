"""``cloud-batch score``: a thin command over ``cloud_batch.score.job.score``."""

from __future__ import annotations

import argparse
from pathlib import Path

from cloud_batch.cli.common import SubParsers, add_command, positive_int, registry_arg

# Parsed options passed through under the library's own keyword names.
_OPTIONS = (
    "engine", "workers", "batch_size", "ray_address", "entity_key", "features", "strict", "overwrite",
    "partition_rows", "publish_features", "features_version",
)  # fmt: skip


def _score(args: argparse.Namespace) -> None:
    """batch inference with the device's own runtime (local process pool or Ray)

    Score a dataset with MODEL version V from the registry, on the int8 TFLite artifact the
    devices run (edge_agent's runtime, batched invoke, one interpreter and thread per worker).
    Inputs: Parquet/CSV files or a directory of them (columns from the manifest, --map or
    --features), .npy/.npz, or a directory of images (decoded as `edge-agent predict` does).
    Output: one Parquet file with the entity key (or 'row', or 'file' for images), every output
    in real values, and top_class/top_score for classifiers; rows in input order. Work is split
    into partitions staged in OUTPUT.parts/: a rerun with the same arguments resumes.
    Every input problem is reported before any scoring starts. See docs/batch.md.

    Example:
    cloud-batch score digits --version 1 --registry models --input digits.npy --output scores.parquet
    cloud-batch score maintenance --version 1 --input live.parquet --output s.parquet --entity-key asset_id \
    --features asset_features --engine ray --publish-features maintenance_scores --features-version 3
    """
    from cloud_batch.score.job import parse_map, score

    options = {name: getattr(args, name) for name in _OPTIONS}
    result = score(
        args.registry, args.model, args.version, args.input, args.output,
        mapping=parse_map(args.map), progress=not args.no_progress, **options,
    )  # fmt: skip
    print(result.summary())


def register_commands(sub: SubParsers) -> None:
    """``score``."""
    parser = add_command(sub, "score", handler=_score)
    parser.add_argument("model", metavar="MODEL", help="model name in the registry")
    parser.add_argument("--version", required=True, metavar="V", help="model version to score with")
    registry_arg(parser)
    parser.add_argument("--input", required=True, type=Path, metavar="PATH", help="file or directory to score")
    parser.add_argument("--output", required=True, type=Path, metavar="PATH", help="output Parquet file")
    parser.add_argument("--engine", choices=("local", "ray"), default="local", help="local process pool or Ray Data")
    parser.add_argument("--workers", type=positive_int, metavar="N", help="scoring workers (default: one per core)")
    parser.add_argument("--batch-size", type=positive_int, default=256, metavar="B", help="rows per invoke (256)")
    parser.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (default: start a local one)")
    parser.add_argument("--entity-key", metavar="COL", help="input column written as the output's key")
    parser.add_argument(
        "--map", action="append", default=[], metavar="INPUT=COL1,COL2,...", help="fill a model input from columns"
    )
    parser.add_argument("--features", metavar="SET[@VERSION]", help="feature set for the model's joined inputs")
    parser.add_argument("--strict", action="store_true", help="undecodable images are an error, not left out")
    parser.add_argument("--overwrite", action="store_true", help="replace an output written with other arguments")
    rows_help = "rows per resumable partition (default: n/16, within 256..65536)"
    parser.add_argument("--partition-rows", type=positive_int, metavar="N", help=rows_help)
    parser.add_argument("--publish-features", metavar="SET", help="then build feature set SET from the output")
    parser.add_argument("--features-version", metavar="V", help="the version of --publish-features SET")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
