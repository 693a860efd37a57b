"""The `mp169` console script: one parser, with subcommands contributed by the modules that own them.

Each module in COMMAND_MODULES exposes `register(subparsers)`, which adds its subcommands and sets
`handler` (a callable taking the parsed arguments and returning the exit status) as a default.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import cast

from gateway.logging import configure_logging

COMMAND_MODULES = (
    "gateway.check",  # mp169 check
    "gateway.admin",  # mp169 inventory import, users import, flags show
    "gateway.daemon",  # mp169 run
    "gateway.report.cli",  # mp169 report
    "simulator.cli",  # mp169 simulate ..., record, replay
    "simulator.demo",  # mp169 demo
)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mp169",
        description="DSP routing gateway enforcing MP169 (communications reduced due to consumer choice).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Commands that run the gateway reconfigure this from their settings.
    configure_logging("warning")
    handler = cast("Handler", args.handler)
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
