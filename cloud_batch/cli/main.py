"""``cloud-batch``: the cloud side's command line. Thin: parse, call one library function, print.

Adding a command: write ``add_<thing>(sub)`` that calls ``common.add_command`` (which enforces
the "Example:" block ending every help text) and append it to ``COMMANDS``. Handlers take the
parsed namespace and return an exit code (``None`` means 0); ``common.run`` turns the errors
the library raises on purpose into ``error: ...`` and exit code 2.

Heavy modules (TensorFlow via the training jobs) are imported inside handlers, so ``--help``
and ``register`` stay fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cloud_batch.cli.agent import register_commands as add_agent
from cloud_batch.cli.common import PROG, SubParsers, add_command, add_group, positive_int, registry_arg, run
from cloud_batch.cli.data import register_commands as add_data
from cloud_batch.cli.features import register_commands as add_features
from cloud_batch.cli.ota import register_commands
from cloud_batch.cli.pipeline import register_commands as add_pipeline
from cloud_batch.cli.pki import register_commands as add_pki
from cloud_batch.cli.score import register_commands as add_score

# -- train ---------------------------------------------------------------------


def _train_args(parser: argparse.ArgumentParser) -> None:
    registry_arg(parser)
    parser.add_argument("--version", metavar="V", help="version to register (default: one past the latest)")
    parser.add_argument("--epochs", type=positive_int, metavar="N", help="training epochs (default: the job's own)")
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed for data split, init and shuffling (default: 0)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or status lines")


def _train_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"version": args.version, "seed": args.seed, "progress": not args.no_progress}
    if args.epochs is not None:
        kwargs["epochs"] = args.epochs
    return kwargs


def _train_digits(args: argparse.Namespace) -> None:
    from cloud_batch.train.digits import train_digits

    print(train_digits(args.registry, **_train_kwargs(args)).summary())


def _train_maintenance(args: argparse.Namespace) -> None:
    from cloud_batch.train.maintenance.job import train_maintenance

    print(train_maintenance(args.registry, quantization=args.quantization, **_train_kwargs(args)).summary())


def add_train(sub: SubParsers) -> None:
    """``train digits`` and ``train maintenance``."""
    models = add_group(
        sub,
        "train",
        dest="model",
        metavar="MODEL",
        help="train, quantize, gate and register a model",
        description="Train a model, quantize it to full-integer TFLite, evaluate it the way a device runs it,\n"
        "and register it only if it passes the quality gate.",
        example="cloud-batch train digits --registry models\ncloud-batch train maintenance --registry models --version 2",
    )
    digits = add_command(
        models,
        "digits",
        handler=_train_digits,
        help="8x8 handwritten digits CNN (int8)",
        description="Train the digits CNN on scikit-learn's load_digits (no download), quantize to int8 and\n"
        "register it if held-out int8 accuracy is >= 0.95 and at most 1 point below float.\n"
        "Input 'pixels' FP32 [batch,8,8,1] raw 0..16; output 'probs' FP32 [batch,10].\n"
        "A training report (eval.json, eval.png) goes to DIR/digits/<version>.eval/.",
        example="cloud-batch train digits --registry models --version 1\ncloud-batch train digits --epochs 5 --no-progress",
    )
    _train_args(digits)

    maint = add_command(
        models,
        "maintenance",
        handler=_train_maintenance,
        help="predictive-maintenance MLP (two inputs)",
        description="Simulate fleet sensor history, train the failure model (inputs 'live' [batch,4] and\n"
        "'asset_features' [batch,K], raw values; output 'failure_prob' [batch,1]), quantize and\n"
        "register it if held-out AUC is >= 0.85 and at most 0.01 below float.\n"
        "int16x8 (int8 weights, int16 activations) is the default: at int8 the raw inputs' single\n"
        "scale per tensor rounds small features away and the gate refuses the model.",
        example="cloud-batch train maintenance --registry models --version 1\n"
        "cloud-batch train maintenance --quantization int8   # see the gate refuse it",
    )
    _train_args(maint)
    maint.add_argument(
        "--quantization", choices=("int8", "int16x8"), default="int16x8", help="full-integer mode (default: int16x8)"
    )


# -- register ------------------------------------------------------------------


def _register(args: argparse.Namespace) -> None:
    from cloud_batch.errors import input_errors
    from cloud_batch.registry.compat import register_compatible
    from cloud_batch.registry.models import Registry
    from edge_agent.wire.model.merge import build_kwargs, load_fields

    with input_errors():
        fields = build_kwargs(load_fields(args.manifest)) if args.manifest else {}
    registry = Registry(args.registry)
    manifest, taken, changes = register_compatible(
        registry, args.tflite, args.name, args.version, breaking=args.breaking, golden=args.golden, **fields
    )
    path = registry.path(manifest.name, manifest.version)
    for generic, kept in sorted(taken.items()):
        print(f"named {generic!r} {kept!r}, as in the previous version")
    for change in changes:
        print(f"breaking: {change}")
    print(
        f"registered {manifest.name} version {manifest.version} -> {path} "
        f"({manifest.size} bytes, sha256 {manifest.sha256[:12]}…)"
    )


def add_register(sub: SubParsers) -> None:
    """``register``: bring your own ``.tflite``."""
    parser = add_command(
        sub,
        "register",
        handler=_register,
        help="register an existing .tflite file",
        description="Register a .tflite model as NAME version V. Input/output specs are read from the model.\n"
        "Golden samples come from --golden (checked against the model) or, without it, from\n"
        "running the model on random inputs that fit its spec. Versions are immutable: registering\n"
        "an existing version again is a no-op if identical and refused if different.",
        example="cloud-batch register detector.tflite --name detector --version 3 --registry models\n"
        "cloud-batch register detector.tflite --name detector --version 4 --golden golden.npz",
    )
    parser.add_argument("tflite", type=Path, metavar="FILE.tflite", help="the model file")
    parser.add_argument("--name", required=True, help="model name (letters, digits, '_', '.', '-')")
    parser.add_argument("--version", required=True, metavar="V", help="version, e.g. 3 or 1.2.0")
    registry_arg(parser)
    parser.add_argument(
        "--golden", type=Path, metavar="FILE.npz", help="golden samples: arrays in:<input> and out:<output>"
    )
    parser.add_argument("--manifest", type=Path, metavar="FILE.json", help="manifest fields to merge (docs/vision.md)")
    parser.add_argument(
        "--breaking", action="store_true", help="allow a signature unlike the latest version's (docs/shadow.md)"
    )


# Subcommands in help order. Others append theirs (keys, release, rollout, fleet, features).
COMMANDS: list[Callable[[SubParsers], None]] = [
    add_train,
    add_register,
    register_commands,
    add_features,
    add_data,
    add_pki,
    add_score,
    add_pipeline,
    add_agent,
]


def build_parser() -> argparse.ArgumentParser:
    """The full ``cloud-batch`` parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="edgefleet cloud batch side: train, quantize and register models for the edge agent.",
        epilog="Example:\n  cloud-batch train digits --registry models\n"
        "  cloud-batch register model.tflite --name mine --version 1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cloud-batch`` console script; returns the exit code."""
    return run(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
