"""`mp169 config check`: the effective configuration, where each value came from, and whether it works.

The output is TOML (a value that is not set is a comment), so it can be saved and used as a
configuration file; each value's origin follows it as a comment: `default`, the configuration file's
path, the MP169_ variable, or `command line`. Beyond the values themselves it checks what a command
would trip over at start: the rules table loads, the CA file is readable. It says whether the store
exists, without creating it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.config import DEFAULT_CONFIG_PATH, KEYS, SECRET_KEYS, ConfigError, load_configuration
from rules.table import PACKAGED_TABLE, TableError, load_table

if TYPE_CHECKING:
    import argparse

    from gateway.config import Configuration

EXIT_INVALID = 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = subparsers.add_parser("config", help="configuration")
    actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    command = actions.add_parser(
        "check",
        help="print the effective configuration and where each value came from; exit 2 if it is invalid",
        description="Print the effective configuration as TOML, each value followed by where it came from "
        "(default, the configuration file, an MP169_ environment variable), and check that it can be "
        "used: the rules table loads, the CA file is readable. Exit status 2 if it cannot.",
    )
    command.add_argument(
        "--config", type=Path, default=None, metavar="PATH", help="configuration file (default ./config.toml)"
    )
    command.set_defaults(handler=check_config)


def _toml_value(value: object) -> str:
    # JSON's string escapes are TOML's basic-string escapes; numbers print the same in both.
    return json.dumps(value)


def render(configuration: Configuration) -> str:
    """The effective configuration as TOML with each value's origin as a comment."""
    lines = [
        f"# configuration file: {configuration.file.absolute()}"
        if configuration.file is not None
        else f"# configuration file: none ({DEFAULT_CONFIG_PATH} not found in {Path.cwd()}): defaults"
    ]
    section = ""
    for key in KEYS:
        here, name = key.split(".")
        if here != section:
            section = here
            lines.append(f"\n[{section}]")
        value = configuration.value(key)
        origin = configuration.origin(key)
        if value is None:
            lines.append(f"# {name}: not set ({origin})")
        else:
            if key in SECRET_KEYS and value:
                value = "********"
            elif key == "store.url" and value:  # may carry a password
                value = configuration.settings.store.name
            shown = _toml_value(value)
            lines.append(f"{name} = {shown}  # {origin}")
    return "\n".join(lines) + "\n"


def problems(configuration: Configuration) -> list[str]:
    """What a command would fail on at start, beyond the values' own validation."""
    found: list[str] = []
    settings = configuration.settings
    rules = settings.gateway.rules_path
    try:
        load_table(Path(rules) if rules else None)
    except TableError as exc:
        found.append(f"gateway.rules_path (from {configuration.origin('gateway.rules_path')}): {exc}")
    ca_file = settings.broker.ca_file
    if ca_file and not Path(ca_file).is_file():
        found.append(
            f"broker.ca_file (from {configuration.origin('broker.ca_file')}): no such file {ca_file}"
        )
    return found


def _exists(path: Path) -> str:
    return "exists" if path.exists() else "does not exist yet"


def _store_state(configuration: Configuration) -> str:
    if configuration.settings.store.postgres:
        return "PostgreSQL, checked when a command connects"
    return _exists(configuration.store_path)


def _outcomes_state(configuration: Configuration) -> str:
    if configuration.settings.store.postgres:
        return configuration.describe_outcomes()
    return f"{configuration.describe_outcomes()}: {_exists(configuration.outcomes_path)}"


def check_config(args: argparse.Namespace) -> int:
    try:
        configuration = load_configuration(args.config)
    except ConfigError as exc:
        sys.stderr.write("mp169 config check: invalid configuration:\n")
        sys.stderr.writelines(f"  {problem}\n" for problem in exc.problems)
        return EXIT_INVALID
    sys.stdout.write(render(configuration))
    rules = configuration.settings.gateway.rules_path
    sys.stdout.write(
        f"\n# store: {configuration.describe_store()}: {_store_state(configuration)}\n"
        f"# outcomes: {_outcomes_state(configuration)}\n"
        f"# rules table: {Path(rules).absolute() if rules else PACKAGED_TABLE}\n"
    )
    found = problems(configuration)
    if found:
        sys.stderr.write("mp169 config check: the configuration cannot be used:\n")
        sys.stderr.writelines(f"  {problem}\n" for problem in found)
        return EXIT_INVALID
    sys.stderr.write("mp169 config check: configuration valid\n")
    return 0
