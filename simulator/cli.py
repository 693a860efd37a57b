"""The simulator's commands: `mp169 simulate estate|traffic|devices`, `mp169 record`, `mp169 replay`.

(`mp169 demo` is registered by simulator.demo.)
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from gateway.config import ConfigError, Settings, load_settings
from gateway.inventory import InventoryFileError
from gateway.logging import configure_logging
from gateway.mqtt import MqttTransport
from gateway.store import SqliteStore
from gateway.topics import Topics
from rules.domain import DeviceRecord, parse_eui
from simulator.devices import DeviceConfig, DeviceSimulator
from simulator.estate import generate_estate, read_estate, records_from_rows, write_estate
from simulator.recording import RecordingError, read_recording, record, write_stream
from simulator.replay import print_summary, replay
from simulator.traffic import TrafficMix, generate_traffic

if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping, Sequence

EXIT_INVARIANT_FAILED = 1
EXIT_USAGE = 2
RECORDER_CLIENT_ID = "mp169-recorder"
REPLAY_CLIENT_ID = "mp169-replay"
DEVICES_CLIENT_ID = "mp169-devices"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    simulate = subparsers.add_parser(
        "simulate", help="generate an estate or a request stream, or play devices"
    )
    actions = simulate.add_subparsers(dest="simulate_command", required=True, metavar="WHAT")

    estate = actions.add_parser("estate", help="write a simulated inventory.csv and users.csv")
    estate.add_argument("--seed", type=int, default=1)
    estate.add_argument("--premises", type=int, default=1000)
    estate.add_argument("--out", type=Path, required=True, metavar="DIR")
    estate.set_defaults(handler=_simulate_estate)

    traffic = actions.add_parser("traffic", help="write a request stream (recording format) over an estate")
    traffic.add_argument("--seed", type=int, default=1)
    traffic.add_argument("--requests", type=int, default=10_000)
    traffic.add_argument(
        "--estate", type=Path, required=True, metavar="DIR", help="inventory.csv and users.csv"
    )
    traffic.add_argument("--out", type=Path, required=True, metavar="FILE")
    traffic.add_argument("--duration", type=float, default=TrafficMix().duration_seconds, metavar="SECONDS")
    traffic.add_argument("--counter-base", type=int, default=1, help="first RequestID counter per user")
    traffic.set_defaults(handler=_simulate_traffic)

    devices = actions.add_parser("devices", help="play the devices and the DCC on the configured broker")
    _config_argument(devices)
    devices.add_argument("--latency-ms", type=float, default=0.0)
    devices.add_argument("--failure-rate", type=float, default=0.0, help="share of commands answered E20")
    devices.add_argument("--timeout-rate", type=float, default=0.0, help="share of commands never answered")
    devices.add_argument("--alert-rate", type=float, default=0.0, help="alerts per second (needs --estate)")
    devices.add_argument("--estate", type=Path, default=None, metavar="DIR", help="devices that raise alerts")
    devices.add_argument("--seed", type=int, default=0)
    devices.set_defaults(handler=_simulate_devices)

    recorder = subparsers.add_parser("record", help="record live broker traffic to a file until Ctrl-C")
    recorder.add_argument("file", type=Path, metavar="FILE")
    _config_argument(recorder)
    recorder.add_argument("--topic", action="append", default=None, help="topic filter (default dsp/#)")
    recorder.set_defaults(handler=_record)

    replayer = subparsers.add_parser("replay", help="replay a recording through the gateway and check MP169")
    replayer.add_argument("file", type=Path, metavar="FILE")
    _config_argument(replayer)
    replayer.add_argument("--speed", type=float, default=None, help="1.0 recorded pace (default: flat out)")
    replayer.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for answers")
    replayer.add_argument(
        "--window", type=int, default=1000, help="most requests awaiting their answer at once (0: no limit)"
    )
    replayer.add_argument(
        "--inventory-wait",
        type=float,
        default=1.5,
        metavar="SECONDS",
        help="pause after each inventory change so the running gateway picks it up",
    )
    replayer.add_argument(
        "--settle", type=float, default=0.5, metavar="SECONDS", help="keep observing after the last answer"
    )
    replayer.add_argument("--no-progress", action="store_true")
    replayer.set_defaults(handler=_replay)


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None, metavar="PATH", help="configuration file (default ./config.toml)"
    )


def _error(message: str) -> None:
    sys.stderr.write(f"mp169: {message}\n")


def _settings(args: argparse.Namespace) -> Settings | None:
    """The configuration, with logging set up from it (to stderr: stdout carries the results)."""
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        _error(str(exc))
        return None
    configure_logging(settings.gateway.log_level, stream=sys.stderr)
    return settings


def _transport(settings: Settings, client_id: str) -> MqttTransport:
    return MqttTransport.from_settings(settings, client_id)


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)


# -- simulate estate / traffic -----------------------------------------------------------------------


def _simulate_estate(args: argparse.Namespace) -> int:
    if args.premises < 1:
        _error("--premises must be at least 1")
        return EXIT_USAGE
    estate = generate_estate(args.seed, args.premises)
    inventory, users = write_estate(estate, args.out)
    sys.stdout.write(
        f"wrote {len(estate.devices):,} devices to {inventory} and {len(estate.users)} users to {users}\n"
    )
    return 0


def _simulate_traffic(args: argparse.Namespace) -> int:
    try:
        estate = read_estate(args.estate)
        mix = TrafficMix(duration_seconds=args.duration, counter_base=args.counter_base)
    except (OSError, InventoryFileError, ValueError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    traffic = generate_traffic(estate, args.seed, args.requests, mix)
    meta = {"seed": args.seed, "requests": args.requests, "estate": str(args.estate)}
    count = write_stream(traffic.items, args.out, meta=meta)
    sys.stdout.write(f"wrote {count:,} items ({args.requests:,} requests) to {args.out}\n")
    return 0


# -- simulate devices --------------------------------------------------------------------------------


def _simulate_devices(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return EXIT_USAGE
    if args.alert_rate > 0 and args.estate is None:
        _error("--alert-rate needs --estate: the devices that raise the alerts")
        return EXIT_USAGE
    try:
        devices = read_estate(args.estate).devices if args.estate else ()
        config = DeviceConfig(
            latency_seconds=args.latency_ms / 1000,
            failure_rate=args.failure_rate,
            timeout_rate=args.timeout_rate,
            alert_rate=args.alert_rate,
            seed=args.seed,
            dcc_eui=parse_eui(settings.gateway.dcc_eui),
            devices_topic=settings.topics.devices,
        )
    except (OSError, InventoryFileError, ValueError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    return asyncio.run(_play_devices(settings, config, devices))


async def _play_devices(settings: Settings, config: DeviceConfig, devices: Sequence[DeviceRecord]) -> int:
    stop = asyncio.Event()
    _stop_on_signals(stop)
    simulator = DeviceSimulator(_transport(settings, DEVICES_CLIENT_ID), config, devices=devices)
    await simulator.start()
    sys.stderr.write(f"playing devices on {settings.broker.url} (Ctrl-C stops)\n")
    alerts = asyncio.create_task(simulator.run_alerts(stop))
    await stop.wait()
    await alerts
    await simulator.stop()
    sys.stderr.write(
        f"answered {len(simulator.received):,} commands, sent {len(simulator.sent_alerts):,} alerts\n"
    )
    return 0


# -- record / replay ---------------------------------------------------------------------------------


def _record(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return EXIT_USAGE
    return asyncio.run(_record_until_signal(settings, args.file, args.topic or ["dsp/#"]))


async def _record_until_signal(settings: Settings, path: Path, topics: Sequence[str]) -> int:
    stop = asyncio.Event()
    _stop_on_signals(stop)
    sys.stderr.write(f"recording {', '.join(topics)} from {settings.broker.url} to {path} (Ctrl-C stops)\n")
    count = await record(_transport(settings, RECORDER_CLIENT_ID), path, topics, stop=stop)
    sys.stderr.write(f"recorded {count:,} messages\n")
    return 0


def _replay(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return EXIT_USAGE
    if args.speed is not None and args.speed <= 0:
        _error("--speed must be positive")
        return EXIT_USAGE
    if args.window < 0:
        _error("--window must not be negative")
        return EXIT_USAGE
    try:
        recording = read_recording(args.file)
    except (OSError, RecordingError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    store_path = Path(settings.store.path)
    inventory_wait = args.inventory_wait

    async def apply_inventory(rows: Sequence[Mapping[str, str]]) -> None:
        # The running gateway reads inventory upserts from its store about once a second.
        async with SqliteStore(store_path) as store:
            await store.upsert_devices(records_from_rows(rows))
        await asyncio.sleep(inventory_wait)

    console = Console(stderr=True)
    result = asyncio.run(
        replay(
            recording.items,
            _transport(settings, REPLAY_CLIENT_ID),
            speed=args.speed,
            window=args.window or None,
            apply_inventory=apply_inventory,
            answer_timeout=args.timeout,
            settle_seconds=args.settle,
            progress=not args.no_progress,
            topics=Topics.from_settings(settings.topics),
            console=console,
        )
    )
    print_summary(result, Console())
    return 0 if result.passed else EXIT_INVARIANT_FAILED
