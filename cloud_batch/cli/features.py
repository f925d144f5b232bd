"""``cloud-batch features build|push``: feature bundles from the registry to a fleet.

``register_commands(sub)`` adds them to the ``cloud-batch`` parser (``cli.py`` calls it). Thin:
each handler makes one call into ``cloud_batch.features.build`` and prints its summary. Errors the
library raises on purpose print as ``error: ...`` with exit code 2 (``cli.common.run``);
``python -m cloud_batch.cli.features`` runs these commands alone, with the same handling.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cloud_batch.cli.common import (
    SubParsers,
    add_command,
    add_group,
    chunk_size_arg,
    positive_int,
    run,
    standalone_parser,
    tls_args,
)

BROKER = "mqtt://localhost:1883"
FEATURES_DOC = """build feature bundles and push them to a fleet

Feature sets: one row of numbers per entity (an asset, a camera), computed in the cloud
and cached on devices, which join them into real-time predictions. `build` writes a snapshot
version into the registry (DIR/features/SET/V/); `push` publishes it, signed, over MQTT.

Example:
cloud-batch features build asset_features --version 1 --registry registry --recipe maintenance
cloud-batch features push asset_features --version 1 --fleet plant-7 --registry registry --key keys/signing.key --broker mqtt://localhost:1883
"""


# -- handlers ------------------------------------------------------------------------------------
# Parsed options passed through under the library's own keyword names.
_BUILD_OPTIONS = (
    "source", "entity_key", "recipe", "history", "as_of", "seed", "n_assets", "days", "ttl_s", "stale_policy",
    "event_ts_col", "dtype",
)  # fmt: skip
_PUSH_OPTIONS = ("delta_from", "partition_map", "chunk_size")


def _options(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names}


def _build(args: argparse.Namespace) -> None:
    """write a snapshot version of a feature set into the registry

    Write feature set SET version V as a snapshot bundle (bundle.json + data.npz) into
    DIR/features/SET/V/, from either
      --from FILE.csv|FILE.parquet --entity-key COL   precomputed features: every other numeric column
                                                     is a feature; event times from --event-ts-col
                                                     (epoch seconds or ISO-8601; default: now)
      --recipe maintenance                           per-asset aggregates (asset_features) of the sensor
                                                     history (--history FILE, or the seeded synthetic one)
    Values must be finite numbers, one row per entity: a text column, a NaN or a duplicate entity
    is an error naming it, and nothing is written. Versions are immutable: building the same
    content again is a no-op, different content under an existing version is refused.

    Example:
    cloud-batch features build asset_features --version 1 --registry registry --recipe maintenance
    cloud-batch features build cam_stats --version 3 --registry registry --from stats.csv --entity-key camera --event-ts-col computed_at --ttl-s 86400 --stale-policy serve
    """
    from cloud_batch.features.build import build

    options = _options(args, _BUILD_OPTIONS)
    print(build(args.registry, args.set, args.version, progress=not args.no_progress, **options).summary())


def _push(args: argparse.Namespace) -> None:
    """publish a feature set version to a fleet over MQTT

    Publish snapshot V of SET from the registry as a signed release of kind 'features',
    retained on edgefleet/v1/fleets/F/features/SET/all/all, with the bundle as retained chunks.
    --delta-from V0 sends only what changed since V0 (new or changed entities, deletions), with the
    snapshot as fallback for devices that do not hold V0. --partition-map FILE.csv (columns
    entity,partition; partition device:<id> or group:<name>) sends each partition only its
    entities, on its own topic (.../device/<id> or .../group/<name>); every entity must be mapped.
    Every input is checked before anything is published; superseded artifacts are cleared.

    Example:
    cloud-batch features push asset_features --version 2 --fleet plant-7 --registry registry --key keys/signing.key --broker mqtt://localhost:1883
    cloud-batch features push asset_features --version 3 --fleet plant-7 --registry registry --key keys/signing.key --broker mqtt://localhost:1883 --delta-from 2 --partition-map sites.csv
    """
    from cloud_batch.features.push import plan_push, publish_push
    from cloud_batch.fleetops.broker import open_link, tls_config

    plan = plan_push(args.registry, args.set, args.version, args.fleet, args.key, **_options(args, _PUSH_OPTIONS))
    tls = tls_config(args.tls_ca, args.tls_cert, args.tls_key)
    with open_link(args.broker, tls=tls) as link:  # only once every input checked out: a bad one publishes nothing
        print(publish_push(link, plan, progress=not args.no_progress).summary())


# -- argument types --------------------------------------------------------------------------
def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


# -- wiring ------------------------------------------------------------------------------------
def register_commands(sub: SubParsers) -> None:
    """Add ``features`` (``build``, ``push``) to the ``cloud-batch`` subparsers."""
    features_sub = add_group(sub, "features", dest="features_command", doc=FEATURES_DOC)

    build = add_command(features_sub, "build", _build)
    build.add_argument("set", metavar="SET", help="feature set name (a topic segment, e.g. asset_features)")
    build.add_argument("--version", required=True, metavar="V", help="version to build, e.g. 3 or 1.2.0")
    build.add_argument("--registry", required=True, type=Path, metavar="DIR", help="registry directory")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from", dest="source", type=Path, metavar="FILE", help="precomputed features (.csv or .parquet)"
    )
    source.add_argument("--recipe", metavar="NAME", help="compute the features from raw history (recipes: maintenance)")
    build.add_argument("--entity-key", metavar="COL", help="with --from: the column naming each entity")
    build.add_argument(
        "--event-ts-col",
        metavar="COL",
        help="with --from: when each row's data was observed (epoch s or ISO-8601; default: now)",
    )
    build.add_argument(
        "--ttl-s", type=_seconds, metavar="S", help="devices treat a value older than this as expired (default: never)"
    )
    build.add_argument(
        "--stale-policy",
        choices=("reject", "serve"),
        default="reject",
        help="what a join does with an expired value: reject (missing) or serve it flagged (default: reject)",
    )
    build.add_argument(
        "--dtype",
        choices=("float32", "float64", "int64"),
        default="float32",
        help="with --from: the features' dtype (default: float32)",
    )
    build.add_argument(
        "--history",
        type=Path,
        metavar="FILE",
        help="with --recipe: sensor history (.csv or .parquet; default: the synthetic one)",
    )
    build.add_argument(
        "--as-of", metavar="TIME", help="with --recipe: compute as of this time (default: the newest reading)"
    )
    build.add_argument(
        "--seed", type=int, default=0, metavar="N", help="with --recipe, no --history: seed (default: 0)"
    )
    build.add_argument(
        "--assets",
        dest="n_assets",
        type=positive_int,
        default=200,
        metavar="N",
        help="with --recipe, no --history: number of assets (default: 200)",
    )
    build.add_argument(
        "--days",
        type=positive_int,
        default=60,
        metavar="N",
        help="with --recipe, no --history: days of hourly readings (default: 60)",
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bar or status lines")

    push = add_command(features_sub, "push", _push)
    push.add_argument("set", metavar="SET", help="feature set name")
    push.add_argument("--version", required=True, metavar="V", help="built version to publish")
    push.add_argument("--fleet", required=True, metavar="F", help="fleet name (a topic segment)")
    push.add_argument("--registry", required=True, type=Path, metavar="DIR", help="registry directory")
    push.add_argument("--key", required=True, type=Path, metavar="KEYFILE", help="signing.key from `keys generate`")
    push.add_argument("--broker", required=True, metavar="URL", help=f"MQTT broker, e.g. {BROKER}")
    tls_args(push)
    push.add_argument("--delta-from", metavar="V0", help="publish a delta from this older built version")
    push.add_argument(
        "--partition-map",
        type=Path,
        metavar="FILE.csv",
        help="entity,partition CSV: one release per device:<id> / group:<name>",
    )
    chunk_size_arg(push)
    push.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """A parser with only these commands (``python -m cloud_batch.cli.features``, tests)."""
    example = "cloud-batch features build asset_features --version 1 --registry registry --recipe maintenance"
    return standalone_parser("edgefleet feature sets.", example, register_commands)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one of these commands with ``common.run``'s error handling; return the exit code."""
    return run(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
