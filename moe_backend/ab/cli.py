"""Registers the A/B subcommands (`compare`, `ab-serve`) on `python -m moe_backend`'s parser.
Each subparser sets `ab_command`, the function that runs it."""

from __future__ import annotations

__all__ = ["add_ab_parsers"]


def add_ab_parsers(subparsers) -> None:
    from moe_backend.ab.compare import add_compare_parser
    from moe_backend.ab.serve_client import add_ab_serve_parser

    add_compare_parser(subparsers)
    add_ab_serve_parser(subparsers)
