"""The `mp169` console script: one parser, with subcommands contributed by the modules that own them.

Each module in COMMAND_MODULES exposes `register(subparsers)`, which adds its subcommands and sets
`handler` (a callable taking the parsed arguments and returning the exit status) as a default.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import cast

from gateway.logging import configure_logging

COMMAND_MODULES = (
    "gateway.check",  # mp169 check
    "gateway.config_check",  # mp169 config check
    "gateway.admin",  # mp169 inventory import, users import, flags show
    "gateway.daemon",  # mp169 run
    "gateway.report.cli",  # mp169 report
    "gateway.pki",  # mp169 pki init
    "gateway.verify",  # mp169 verify
    "simulator.cli",  # mp169 simulate ..., record, replay
    "simulator.demo",  # mp169 demo
)

Handler = Callable[[argparse.Namespace], int]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless it says it already or has none); module
    docstrings used as descriptions keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings:
            return text
        return super()._get_help_string(action)


def package_version() -> str:
    try:
        return version("mp169-gateway")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mp169",
        description="DSP routing gateway enforcing MP169 (communications reduced due to consumer choice).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for command in _parsers(parser):
        command.formatter_class = HelpFormatter
    return parser


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """`parser` and every subcommand's parser, at any depth."""
    found = [parser]
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk of subparsers
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for child in dict.fromkeys(action.choices.values()):
                found.extend(_parsers(child))
    return found


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
