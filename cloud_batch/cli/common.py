"""What every ``cloud-batch`` command module shares: the help-with-example rule, argument types, error handling.

Kept apart from ``main`` (which lists the commands) so command modules (``ota``, ``features``)
depend on this and ``main`` depends on them, never the other way round. Errors the library
raises on purpose (``CloudError``, ``EdgeError``) become ``error: ...`` on stderr and exit
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cloud_batch.errors import CloudError
from edge_agent.errors import EdgeError
from edge_agent.wire.artifact import DEFAULT_CHUNK_SIZE

PROG = "cloud-batch"
DEFAULT_REGISTRY = Path("registry")
EXIT_ERROR = 2

Handler = Callable[[argparse.Namespace], "int | None"]
SubParsers = Any  # argparse's _SubParsersAction is private


def command_doc(doc: str | None) -> tuple[str, str, str]:
    """A command's help from its docstring: (summary line, body, the block after ``Example:``).

    The summary line is the one-line help in the command list, the body the description of
    ``--help`` (the summary when there is none), and every help ends with an example.
    """
    text = inspect.cleandoc(doc or "")
    head, sep, example = text.partition("\nExample:\n")
    summary, _, body = head.partition("\n")
    if not sep or not summary.strip() or not example.strip():
        raise ValueError(f"a command docstring needs a summary line and an 'Example:' block, got {doc!r}")
    return summary.strip(), body.strip() or summary.strip(), textwrap.dedent(example)


def add_command(
    sub: SubParsers,
    name: str,
    handler: Handler | None = None,
    *,
    doc: str | None = None,
    help: str | None = None,
    description: str | None = None,
    example: str | None = None,
) -> argparse.ArgumentParser:
    """Add subcommand ``name``, bound to ``handler`` if given.

    Its help comes from ``doc`` or the handler's docstring (``command_doc``), or from the explicit
    ``help``/``description``/``example``; either way it ends with an ``Example:`` block.
    """
    if help is None or description is None or example is None:
        help, description, example = command_doc(doc or (handler.__doc__ if handler else None))
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
    sub: SubParsers,
    name: str,
    *,
    dest: str,
    doc: str | None = None,
    help: str | None = None,
    description: str | None = None,
    example: str | None = None,
    metavar: str = "COMMAND",
) -> SubParsers:
    """A command that only holds subcommands (``keys generate``, ``fleet status``); returns their subparsers."""
    group = add_command(sub, name, doc=doc, help=help, description=description, example=example)
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


def chunk_size_arg(parser: argparse.ArgumentParser) -> None:
    """``--chunk-size BYTES``: how artifacts (models, bundles) are cut into retained MQTT chunks."""
    help = f"artifact chunk size (default: {DEFAULT_CHUNK_SIZE})"
    parser.add_argument("--chunk-size", type=positive_int, default=DEFAULT_CHUNK_SIZE, metavar="BYTES", help=help)


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
