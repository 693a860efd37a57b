"""Every command and option says what it is, and every default is shown; `mp169 --version`."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from gateway.cli import _parsers, build_parser, package_version


def every_action() -> list[tuple[str, argparse.Action, str]]:
    found = []
    for parser in _parsers(build_parser()):
        rendered = parser.format_help()
        for action in parser._actions:
            if isinstance(
                action, (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction)
            ):
                continue
            found.append((parser.prog, action, rendered))
    return found


@pytest.mark.parametrize(("prog", "action", "rendered"), every_action(), ids=lambda value: str(value)[:40])
def test_every_option_has_help_and_shows_its_default(
    prog: str, action: argparse.Action, rendered: str
) -> None:
    name = "/".join(action.option_strings) or action.dest
    assert action.help, f"{prog} {name} has no help text"
    unset = action.default is None or action.default is False
    if action.option_strings and not unset:
        helper = argparse.ArgumentParser(formatter_class=build_parser().formatter_class)
        text = helper._get_formatter()._expand_help(action) if action.help else ""
        assert "default" in text, f"{prog} {name}: default {action.default!r} not shown"
        assert "default" in rendered


def test_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"mp169 {package_version()}"
    assert package_version()[0].isdigit()
