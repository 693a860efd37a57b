"""`mp169 run`: the gateway daemon against an MQTT broker; `mp169 ready`: is a running one ready?

SIGTERM and SIGINT drain and stop, promptly also while the broker is unreachable (the daemon retries
a broker that is down for as long as it takes, but never ignores a signal meanwhile); SIGHUP reloads
the rules table (a bad table is logged and the running one kept). If another client connects with
the gateway's client id, the broker hands it the session (MQTT 5 reason 0x8E): the daemon then
stops with exit status 3 and says so, instead of taking the session back in a reconnect storm.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import structlog

from gateway.config import ConfigError, Settings, load_settings
from gateway.health import Health
from gateway.inbound import InboundSessions, session_window
from gateway.interrupt import stop_on_signals, unless_stopped
from gateway.logging import configure_logging
from gateway.metrics import Metrics, MetricsServer
from gateway.mqtt import MqttTransport
from gateway.options import EXIT_BROKER, EXIT_USAGE, broker_options, config_option, configuration_of, error
from gateway.service import DeviceSession, GatewayService
from gateway.signing import CertificateError
from gateway.store import StoreCorruptError
from gateway.systemd import notify

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

log = structlog.get_logger("mp169.daemon")

EXIT_NOT_READY = 1
_READY_POLL_SECONDS = 0.25
# The transport drains for gateway.stop_timeout_seconds; this much more is for the shell, the outcome
# recorder and the store to finish before the process gives up and exits.
_EXIT_GRACE_SECONDS = 2.0
EXIT_STOP_TIMEOUT = 4
EXIT_STORE_CORRUPT = 5
# Device responses and alerts arrive on a session of their own (client id + this).
DEVICE_SESSION_SUFFIX = "-devices"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("run", help="run the gateway daemon against an MQTT broker")
    broker_options(parser, interactive=False)
    parser.add_argument(
        "--log-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="append the JSON log lines to FILE instead of stderr",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="port of /metrics, /healthz and /readyz on 127.0.0.1, 0 for none "
        "(default: gateway.metrics_port of the configuration)",
    )
    parser.set_defaults(handler=_run)

    ready = subparsers.add_parser(
        "ready",
        help="exit 0 if the gateway on this host is ready (its /readyz), else 1: a readiness check",
    )
    config_option(ready)
    ready.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="the gateway's metrics port (default: gateway.metrics_port of the configuration)",
    )
    ready.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep asking for up to this long before answering not ready",
    )
    ready.set_defaults(handler=_ready)


def _run(args: argparse.Namespace) -> int:
    gateway = {} if args.metrics_port is None else {"gateway": {"metrics_port": args.metrics_port}}
    try:
        configuration = configuration_of(args, **gateway)
        # A daemon on a new, empty store would answer every request E19: the store must exist.
        configuration.existing_store()
    except ConfigError as exc:
        error("run", str(exc))
        return EXIT_USAGE
    settings = configuration.settings
    with contextlib.ExitStack() as files:
        stream: TextIO | None = None
        if args.log_file is not None:
            try:
                args.log_file.parent.mkdir(parents=True, exist_ok=True)
                stream = files.enter_context(args.log_file.open("a", encoding="utf-8", buffering=1))
            except OSError as exc:
                error("run", f"--log-file {args.log_file}: {exc.strerror or exc}")
                return EXIT_USAGE
        configure_logging(settings.gateway.log_level, stream=stream, json=True)
        key = "store.url" if settings.store.postgres else "store.path"
        log.info("daemon-store", store=configuration.store_name, origin=configuration.origin(key))
        return asyncio.run(serve(settings))


async def serve(
    settings: Settings,
    stop: asyncio.Event | None = None,
    *,
    sd_notify: Callable[[str], object] = notify,
) -> int:
    """Run until `stop` is set or SIGTERM/SIGINT arrives; returns the exit status.

    A stop is honoured in every state: while the broker is unreachable at start (the start is
    abandoned), and while a commit or a publish cannot finish (the process exits EXIT_STOP_TIMEOUT
    shortly after the stop timeout; what it had not acknowledged is redelivered to the next process).
    """
    stop = stop or asyncio.Event()
    stop_on_signals(stop)
    metrics = Metrics()
    health = Health()
    server = _serve_metrics(metrics, health, settings.gateway.metrics_port)
    if isinstance(server, str):
        error("run", server)
        return EXIT_USAGE
    transport = MqttTransport.from_settings(settings, on_reconnect=metrics.reconnects.inc)
    transport.on_connection_event = health.connection_event
    transport.on_failure = lambda _: stop.set()
    fair = settings.gateway.inbound_sessions > 1
    devices = MqttTransport.from_settings(
        settings,
        f"{settings.gateway.client_id}{DEVICE_SESSION_SUFFIX}",
        on_reconnect=metrics.reconnects.inc,
        receive_maximum=session_window(settings) if fair else None,
    )
    devices.on_failure = lambda _: stop.set()
    session = DeviceSession(devices, transport.flushed)
    inbound = None
    if fair:
        inbound = InboundSessions.from_settings(
            settings, transport, on_reconnect=metrics.reconnects.inc, on_failure=lambda _: stop.set()
        )
    heartbeat = asyncio.create_task(health.heartbeat(), name="mp169-heartbeat")
    try:
        try:
            service = await unless_stopped(
                GatewayService.start(settings, transport, metrics=metrics, devices=session, inbound=inbound),
                stop,
            )
        except StoreCorruptError as exc:
            log.critical("store-corrupt", error=str(exc))
            error(
                "run",
                f"the store is corrupt, refusing to start: {exc}. Restore it from a backup (or recover it "
                "with sqlite3 .recover) before starting the gateway again.",
            )
            return EXIT_STORE_CORRUPT
        except CertificateError as exc:
            error("run", str(exc))
            return EXIT_USAGE
        if service is None:
            log.info("daemon-stopped", connected=False)
            return 0
        health.store_open = True
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, service.reload_rules)
        log.info("daemon-ready", broker=settings.broker.url)
        sd_notify(f"READY=1\nSTATUS=connected to {settings.broker.url}")
        await stop.wait()
        log.info("daemon-stopping")
        sd_notify("STOPPING=1")
        await _stop_in_time(service, settings.gateway.stop_timeout_seconds)
        health.store_open = False
    finally:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
        if server is not None:
            server.close()
    failure = transport.failure or devices.failure or (inbound.failure if inbound is not None else None)
    if failure is not None:
        error("run", f"stopped: {failure}")
        return EXIT_BROKER
    return 0


async def _stop_in_time(service: GatewayService, stop_timeout: float) -> None:
    """Drain, or exit EXIT_STOP_TIMEOUT at once if draining outlasts the stop timeout."""
    try:
        async with asyncio.timeout(stop_timeout + _EXIT_GRACE_SECONDS):
            await service.stop()
    except TimeoutError:
        log.critical(
            "stop-timeout",
            seconds=stop_timeout,
            unacknowledged=service.router.unreleased,
            detail="exiting with work unfinished: unacknowledged messages are redelivered",
        )
        # A store call stuck in its worker thread would keep a normal interpreter exit waiting.
        sys.stderr.flush()
        os._exit(EXIT_STOP_TIMEOUT)


def _serve_metrics(metrics: Metrics, health: Health, port: int) -> MetricsServer | str | None:
    """The endpoint, None when turned off, or the problem naming the setting."""
    if not port:
        return None
    try:
        return metrics.serve(port, health)
    except OSError as exc:
        return (
            f"gateway.metrics_port {port}: cannot listen on 127.0.0.1:{port} ({exc.strerror or exc}); "
            "another gateway may be running: choose another port with --metrics-port or "
            "MP169_GATEWAY__METRICS_PORT (0 turns the endpoint off)"
        )


# -- mp169 ready ------------------------------------------------------------------------------------


def _ready(args: argparse.Namespace) -> int:
    try:
        port = (
            args.metrics_port
            if args.metrics_port is not None
            else load_settings(args.config).gateway.metrics_port
        )
    except ConfigError as exc:
        error("ready", str(exc))
        return EXIT_USAGE
    if not port:
        error("ready", "gateway.metrics_port is 0: the gateway serves no /readyz to ask")
        return EXIT_USAGE
    answer = wait_ready(f"http://127.0.0.1:{port}/readyz", args.wait)
    sys.stdout.write(f"{answer}\n")
    return 0 if answer == "ready" else EXIT_NOT_READY


def wait_ready(url: str, seconds: float) -> str:
    """'ready', or why not (the last answer of /readyz, or why it could not be asked)."""
    deadline = time.monotonic() + seconds
    while True:
        answer = _ask(url)
        if answer == "ready" or time.monotonic() >= deadline:
            return answer
        time.sleep(_READY_POLL_SECONDS)


def _ask(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - a fixed http://127.0.0.1 URL
            response.read()
            return "ready"
    except urllib.error.HTTPError as exc:
        return f"not ready: {exc.read().decode(errors='replace').strip()}"
    except OSError as exc:
        return f"not ready: no gateway answers at {url} ({getattr(exc, 'reason', exc)})"
