"""Registers the A/B subcommands (`compare`, `ab-serve`) on `python -m moe_backend`'s parser.
Each subparser sets `ab_command`, the function that runs it."""

from __future__ import annotations

__all__ = ["add_ab_parsers"]


def add_ab_parsers(subparsers) -> None:
    from moe_backend.ab.compare import add_compare_parser
    from moe_backend.ab.serve_client import add_ab_serve_parser

    add_compare_parser(subparsers)
    add_ab_serve_parser(subparsers)
    # The CLI's conventions (moe_backend._cli): no abbreviated flags, each subcommand reports its
    # own mistakes, `run(args, parser)` returns the exit status.
    for name in ("compare", "ab-serve"):
        parser = subparsers.choices[name]
        parser.allow_abbrev = False
        parser.set_defaults(parser=parser, run=lambda args, _parser: args.ab_command(args))
