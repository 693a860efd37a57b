"""Command-line options shared by the commands, and the settings they yield.

Every command that reads the configuration takes `--config`; every command that talks to a broker
takes `--broker URL` (overriding broker.url, as MP169_BROKER__URL does); the interactive ones also
take `--connect-timeout` (they give up with a message where the daemon keeps retrying).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway.config import (
    DEFAULT_CONFIG_PATH,
    BrokerSettings,
    ConfigError,
    Configuration,
    Settings,
    flat_overrides,
    load_configuration,
    validation_problems,
)
from gateway.logging import configure_logging
from rules.domain import Eui, parse_eui

DEFAULT_CONNECT_TIMEOUT_SECONDS = 10.0
EXIT_USAGE = 2
EXIT_BROKER = 3
"""The broker stayed unreachable past --connect-timeout, or another client took the session over
(for `mp169 run`, whose unit does not restart it on this status: it would take the session back)."""


def eui_argument(text: str) -> Eui:
    """An EUI-64 on the command line (argparse `type=`), in DUIS form."""
    try:
        return parse_eui(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"configuration file (default: ./{DEFAULT_CONFIG_PATH} if present, else built-in defaults)",
    )


def broker_options(parser: argparse.ArgumentParser, *, interactive: bool = True) -> None:
    """--config, --broker and, for a command that gives up, --connect-timeout."""
    config_option(parser)
    parser.add_argument(
        "--broker",
        default=None,
        metavar="URL",
        help="MQTT broker, mqtt://HOST:PORT or mqtts://HOST:PORT (default: broker.url of the configuration)",
    )
    if interactive:
        parser.add_argument(
            "--connect-timeout",
            type=_positive_seconds,
            default=DEFAULT_CONNECT_TIMEOUT_SECONDS,
            metavar="SECONDS",
            help="give up when the broker cannot be reached for this long",
        )


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def error(command: str, message: str) -> None:
    sys.stderr.write(f"mp169 {command}: {message}\n")


def broker_url_problem(url: str) -> str | None:
    """What is wrong with a --broker URL, in one line (None: nothing)."""
    try:
        BrokerSettings(url=url)
    except ValidationError as exc:
        return f"--broker {url}: {validation_problems(exc)}"
    return None


def configuration_of(args: argparse.Namespace, **overrides: dict[str, Any]) -> Configuration:
    """The configuration of `--config`, with `--broker` and `overrides` applied as command-line values
    (each value with its origin). ConfigError names the bad key."""
    broker = getattr(args, "broker", None)
    if broker is not None:
        problem = broker_url_problem(broker)
        if problem is not None:
            raise ConfigError(problem)
        overrides = {**overrides, "broker": {**overrides.get("broker", {}), "url": broker}}
    return load_configuration(args.config, overrides=flat_overrides(overrides))


def interactive_configuration(args: argparse.Namespace, command: str) -> Configuration | None:
    """The configuration, with logging set up from it (human-readable on a terminal, JSON otherwise);
    None after printing the problem."""
    try:
        configuration = configuration_of(args)
    except ConfigError as exc:
        error(command, str(exc))
        return None
    configure_logging(configuration.settings.gateway.log_level)
    return configuration


def interactive_settings(args: argparse.Namespace, command: str) -> Settings | None:
    """The settings of `interactive_configuration`."""
    configuration = interactive_configuration(args, command)
    return None if configuration is None else configuration.settings
