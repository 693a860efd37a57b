"""`mp169 run`: the gateway daemon against an MQTT broker.

SIGTERM and SIGINT drain and stop; SIGHUP reloads the rules table (a bad table is logged and the
running one kept).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from gateway.config import ConfigError, Settings, load_settings
from gateway.logging import configure_logging
from gateway.metrics import Metrics
from gateway.mqtt import MqttTransport
from gateway.service import GatewayService

if TYPE_CHECKING:
    import argparse

log = structlog.get_logger("mp169.daemon")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("run", help="run the gateway daemon against the configured MQTT broker")
    parser.add_argument(
        "--config", type=Path, default=None, help="configuration file (default ./config.toml)"
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"mp169 run: {exc}", file=sys.stderr)  # noqa: T201 - CLI error output
        return 2
    configure_logging(settings.gateway.log_level)
    return asyncio.run(serve(settings))


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> int:
    """Run until `stop` is set or SIGTERM/SIGINT arrives; returns the exit status."""
    metrics = Metrics()
    if settings.gateway.metrics_port:
        metrics.serve(settings.gateway.metrics_port)
    transport = MqttTransport.from_settings(settings, on_reconnect=metrics.reconnects.inc)
    service = await GatewayService.start(settings, transport, metrics=metrics)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload_rules)
    log.info("daemon-ready", broker=settings.broker.url)
    await stop.wait()
    log.info("daemon-stopping")
    await service.stop()
    return 0
