"""The simulator's commands: `mp169 simulate estate|traffic|devices`, `mp169 record`, `mp169 replay`.

(`mp169 demo` is registered by simulator.demo.) The commands that talk to a broker take `--broker`
and give up with a message when it cannot be reached for `--connect-timeout` seconds; Ctrl-C and
SIGTERM stop each of them promptly at any point.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from gateway.config import ConfigError
from gateway.interrupt import EXIT_INTERRUPTED, stop_on_signals, unless_stopped
from gateway.inventory import InventoryFileError
from gateway.mqtt import MqttTransport, TransportFailedError
from gateway.options import (
    EXIT_BROKER,
    EXIT_USAGE,
    broker_options,
    error,
    interactive_configuration,
    interactive_settings,
)
from gateway.pki import PkiLayout
from gateway.signing import CertificateError
from gateway.store import SqliteStore
from gateway.topics import Topics
from rules.domain import DeviceRecord, parse_eui
from simulator.devices import DeviceConfig, DeviceSimulator
from simulator.estate import Estate, generate_estate, read_estate, records_from_rows, write_estate
from simulator.recording import RecordingError, read_recording, record, write_stream
from simulator.renumber import renumber, stale_requests
from simulator.replay import ReplayResult, Signatures, print_summary, replay
from simulator.traffic import TrafficMix, generate_traffic

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Mapping, Sequence

    from gateway.config import Settings
    from gateway.transport import Message
    from rules.domain import Eui
    from simulator.recording import Recording, StreamItem

EXIT_INVARIANT_FAILED = 1
RECORDER_CLIENT_ID = "mp169-recorder"
REPLAY_CLIENT_ID = "mp169-replay"
DEVICES_CLIENT_ID = "mp169-devices"
# A DUIS request is a few kilobytes: `record` echoes the start of each payload, as a terminal shows it.
_ECHO_CHARACTERS = 200


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    simulate = subparsers.add_parser(
        "simulate", help="generate an estate or a request stream, or play devices"
    )
    actions = simulate.add_subparsers(dest="simulate_command", required=True, metavar="WHAT")

    estate = actions.add_parser("estate", help="write a simulated inventory.csv and users.csv")
    estate.add_argument("--seed", type=int, default=1, help="randomness: one seed, one estate")
    estate.add_argument("--premises", type=int, default=1000, help="premises (each with its meters and hub)")
    estate.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the two CSV files go")
    estate.set_defaults(handler=_simulate_estate)

    traffic = actions.add_parser("traffic", help="write a request stream (recording format) over an estate")
    traffic.add_argument("--seed", type=int, default=1, help="randomness: one seed, one stream")
    traffic.add_argument("--requests", type=int, default=10_000, help="Service Requests in the stream")
    traffic.add_argument(
        "--estate", type=Path, required=True, metavar="DIR", help="inventory.csv and users.csv"
    )
    traffic.add_argument("--out", type=Path, required=True, metavar="FILE", help="the recording to write")
    traffic.add_argument(
        "--duration",
        type=float,
        default=TrafficMix().duration_seconds,
        metavar="SECONDS",
        help="the timeline the requests are spread over (replay --speed 1 keeps it)",
    )
    traffic.add_argument("--counter-base", type=int, default=1, help="first RequestID counter per user")
    traffic.set_defaults(handler=_simulate_traffic)

    devices = actions.add_parser("devices", help="play the devices and the DCC on the configured broker")
    broker_options(devices)
    devices.add_argument("--latency-ms", type=float, default=0.0, help="delay before each answer")
    devices.add_argument("--failure-rate", type=float, default=0.0, help="share of commands answered E20")
    devices.add_argument("--timeout-rate", type=float, default=0.0, help="share of commands never answered")
    devices.add_argument("--alert-rate", type=float, default=0.0, help="alerts per second (needs --estate)")
    devices.add_argument("--estate", type=Path, default=None, metavar="DIR", help="devices that raise alerts")
    devices.add_argument("--seed", type=int, default=0, help="randomness of answers and alerts")
    devices.set_defaults(handler=_simulate_devices)

    recorder = subparsers.add_parser(
        "record",
        help="record live broker traffic to a file until Ctrl-C, printing each message as it comes",
    )
    recorder.add_argument("file", type=Path, metavar="FILE", help="the recording to write")
    broker_options(recorder)
    recorder.add_argument(
        "--topic", action="append", default=None, help="topic filter, repeatable (default: dsp/#)"
    )
    recorder.add_argument(
        "--quiet", action="store_true", help="do not print the messages (like mosquitto_sub -v) as they come"
    )
    recorder.set_defaults(handler=_record)

    replayer = subparsers.add_parser("replay", help="replay a recording through the gateway and check MP169")
    replayer.add_argument("file", type=Path, metavar="FILE", help="a recording (generated or recorded)")
    broker_options(replayer)
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
    replayer.add_argument(
        "--renumber",
        action="store_true",
        help="raise the stream's RequestID counters above those the store already accepted "
        "(to replay a stream again into the same store; otherwise its requests are answered E16901)",
    )
    replayer.add_argument(
        "--pki",
        type=Path,
        metavar="DIR",
        help="a `mp169 pki init` directory: sign each request with its user's key, verify every answer "
        "against the DSP's certificate (the answers-signed invariant)",
    )
    replayer.add_argument("--no-progress", action="store_true", help="no progress bar")
    replayer.set_defaults(handler=_replay)


def _broker_failure(command: str, failure: TransportFailedError) -> int:
    error(
        command,
        f"{failure}; is the broker running? (--broker URL, --connect-timeout SECONDS)",
    )
    return EXIT_BROKER


def _transport(settings: Settings, client_id: str, args: argparse.Namespace) -> MqttTransport:
    return MqttTransport.from_settings(settings, client_id, give_up_seconds=args.connect_timeout)


# -- simulate estate / traffic -----------------------------------------------------------------------


def _simulate_estate(args: argparse.Namespace) -> int:
    if args.premises < 1:
        error("simulate", "--premises must be at least 1")
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
        error("simulate", str(exc))
        return EXIT_USAGE
    traffic = generate_traffic(estate, args.seed, args.requests, mix)
    meta = {"seed": args.seed, "requests": args.requests, "estate": str(args.estate)}
    count = write_stream(traffic.items, args.out, meta=meta)
    sys.stdout.write(f"wrote {count:,} items ({args.requests:,} requests) to {args.out}\n")
    return 0


# -- simulate devices --------------------------------------------------------------------------------


def _simulate_devices(args: argparse.Namespace) -> int:
    settings = interactive_settings(args, "simulate devices")
    if settings is None:
        return EXIT_USAGE
    if args.alert_rate > 0 and args.estate is None:
        error("simulate devices", "--alert-rate needs --estate: the devices that raise the alerts")
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
        error("simulate devices", str(exc))
        return EXIT_USAGE
    transport = _transport(settings, DEVICES_CLIENT_ID, args)
    try:
        return asyncio.run(_play_devices(settings, transport, config, devices))
    except TransportFailedError as exc:
        return _broker_failure("simulate devices", exc)


async def _play_devices(
    settings: Settings, transport: MqttTransport, config: DeviceConfig, devices: Sequence[DeviceRecord]
) -> int:
    stop = asyncio.Event()
    stop_on_signals(stop)
    transport.on_failure = lambda _: stop.set()
    simulator = DeviceSimulator(transport, config, devices=devices)
    if await unless_stopped(_started(simulator), stop) is None:
        return EXIT_INTERRUPTED
    sys.stderr.write(f"playing devices on {settings.broker.url} (Ctrl-C stops)\n")
    alerts = asyncio.create_task(simulator.run_alerts(stop))
    await stop.wait()
    await alerts
    await simulator.stop()
    sys.stderr.write(
        f"answered {len(simulator.received):,} commands, sent {len(simulator.sent_alerts):,} alerts\n"
    )
    if transport.failure is not None:
        raise transport.failure
    return 0


async def _started(simulator: DeviceSimulator) -> bool:
    await simulator.start()
    return True


# -- record / replay ---------------------------------------------------------------------------------


def _record(args: argparse.Namespace) -> int:
    settings = interactive_settings(args, "record")
    if settings is None:
        return EXIT_USAGE
    if not args.file.parent.is_dir():
        error("record", f"{args.file}: no such directory {args.file.parent}")
        return EXIT_USAGE
    transport = _transport(settings, RECORDER_CLIENT_ID, args)
    topics = args.topic or ["dsp/#"]
    echo = None if args.quiet else _echo
    try:
        return asyncio.run(_record_until_signal(settings, transport, args.file, topics, echo))
    except TransportFailedError as exc:
        return _broker_failure("record", exc)


def _echo(message: Message) -> None:
    """One line per message, `topic payload`, as `mosquitto_sub -v` prints them (payloads on one line)."""
    text = message.payload[: _ECHO_CHARACTERS * 4].decode("utf-8", "replace")
    text = " ".join(text.split())
    if len(text) > _ECHO_CHARACTERS or len(message.payload) > _ECHO_CHARACTERS * 4:
        text = f"{text[:_ECHO_CHARACTERS]}... ({len(message.payload):,} bytes)"
    sys.stdout.write(f"{message.topic} {text}\n")
    sys.stdout.flush()


async def _record_until_signal(
    settings: Settings,
    transport: MqttTransport,
    path: Path,
    topics: Sequence[str],
    echo: Callable[[Message], object] | None,
) -> int:
    stop = asyncio.Event()
    stop_on_signals(stop)
    transport.on_failure = lambda _: stop.set()
    sys.stderr.write(f"recording {', '.join(topics)} from {settings.broker.url} to {path} (Ctrl-C stops)\n")
    count = await record(transport, path, topics, stop=stop, echo=echo)
    if count is None:
        sys.stderr.write("stopped before the broker was reached: nothing recorded\n")
        return EXIT_INTERRUPTED
    sys.stderr.write(f"recorded {count:,} messages to {path}\n")
    if transport.failure is not None:
        raise transport.failure
    return 0


def _replay(args: argparse.Namespace) -> int:
    configuration = interactive_configuration(args, "replay")
    if configuration is None:
        return EXIT_USAGE
    settings = configuration.settings
    inputs = _replay_stream(args)
    if isinstance(inputs, str):
        error("replay", inputs)
        return EXIT_USAGE
    recording, signatures = inputs
    try:
        # The stream's Change of Supplier rows go to the running gateway's store: never to a new one.
        store_path = configuration.existing_store()
    except ConfigError as exc:
        error("replay", str(exc))
        return EXIT_USAGE
    sys.stderr.write(f"mp169 replay: store {configuration.describe_store()}\n")
    topics = Topics.from_settings(settings.topics)
    counters, estate = asyncio.run(_store_state(store_path))
    items = _fresh_items(recording.items, counters, store_path, topics.inbound, renumbering=args.renumber)
    inventory_wait = args.inventory_wait

    async def apply_inventory(rows: Sequence[Mapping[str, str]]) -> None:
        # The running gateway reads inventory upserts from its store about once a second.
        async with SqliteStore(store_path) as store:
            await store.upsert_devices(records_from_rows(rows))
        await asyncio.sleep(inventory_wait)

    async def run() -> ReplayResult | None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        transport = _transport(settings, REPLAY_CLIENT_ID, args)
        transport.on_failure = lambda _: stop.set()
        result = await unless_stopped(
            replay(
                items,
                transport,
                speed=args.speed,
                window=args.window or None,
                apply_inventory=apply_inventory,
                answer_timeout=args.timeout,
                settle_seconds=args.settle,
                progress=not args.no_progress,
                topics=topics,
                console=Console(stderr=True),
                signatures=signatures,
                estate=estate,
            ),
            stop,
        )
        if transport.failure is not None:
            raise transport.failure
        return result

    try:
        result = asyncio.run(run())
    except TransportFailedError as exc:
        return _broker_failure("replay", exc)
    if result is None:
        error("replay", "interrupted: nothing checked")
        return EXIT_INTERRUPTED
    print_summary(result, Console())
    return 0 if result.passed else EXIT_INVARIANT_FAILED


def _replay_stream(args: argparse.Namespace) -> tuple[Recording, Signatures | None] | str:
    """The recording to replay and the users' keys (--pki), or what is wrong with the arguments."""
    if args.speed is not None and args.speed <= 0:
        return "--speed must be positive"
    if args.window < 0:
        return "--window must not be negative"
    try:
        recording = read_recording(args.file)
    except (OSError, RecordingError) as exc:
        return str(exc)
    try:
        return recording, None if args.pki is None else Signatures.from_pki(PkiLayout(args.pki))
    except (OSError, CertificateError) as exc:
        return f"--pki {args.pki}: {exc}"


async def _store_state(path: Path) -> tuple[dict[Eui, int], Estate]:
    """The store's RequestID counters, and its inventory and users: what the invariants judge by."""
    async with SqliteStore(path) as store:
        devices = [device async for batch in store.load_devices() for device in batch]
        return await store.load_request_counters(), Estate(tuple(devices), tuple(await store.load_users()))


def _fresh_items(
    items: Sequence[StreamItem],
    counters: Mapping[Eui, int],
    store_path: Path,
    inbound: str,
    *,
    renumbering: bool,
) -> Sequence[StreamItem]:
    """The stream as it will be replayed: warned about, or renumbered, if the store has seen it."""
    if renumbering:
        fresh, changed = renumber(items, counters, inbound)
        sys.stderr.write(f"renumbered {changed:,} requests above the counters of {store_path}\n")
        return fresh
    stale = stale_requests(items, counters, inbound)
    if stale:
        sys.stderr.write(
            f"warning: {stale:,} requests of this stream carry RequestID counters that {store_path} has "
            "already accepted (was it replayed against this store before?): the gateway will answer "
            "them E16901 and forward none. --renumber gives them fresh counters.\n"
        )
    return items
