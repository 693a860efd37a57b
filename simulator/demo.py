"""`mp169 demo`: the whole system on embedded defaults, with no broker to install.

A simulated estate is loaded into a fresh SQLite store; the real gateway (`GatewayService`, the same
code `mp169 run` runs) and the simulated devices connect to an in-memory broker; a generated request
stream (consumption reads, flag set and clear, Change of Supplier and of Tenancy, spoofed, malformed
and invalid requests) is replayed through it, alerts are raised from flagged and other devices, and
the MP169 invariants are checked on everything observed. Exit status 0 means every invariant held.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from gateway.config import BrokerSettings, Settings
from gateway.duis import ParseError, parse_request
from gateway.logging import configure_logging
from gateway.mqtt import MqttTransport
from gateway.report.compute import Period, Report
from gateway.report.load import load_report
from gateway.report.render_text import short_report
from gateway.service import GatewayService
from gateway.store import SqliteStore
from gateway.transport import MemoryBroker, MemoryTransport
from rules.table import default_table
from simulator.devices import DeviceConfig, DeviceSimulator
from simulator.estate import generate_estate, records_from_rows
from simulator.recording import PublishItem, read_recording, write_stream
from simulator.replay import ReplayResult, print_summary, replay
from simulator.traffic import TrafficMix, generate_traffic

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from gateway.transport import Transport
    from rules.domain import Eui
    from simulator.estate import Estate
    from simulator.recording import StreamItem

EXIT_INVARIANT_FAILED = 1
DEFAULT_WORKDIR = Path("var/demo")
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


@dataclass(frozen=True, slots=True)
class DemoResult:
    replay: ReplayResult
    report: Report
    database: Path


def demo_settings(database: Path, rules: Path | None = None, broker: str | None = None) -> Settings:
    return Settings.model_validate(
        {
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


async def run_demo(
    options: DemoOptions, *, progress: bool = False, console: Console | None = None
) -> DemoResult:
    database = options.workdir / "mp169.sqlite3"
    options.workdir.mkdir(parents=True, exist_ok=True)
    for leftover in options.workdir.glob("mp169*.sqlite3*"):
        leftover.unlink()  # every run starts from an empty store
    estate = generate_estate(options.seed, options.premises)
    async with SqliteStore(database) as store:
        await store.upsert_devices(estate.devices)
        await store.upsert_users(estate.users)

    settings = demo_settings(database, options.rules, options.broker)
    connect = _connector(settings, in_memory=options.broker is None)
    started = datetime.now(UTC)
    service = await GatewayService.start(settings, connect(settings.gateway.client_id))
    devices = DeviceSimulator(
        connect("mp169-devices"),
        DeviceConfig(failure_rate=options.failure_rate, timeout_rate=options.timeout_rate, seed=options.seed),
        devices=estate.devices,
    )
    await devices.start()
    items = _traffic(options, estate)
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

    try:
        result = await replay(
            items,
            connect("mp169-replay"),
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
        )
    finally:
        await devices.stop()
        await service.stop()
    now = datetime.now(UTC)
    report = await load_report(
        settings.outcomes_path,
        Period(started - timedelta(minutes=1), now + timedelta(minutes=1)),
        target_response_seconds=TARGET_RESPONSE_SECONDS,
        generated_at=now,
        store=database,
    )
    return DemoResult(result, report, database)


def _connector(settings: Settings, *, in_memory: bool) -> Callable[[str], Transport]:
    """Transports for the demo's clients: in memory, or MQTT with run-unique client ids."""
    if in_memory:
        broker = MemoryBroker()
        return lambda client_id: MemoryTransport(broker, client_id)
    run = uuid.uuid4().hex[:8]
    return lambda client_id: MqttTransport.from_settings(settings, f"{client_id}-{run}")


def _traffic(options: DemoOptions, estate: Estate) -> Sequence[StreamItem]:
    if options.recording is not None:
        return read_recording(options.recording).items
    items = generate_traffic(estate, options.seed, options.requests, TrafficMix()).items
    if options.save_traffic is not None:
        meta = {"seed": options.seed, "premises": options.premises, "requests": options.requests}
        write_stream(items, options.save_traffic, meta=meta)
    return items


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
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--premises", type=int, default=defaults.premises)
    parser.add_argument("--requests", type=int, default=defaults.requests)
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
        help="where the demo's SQLite store is written (emptied first)",
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
        "--save-traffic", type=Path, default=None, metavar="FILE", help="write the generated stream here"
    )
    parser.add_argument(
        "--recording",
        type=Path,
        default=None,
        metavar="FILE",
        help="replay this stream instead of generating one (made with the same --seed and --premises)",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    if args.premises < 1 or args.requests < 1:
        sys.stderr.write("mp169 demo: --premises and --requests must be at least 1\n")
        return 2
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
    )
    console = Console()
    console.print(
        f"mp169 demo: {options.premises:,} premises, {options.requests:,} Service Requests, "
        f"seed {options.seed}, {options.broker or 'in-memory broker'}"
    )
    result = asyncio.run(run_demo(options, progress=not args.no_progress, console=Console(stderr=True)))
    print_summary(result.replay, console)
    console.print(short_report(result.report))
    console.print(
        f"Store and outcomes: {result.database} "
        f"(MP169_STORE__PATH={result.database} mp169 report --since ... for the full report)"
    )
    return 0 if result.replay.passed else EXIT_INVARIANT_FAILED
