"""Administration commands: `mp169 inventory import`, `mp169 users import`, `mp169 flags show`.

Imports upsert: a row for a device already known updates it, which is how a Change of Supplier or
a tariff change reaches the gateway (a running gateway picks it up within a second). A file is
validated whole first; one bad line and nothing is imported (exit status 1, every bad line named).
Every command names the store it uses, and where its path came from. Only the imports create a
store, and say so: `flags show` (like `run`, `replay` and `report`) refuses a missing one, so a
command run from the wrong directory fails instead of reading a new, empty store.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from rich.console import Console

from gateway.config import ConfigError, Configuration, StoreSettings, load_configuration, load_settings
from gateway.inventory import InventoryFileError, parse_inventory, parse_users
from gateway.options import config_option
from gateway.signing import PACKAGED_PKI, CertificateError, certificate_library
from gateway.storage import open_store
from gateway.terminal import Column, FittedTable, print_fitted
from rules.codes import ResponseCode
from rules.domain import (
    OUTCOME_ACCEPTED,
    OUTCOME_UNCHANGED,
    DeviceRecord,
    FlagEvent,
    UserRecord,
    parse_eui,
    responsible_supplier,
)

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable, Iterable

    from gateway.store import FlagState, FlagStore, UpsertCounts
    from rules.domain import Eui

_Record = TypeVar("_Record", DeviceRecord, UserRecord)

# A broken file of a million lines would bury the terminal: the first ones say what is wrong.
_SHOWN_PROBLEMS = 100
EXIT_BAD_FILE = 1
EXIT_USAGE = 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    inventory = subparsers.add_parser("inventory", help="Smart Metering Inventory administration")
    inventory_actions = inventory.add_subparsers(dest="action", required=True, metavar="ACTION")
    command = inventory_actions.add_parser(
        "import", help="validate an inventory CSV and upsert it (all or nothing)"
    )
    command.add_argument("file", type=Path, metavar="FILE.csv", help="the Smart Metering Inventory, CSV")
    config_option(command)
    command.set_defaults(handler=import_inventory)

    users = subparsers.add_parser("users", help="user registry administration")
    users_actions = users.add_subparsers(dest="action", required=True, metavar="ACTION")
    command = users_actions.add_parser("import", help="validate a users CSV and upsert it (all or nothing)")
    command.add_argument("file", type=Path, metavar="FILE.csv", help="the user registry, CSV")
    config_option(command)
    command.set_defaults(handler=import_users)

    flags = subparsers.add_parser("flags", help="MP169 reduced-communications flags")
    flags_actions = flags.add_subparsers(dest="action", required=True, metavar="ACTION")
    command = flags_actions.add_parser(
        "show", help="current flags and their history (of one device, or of all: the most recent)"
    )
    command.add_argument(
        "device", nargs="?", metavar="DEVICE", help="a Device ID, e.g. 00-DB-12-34-56-78-90-A0"
    )
    command.add_argument("--json", action="store_true", help="print JSON instead of tables")
    command.add_argument(
        "--limit", type=int, default=20, help="history events shown without DEVICE (default 20)"
    )
    config_option(command)
    command.set_defaults(handler=show_flags)


def _configuration(args: argparse.Namespace, *, create: bool = False) -> Configuration:
    """The configuration, its store named on stderr; a ConfigError if a SQLite store does not exist
    and not `create`."""
    configuration = load_configuration(args.config)
    configuration.existing_store(create=create)
    sys.stderr.write(f"mp169: store {configuration.describe_store()}\n")
    return configuration


def _error(message: str) -> None:
    sys.stderr.write(f"mp169: {message}\n")


# -- imports ------------------------------------------------------------------------------------------


def import_inventory(args: argparse.Namespace) -> int:
    return _import(args, "devices", parse_inventory, lambda store, records: store.upsert_devices(records))


def import_users(args: argparse.Namespace) -> int:
    return _import(
        args, "users", parse_users, lambda store, records: store.upsert_users(records), _report_certificates
    )


def _report_certificates(args: argparse.Namespace, users: list[UserRecord]) -> None:
    """Where each user's certificate comes from: the configured library, by the EUI in the certificate."""
    settings = load_settings(args.config).signing
    try:
        library = certificate_library(settings)
    except (CertificateError, OSError) as exc:
        _error(f"signing.certificates: {exc}")
        return
    source = settings.certificates or str(PACKAGED_PKI)
    missing = [user.user_id for user in users if not library.for_eui(user.user_id)]
    sys.stdout.write(
        f"certificates from {source}: {len(users) - len(missing):,} of {len(users):,} users have one\n"
    )
    if missing:
        shown = ", ".join(missing[:_SHOWN_PROBLEMS]) + (" ..." if len(missing) > _SHOWN_PROBLEMS else "")
        _error(f"no certificate for {len(missing):,} user(s), whose requests are refused E16912: {shown}")


def _import(
    args: argparse.Namespace,
    noun: str,
    parse: Callable[[Iterable[str]], list[_Record]],
    upsert: Callable[[FlagStore, list[_Record]], Awaitable[UpsertCounts]],
    after: Callable[[argparse.Namespace, list[_Record]], None] | None = None,
) -> int:
    source: Path = args.file
    try:
        with source.open(encoding="utf-8-sig", newline="") as lines:
            # The store is checked before a long file is parsed, after the file is known to be there.
            configuration = _configuration(args, create=True)
            records = parse(lines)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except (OSError, UnicodeDecodeError) as exc:
        _error(f"{source}: cannot read: {exc}")
        return EXIT_BAD_FILE
    except InventoryFileError as exc:
        problems = exc.problems
        _error(f"{source}: {len(problems)} bad line(s); nothing imported")
        for problem in problems[:_SHOWN_PROBLEMS]:
            sys.stderr.write(f"{source}:{problem.line}: {problem.message}\n")
        if len(problems) > _SHOWN_PROBLEMS:
            sys.stderr.write(f"... and {len(problems) - _SHOWN_PROBLEMS} more bad line(s)\n")
        return EXIT_BAD_FILE

    async def run() -> tuple[UpsertCounts, list[tuple[Eui, str, Eui]], int]:
        async with open_store(configuration.settings.store) as store:
            counts = await upsert(store, records)
            dangling, total = await store.dangling_references(_SHOWN_PROBLEMS)
            return counts, dangling, total

    path = configuration.store_path
    created = not configuration.settings.store.postgres and not path.exists()
    counts, dangling, total = asyncio.run(run())
    if created:
        sys.stderr.write(f"mp169: created a new store at {path} (there was none)\n")
    sys.stdout.write(
        f"imported {counts.received:,} {noun} from {source} into {configuration.store_name}: "
        f"{counts.inserted:,} new, "
        f"{counts.updated:,} updated, {counts.unchanged:,} unchanged\n"
    )
    _warn_dangling(dangling, total)
    if after is not None:
        after(args, records)
    return 0


def _warn_dangling(dangling: list[tuple[Eui, str, Eui]], total: int) -> None:
    """Imported all the same (the other file may follow), but such a device cannot have its flag
    set (E081503: no commissioned comms hub) or its alerts delivered (no known supplier)."""
    if not total:
        return
    sys.stderr.write(
        f"mp169: warning: {total:,} reference(s) in the inventory name nothing known "
        "(import the users file and every comms hub, or correct the inventory):\n"
    )
    for device, column, value in dangling:
        what = "not in the inventory" if column == "comms_hub_id" else "not a known user"
        sys.stderr.write(f"  {device}: {column} {value} is {what}\n")
    if total > len(dangling):
        sys.stderr.write(f"  ... and {total - len(dangling):,} more\n")


# -- flags show -------------------------------------------------------------------------------------


def show_flags(args: argparse.Namespace) -> int:
    try:
        device = None if args.device is None else parse_eui(args.device)
        configuration = _configuration(args)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except ValueError as exc:
        _error(str(exc))
        return EXIT_USAGE
    if device is None:
        flags, history = asyncio.run(_all_flags(configuration.settings.store, args.limit))
        if args.json:
            _write_json({"flags": [_flag_json(flag) for flag in flags], "history": _history_json(history)})
        else:
            _print_all(flags, history)
        return 0
    record, flag, history = asyncio.run(_device_flag(configuration.settings.store, device))
    if record is None and flag is None and not history:
        _error(
            f"{device}: not in the inventory of {configuration.store_name}, and no flag request ever named it"
        )
        return EXIT_BAD_FILE
    if args.json:
        _write_json(
            {
                "device": None if record is None else _device_json(record),
                "flag": None if flag is None else _flag_json(flag),
                "history": _history_json(history),
            }
        )
    else:
        _print_device(device, record, flag, history)
    return 0


async def _all_flags(store_settings: StoreSettings, limit: int) -> tuple[list[FlagState], list[FlagEvent]]:
    async with open_store(store_settings) as store:
        flags = list((await store.load_flags()).values())
        return flags, await store.flag_history(limit=limit)


async def _device_flag(
    store_settings: StoreSettings, device: Eui
) -> tuple[DeviceRecord | None, FlagState | None, list[FlagEvent]]:
    async with open_store(store_settings) as store:
        flags = await store.load_flags()
        return await store.get_device(device), flags.get(device), await store.flag_history(device)


def _write_json(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def _refusal_name(code: str) -> str:
    return ResponseCode(code).name.lower().replace("_", "-")


def _legend(history: list[FlagEvent]) -> str:
    codes = sorted({event.outcome for event in history} - {OUTCOME_ACCEPTED, OUTCOME_UNCHANGED})
    return "; ".join(f"{code} {_refusal_name(code)}" for code in codes)


def _flag_json(flag: FlagState) -> dict[str, Any]:
    return {
        "device_id": flag.device_id,
        "set_by": flag.set_by,
        "set_at": flag.set_at.isoformat(),
        "request_id": flag.request_id,
        "consumer_reference": flag.consumer_reference,
    }


def _history_json(history: list[FlagEvent]) -> list[dict[str, Any]]:
    return [
        {
            "at": event.at.isoformat(),
            "device_id": event.device_id,
            "action": "set" if event.set else "clear",
            "requester": event.requester,
            "request_id": event.request_id,
            "declaration": event.declaration,
            "consumer_reference": event.consumer_reference,
            "outcome": event.outcome,
        }
        for event in history
    ]


def _device_json(record: DeviceRecord) -> dict[str, Any]:
    return {
        "device_id": record.device_id,
        "device_type": record.device_type.value,
        "smets": record.smets,
        "status": record.status.value,
        "comms_hub_id": record.comms_hub_id,
        "mpxn": record.mpxn,
        "import_supplier": record.import_supplier,
        "export_supplier": record.export_supplier,
        "gas_supplier": record.gas_supplier,
        "responsible_supplier": responsible_supplier(record),
        "tariff": record.tariff.value,
        "wan": record.wan,
        "network_operator": record.network_operator,
        "gas_transporter": record.gas_transporter,
    }


def _counter(request_id: str) -> str:
    # The originator is the requester column and the target the DCC: the counter is what is left.
    return request_id.rsplit(":", 1)[-1]


def _history_table(title: str, history: list[FlagEvent], *, with_device: bool) -> FittedTable:
    keys = [Column("at (UTC)"), *([Column("device")] if with_device else [])]
    values = [
        Column("action"),
        Column("requester"),
        Column("counter", numeric=True),
        Column("declared"),
        Column("reference"),
        Column("outcome", numeric=True),
    ]
    rows = [
        [
            event.at.strftime("%Y-%m-%d %H:%M:%S"),
            *([event.device_id] if with_device else []),
            "set" if event.set else "clear",
            event.requester,
            _counter(event.request_id),
            "" if event.declaration is None else ("yes" if event.declaration else "no"),
            event.consumer_reference or "",
            event.outcome,
        ]
        for event in history
    ]
    return FittedTable(title, keys, values, rows)


def _print_all(flags: list[FlagState], history: list[FlagEvent]) -> None:
    console = Console()
    rows = [
        [
            flag.device_id,
            flag.set_by,
            flag.set_at.strftime("%Y-%m-%d %H:%M:%S"),
            _counter(flag.request_id),
            flag.consumer_reference or "",
        ]
        for flag in flags
    ]
    values = [Column("set by"), Column("set at (UTC)"), Column("counter", numeric=True), Column("reference")]
    title = f"Devices with reduced communications: {len(flags)}"
    print_fitted(console, FittedTable(title, [Column("device")], values, rows))
    print_fitted(console, _history_table(f"Latest flag requests: {len(history)}", history, with_device=True))
    _print_legend(console, history)


def _print_device(
    device: Eui, record: DeviceRecord | None, flag: FlagState | None, history: list[FlagEvent]
) -> None:
    console = Console()
    if record is None:
        console.print(f"{device}: not in the inventory")
    else:
        console.print(
            f"{device}: {record.device_type} SMETS{record.smets} {record.status}, "
            f"responsible supplier {responsible_supplier(record) or 'none'}, tariff {record.tariff}, "
            f"WAN {'yes' if record.wan else 'no'}"
        )
    if flag is None:
        console.print("Reduced communications: not set")
    else:
        reference = f", consumer reference {flag.consumer_reference}" if flag.consumer_reference else ""
        console.print(
            f"Reduced communications: SET since {flag.set_at:%Y-%m-%d %H:%M:%S} UTC by {flag.set_by} "
            f"(request {flag.request_id}{reference})"
        )
    print_fitted(console, _history_table(f"Flag history: {len(history)}", history, with_device=False))
    _print_legend(console, history)


def _print_legend(console: Console, history: list[FlagEvent]) -> None:
    legend = _legend(history)
    if legend:
        console.print(f"Refused: {legend}")
