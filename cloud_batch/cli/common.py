"""What every ``cloud-batch`` command module shares: the help-with-example rule, argument types, error handling.

Kept apart from ``main`` (which lists the commands) so command modules (``ota``, ``features``)
depend on this and ``main`` depends on them, never the other way round. Errors the library
raises on purpose (``CloudError``, ``EdgeError``) become ``error: ...`` on stderr and exit
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cloud_batch.errors import CloudError
from edge_agent.errors import EdgeError

PROG = "cloud-batch"
DEFAULT_REGISTRY = Path("registry")
EXIT_ERROR = 2

Handler = Callable[[argparse.Namespace], "int | None"]
SubParsers = Any  # argparse's _SubParsersAction is private


def add_command(
    sub: SubParsers, name: str, *, help: str, description: str, example: str, handler: Handler | None = None
) -> argparse.ArgumentParser:
    """Add subcommand ``name`` whose help ends with an ``Example:`` block; bind ``handler`` if given."""
    parser = sub.add_parser(
        name,
        help=help,
        description=description.strip(),
        epilog=_example(example),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if handler is not None:
        parser.set_defaults(handler=handler)
    return parser


def add_group(
    sub: SubParsers, name: str, *, dest: str, help: str, description: str, example: str, metavar: str = "COMMAND"
) -> SubParsers:
    """A command that only holds subcommands (``keys generate``, ``fleet status``); returns their subparsers."""
    group = add_command(sub, name, help=help, description=description, example=example)
    return group.add_subparsers(dest=dest, metavar=metavar, required=True)


def _example(example: str) -> str:
    body = "\n".join("  " + line if line else "" for line in example.strip("\n").splitlines())
    return f"Example:\n{body}"


def standalone_parser(
    description: str, example: str, register: Callable[[SubParsers], None]
) -> argparse.ArgumentParser:
    """A ``cloud-batch`` parser with only the commands ``register`` adds (``python -m cloud_batch.cli.ota``, tests)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=description,
        epilog=_example(example),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return parser


def registry_arg(parser: argparse.ArgumentParser) -> None:
    """``--registry DIR`` with the default every command shares."""
    parser.add_argument(
        "--registry",
        type=Path,
        default=DEFAULT_REGISTRY,
        metavar="DIR",
        help="registry directory (default: ./registry)",
    )


def tls_args(parser: argparse.ArgumentParser) -> None:
    """``--tls-ca/--tls-cert/--tls-key`` next to ``--broker`` (an mqtts:// broker, mutual TLS)."""
    parser.add_argument("--tls-ca", metavar="FILE", help="CA certificate that signed the broker's (mqtts://)")
    parser.add_argument("--tls-cert", metavar="FILE", help="client certificate for mutual TLS (`pki issue service`)")
    parser.add_argument("--tls-key", metavar="FILE", help="the client certificate's private key")


def _number(text: str, cast: Callable[[str], Any], expected: str, ok: Callable[[Any], bool], rule: str) -> Any:
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{rule}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    return int(_number(text, int, "a whole number", lambda v: v >= 1, "must be at least 1"))


def positive(text: str) -> float:
    """An argparse type: a number > 0."""
    return float(_number(text, float, "a positive number", lambda v: v > 0, "must be > 0"))


def rate(text: str) -> float:
    """An argparse type: a share between 0 and 1."""
    return float(_number(text, float, "a number between 0 and 1", lambda v: 0 <= v <= 1, "must be between 0 and 1"))


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the chosen handler, and turn the project's errors into ``error: ...`` + exit 2."""
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (CloudError, EdgeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
