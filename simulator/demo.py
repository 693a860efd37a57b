"""`mp169 demo`: the whole system on embedded defaults, with no broker to install.

A simulated estate is loaded into a fresh SQLite store; the real gateway (`GatewayService`, the same
code `mp169 run` runs) and the simulated devices connect to an in-memory broker; a generated request
stream (consumption reads, flag set and clear, Change of Supplier and of Tenancy, spoofed, malformed
and invalid requests) is replayed through it, alerts are raised from flagged and other devices, and
the MP169 invariants are checked on everything observed. Exit status 0 means every invariant held.

Every argument is checked before anything is touched (`prepare`), and a run writes into a fresh
sibling of the work folder, which replaces the previous results only once the run has completed:
a bad argument, a broker that cannot be reached or Ctrl-C leave the last demo as it was.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from gateway.config import DEMO_STORE_PATH, BrokerSettings, Settings
from gateway.duis import ParseError, parse_request
from gateway.interrupt import EXIT_INTERRUPTED, stop_on_signals, unless_stopped
from gateway.logging import configure_logging
from gateway.mqtt import MqttTransport, TransportFailedError
from gateway.options import DEFAULT_CONNECT_TIMEOUT_SECONDS, EXIT_BROKER, EXIT_USAGE, broker_url_problem
from gateway.pki import PkiLayout, init_pki
from gateway.report.compute import Period, Report
from gateway.report.load import load_report
from gateway.report.render_text import short_report
from gateway.service import GatewayService
from gateway.store import SqliteStore
from gateway.transport import MemoryBroker, MemoryTransport
from rules.domain import DCC_EUI
from rules.table import TableError, default_table, load_table
from simulator.clock import TICK_SECONDS, SimulatedClock
from simulator.devices import DeviceConfig, DeviceSimulator
from simulator.estate import generate_estate, records_from_rows
from simulator.recording import PublishItem, RecordingError, read_recording, write_stream
from simulator.replay import ReplayResult, Signatures, print_summary, replay
from simulator.traffic import TrafficMix, generate_traffic

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from gateway.transport import Transport
    from rules.domain import Eui
    from simulator.estate import Estate
    from simulator.recording import StreamItem

EXIT_INVARIANT_FAILED = 1
DEFAULT_WORKDIR = DEMO_STORE_PATH.parent
DATABASE = DEMO_STORE_PATH.name
# Short, so the simulated devices that never answer are timed out (E21) within the run.
TARGET_RESPONSE_SECONDS = 2.0
ALERTS_FROM_FLAGGED = 200
ALERTS_FROM_ANY = 100


@dataclass(frozen=True, slots=True)
class DemoOptions:
    seed: int = 1
    premises: int = 500
    requests: int = 5_000
    failure_rate: float = 0.02
    timeout_rate: float = 0.01
    window: int = 200
    workdir: Path = DEFAULT_WORKDIR
    rules: Path | None = None
    """A rules table for the gateway instead of the packaged one (the checks still use the packaged)."""
    broker: str | None = None
    """An MQTT broker URL to run over instead of the in-memory broker."""
    recording: Path | None = None
    """Replay this recording instead of generating traffic (made over the same seed and premises)."""
    save_traffic: Path | None = None
    """Write the generated stream here as a recording (for `mp169 replay` or `--recording`)."""
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_SECONDS
    """With `broker`: give up when it cannot be reached for this long."""


class DemoError(Exception):
    """An argument of the demo is unusable; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """Everything the run needs, read and checked before anything is touched."""

    estate: Estate
    items: Sequence[StreamItem]
    devices: DeviceConfig


@dataclass(frozen=True, slots=True)
class DemoResult:
    replay: ReplayResult
    report: Report
    database: Path


def demo_settings(
    database: Path, rules: Path | None = None, broker: str | None = None, pki: PkiLayout | None = None
) -> Settings:
    signing = (
        {}
        if pki is None
        else {
            "certificates": str(pki.certificates),
            "dsp_key": str(pki.key(DCC_EUI)),
            "dsp_certificate": str(pki.certificate(DCC_EUI)),
        }
    )
    return Settings.model_validate(
        {
            "signing": signing,
            # A demo leaves no session behind on a real broker (session expiry 0).
            "broker": {"url": broker or BrokerSettings().url, "session_expiry_seconds": 0},
            "store": {"path": str(database)},
            "gateway": {
                "rules_path": str(rules or ""),
                "metrics_port": 0,
                "target_response_seconds": TARGET_RESPONSE_SECONDS,
                "log_level": "warning",
            },
            "outcomes": {"flush_seconds": 0.2},
        }
    )


def prepare(options: DemoOptions) -> Prepared:
    """Check every option and read every input; DemoError (one line) if one is unusable."""
    if options.premises < 1 or options.requests < 1:
        raise DemoError("--premises and --requests must be at least 1")
    try:
        devices = DeviceConfig(
            failure_rate=options.failure_rate, timeout_rate=options.timeout_rate, seed=options.seed
        )
    except ValueError as exc:
        raise DemoError(
            f"--failure-rate {options.failure_rate}, --timeout-rate {options.timeout_rate}: {exc}"
        ) from exc
    _check_inputs(options)
    estate = generate_estate(options.seed, options.premises)
    if options.recording is None:
        items = generate_traffic(estate, options.seed, options.requests, TrafficMix()).items
    else:
        try:
            items = read_recording(options.recording).items
        except (OSError, RecordingError) as exc:
            raise DemoError(f"--recording: {exc}") from exc
    return Prepared(estate, items, devices)


def _check_inputs(options: DemoOptions) -> None:
    """The broker URL, the rules table and the folders (DemoError on the first that is unusable)."""
    problem = None if options.broker is None else broker_url_problem(options.broker)
    if problem is not None:
        raise DemoError(problem)
    if options.rules is not None:
        try:
            load_table(options.rules)
        except TableError as exc:
            raise DemoError(f"--rules: {exc}") from exc
    if options.workdir.exists() and not options.workdir.is_dir():
        raise DemoError(f"--workdir {options.workdir}: not a directory")
    if options.save_traffic is not None and not options.save_traffic.parent.is_dir():
        raise DemoError(
            f"--save-traffic {options.save_traffic}: no such directory {options.save_traffic.parent}"
        )


async def run_demo(
    options: DemoOptions,
    *,
    prepared: Prepared | None = None,
    progress: bool = False,
    console: Console | None = None,
) -> DemoResult:
    """Run the demo into a fresh sibling of `options.workdir`, which replaces it once the run has
    completed (whatever the invariants say); on any failure or cancellation the sibling goes and
    the previous results stay. DemoError before anything is touched if an option is unusable."""
    prepared = prepared or prepare(options)
    staging = _staging_folder(options.workdir)
    try:
        result = await _run(options, prepared, staging / DATABASE, progress=progress, console=console)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, options.workdir)
    return replace(result, database=options.workdir / DATABASE)


def _staging_folder(workdir: Path) -> Path:
    workdir.parent.mkdir(parents=True, exist_ok=True)
    staging = workdir.with_name(f".{workdir.name}.new-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    return staging


def _swap_in(staging: Path, workdir: Path) -> None:
    """`staging` becomes `workdir`; the previous `workdir` is removed only after it was moved aside."""
    previous = workdir.with_name(f".{workdir.name}.old-{uuid.uuid4().hex[:8]}")
    if workdir.exists():
        workdir.rename(previous)
    staging.rename(workdir)
    shutil.rmtree(previous, ignore_errors=True)


async def _run(
    options: DemoOptions,
    prepared: Prepared,
    database: Path,
    *,
    progress: bool,
    console: Console | None,
) -> DemoResult:
    estate, items = prepared.estate, prepared.items
    async with SqliteStore(database) as store:
        await store.upsert_devices(estate.devices)
        await store.upsert_users(estate.users)
    if options.save_traffic is not None and options.recording is None:
        meta = {"seed": options.seed, "premises": options.premises, "requests": options.requests}
        write_stream(items, options.save_traffic, meta=meta)
    # A test PKI for the estate: each user signs its requests, the gateway verifies them and signs
    # every answer with the DSP key.
    pki = init_pki(database.parent / "pki", [user.user_id for user in estate.users])

    settings = demo_settings(database, options.rules, options.broker, pki)
    connect, clock = _connector(settings, options)
    started = clock.wall()
    service = await GatewayService.start(
        settings, connect(settings.gateway.client_id), clock=clock.wall, monotonic=clock.monotonic
    )
    devices = DeviceSimulator(connect("mp169-devices"), prepared.devices, devices=estate.devices)
    flag_targets = set(_flagged_by(items))
    flagged = [device for device in estate.devices if device.device_id in flag_targets]

    async def apply_inventory(rows: Sequence[Mapping[str, str]]) -> None:
        # Change of Supplier / Tenancy: the inventory changes under the running gateway.
        await service.store.upsert_devices(records_from_rows(rows))
        await service.refresh_inventory()

    async def alerts_and_schedules() -> None:
        await devices.execute_schedules()
        await devices.emit_alerts(ALERTS_FROM_FLAGGED, flagged)
        await devices.emit_alerts(ALERTS_FROM_ANY)
        # Past the deadline of every command still unanswered: those the devices never answer.
        await clock.sleep(TARGET_RESPONSE_SECONDS + TICK_SECONDS)

    try:
        await devices.start()
        result = await replay(
            items,
            connect("mp169-replay"),
            # On the simulated clock the stream keeps its timeline; over a broker, flat out.
            speed=1.0 if options.broker is None else None,
            window=options.window,
            apply_inventory=apply_inventory,
            answer_timeout=TARGET_RESPONSE_SECONDS * 5,
            settle_seconds=0.5,
            progress=progress,
            topics=service.router.topics,
            # MP169 as the packaged table reads it, whatever table the gateway was given.
            table=default_table(),
            before_wait=alerts_and_schedules,
            console=console,
            monotonic=clock.monotonic,
            sleep=clock.sleep,
            signatures=Signatures.from_pki(pki),
            estate=estate,
        )
    finally:
        await devices.stop()
        await service.stop()
    now = clock.wall()
    report = await load_report(
        settings.outcomes_path,
        Period(started - timedelta(minutes=1), now + timedelta(minutes=1)),
        target_response_seconds=TARGET_RESPONSE_SECONDS,
        generated_at=now,
        store=database,
    )
    return DemoResult(result, report, database)


class _RealClock:
    """The clocks of a demo over a real broker, where nothing can be made to wait for it."""

    def __init__(self) -> None:
        self.monotonic = time.monotonic
        self.sleep = asyncio.sleep

    @staticmethod
    def wall() -> datetime:
        return datetime.now(UTC)


def _connector(
    settings: Settings, options: DemoOptions
) -> tuple[Callable[[str], Transport], SimulatedClock | _RealClock]:
    """Transports for the demo's clients and the clock they run on: in memory on a simulated clock,
    or MQTT with run-unique client ids on the real one."""
    if options.broker is None:
        broker = MemoryBroker()
        return (lambda client_id: MemoryTransport(broker, client_id)), SimulatedClock(
            broker, datetime.now(UTC)
        )
    run = uuid.uuid4().hex[:8]
    give_up = options.connect_timeout
    return (
        lambda client_id: MqttTransport.from_settings(settings, f"{client_id}-{run}", give_up_seconds=give_up)
    ), _RealClock()


def _flagged_by(items: Sequence[StreamItem]) -> Iterator[Eui]:
    """Devices that a flag-set request in the stream targets (the demo aims alerts at them)."""
    for item in items:
        if isinstance(item, PublishItem) and b"8.15.1<" in item.payload:
            request = parse_request(item.payload)
            if not isinstance(request, ParseError) and request.flag is not None:
                yield request.flag.device_id


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the gateway, simulated devices and a generated request stream in memory; check MP169",
    )
    defaults = DemoOptions()
    parser.add_argument("--seed", type=int, default=defaults.seed, help="one seed, one estate and stream")
    parser.add_argument("--premises", type=int, default=defaults.premises, help="premises in the estate")
    parser.add_argument("--requests", type=int, default=defaults.requests, help="Service Requests replayed")
    parser.add_argument(
        "--failure-rate", type=float, default=defaults.failure_rate, help="share of commands answered E20"
    )
    parser.add_argument(
        "--timeout-rate", type=float, default=defaults.timeout_rate, help="share of commands never answered"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=defaults.workdir,
        metavar="DIR",
        help="where the demo's SQLite store is left; replaced only once a new run has completed",
    )
    parser.add_argument(
        "--rules",
        type=Path,
        default=None,
        metavar="FILE",
        help="route with this rules table (the MP169 checks still use the packaged one)",
    )
    parser.add_argument(
        "--broker", default=None, metavar="URL", help="run over this MQTT broker instead of in memory"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=defaults.connect_timeout,
        metavar="SECONDS",
        help="with --broker: give up when it cannot be reached for this long",
    )
    parser.add_argument(
        "--save-traffic", type=Path, default=None, metavar="FILE", help="write the generated stream here"
    )
    parser.add_argument(
        "--recording",
        type=Path,
        default=None,
        metavar="FILE",
        help="replay this stream instead of generating one (made with the same --seed and --premises)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    configure_logging("warning")
    options = DemoOptions(
        seed=args.seed,
        premises=args.premises,
        requests=args.requests,
        failure_rate=args.failure_rate,
        timeout_rate=args.timeout_rate,
        workdir=args.workdir,
        rules=args.rules,
        broker=args.broker,
        recording=args.recording,
        save_traffic=args.save_traffic,
        connect_timeout=args.connect_timeout,
    )
    try:
        prepared = prepare(options)
    except DemoError as exc:
        sys.stderr.write(f"mp169 demo: {exc}\n")
        return EXIT_USAGE
    console = Console()
    console.print(
        f"mp169 demo: {options.premises:,} premises, {options.requests:,} Service Requests, "
        f"seed {options.seed}, {options.broker or 'in-memory broker'}"
    )

    async def until_signal() -> DemoResult | None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        return await unless_stopped(
            run_demo(options, prepared=prepared, progress=not args.no_progress, console=Console(stderr=True)),
            stop,
        )

    try:
        result = asyncio.run(until_signal())
    except TransportFailedError as exc:
        sys.stderr.write(f"mp169 demo: {exc}; is the broker running? (--connect-timeout waits longer)\n")
        return EXIT_BROKER
    if result is None:
        sys.stderr.write(f"mp169 demo: interrupted; {options.workdir} keeps the previous results\n")
        return EXIT_INTERRUPTED
    print_summary(result.replay, console)
    console.print(short_report(result.report))
    # Plain `mp169 report` finds the default workdir's store by itself.
    hint = "mp169 report" if options.workdir == DEFAULT_WORKDIR else f"mp169 report --store {result.database}"
    console.print(f"Store and outcomes: {result.database} (`{hint}` for the full report)")
    return 0 if result.replay.passed else EXIT_INVARIANT_FAILED
