"""Walking an argparse tree, so CLI tests can check every subcommand without listing them by hand."""

from __future__ import annotations

import argparse


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[list[str], argparse.ArgumentParser]]:
    """Every subcommand of a CLI parser with its path, e.g. (["models", "install"], its parser)."""
    found: list[tuple[list[str], argparse.ArgumentParser]] = []

    def walk(p: argparse.ArgumentParser, path: list[str]) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found.append(([*path, name], sub))
                    walk(sub, [*path, name])

    walk(parser, [])
    return found
