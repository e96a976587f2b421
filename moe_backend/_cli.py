"""Argument types and parser helpers shared by the `python -m moe_backend` subcommands.

Every user mistake ends as one line, `<prog> <command>: error: argument --x: expected ..., got ...`,
after that subcommand's usage, with exit status 2 (argparse's convention); never a traceback.
"""

from __future__ import annotations

import argparse
from typing import Callable, Iterable, Sequence

__all__ = ["int_range", "csv_of", "csv_of_ints", "new_parser", "add_subcommand", "ranges"]


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type`: an integer in [low, high] (no upper bound when high is None)."""
    span = f"{low}..{high}" if high is not None else f">= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def csv_of(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse `type`: a non-empty comma-separated list drawn from `choices`, each item once
    (a repeat would time or run it twice)."""

    def parse(text: str) -> tuple[str, ...]:
        items = tuple(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
        unknown = [item for item in items if item not in choices]
        if not items or unknown:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(choices)}, got {text!r}")
        return items

    parse.__name__ = "list"
    return parse


def csv_of_ints(low: int, high: int) -> Callable[[str], tuple[int, ...]]:
    """An argparse `type`: a non-empty comma-separated list of integers in [low, high]."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            items = tuple(int(item, 10) for item in text.split(",") if item.strip())
        except ValueError:
            items = ()
        if not items or any(not low <= item <= high for item in items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers {low}..{high}, got {text!r}")
        return items

    parse.__name__ = "list"
    return parse


def new_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    # allow_abbrev=False: `--token` must not silently mean `--tokens`.
    return argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)


def add_subcommand(subparsers, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand's parser. Its own `error()` is used for every mistake in its arguments, so the
    usage printed is that subcommand's (see `parse` in `moe_backend.__main__`)."""
    parser = subparsers.add_parser(name, help=help, description=description or help, allow_abbrev=False)
    parser.set_defaults(parser=parser)
    return parser


def ranges(values: Iterable[int]) -> str:
    """`[1, 2, 3, 5]` -> `1..3, 5`: how a list of layer indices is shown in a message."""
    values = sorted(set(values))
    parts: list[str] = []
    start = prev = None
    for v in values + [None]:
        if start is None:
            start = prev = v
        elif v is not None and v == prev + 1:
            prev = v
        else:
            parts.append(str(start) if start == prev else f"{start}..{prev}")
            start = prev = v
    return ", ".join(parts)
