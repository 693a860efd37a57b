"""A simulated Smart Metering estate: premises with their devices, and the users that serve them.

`generate_estate(seed, premises)` is a pure function returning plain records (gateway.inventory's
DeviceRecord and UserRecord); `write_estate` writes them as the CSV files `mp169 inventory import` and
`mp169 users import` read (with the optional network_operator and gas_transporter columns last),
`read_estate` reads them.

The mix, per premise:

- a comms hub (CHF) and an ESME everywhere; a GSME with its GPF at about 60 %; a PPMID at about 25 %
  (prepayment homes);
- about 84 % SMETS2 and Commissioned throughout; 8 % SMETS1; 4 % meters InstalledNotCommissioned;
  4 % with a comms hub that is not Commissioned (replaced, awaiting commissioning);
- electricity tariff: single 80 %, Economy 7 10 %, other multi-rate 5 %, Radio Teleswitch 5 % (gas
  meters are always single-rate); 3 % network-managed sites without WAN; 10 % with an export supplier.

Identifiers follow DUIS: users are EUI-64s 90-B3-D5-1F-30-<kind>-<nn>-<nn> (kind 01 supplier,
02 electricity distributor, 03 gas transporter, 04 registered supplier agent, 05 other user);
devices are 00-DB-12-<premise, 4 bytes>-<kind>, the last byte naming the device as in the DUIS
samples (A0 ESME, A1 GSME, A2 CHF, A3 GPF, A4 PPMID). MPANs carry a real distributor id (10-23) and
check digit; the premise's electricity distributor (the ED user for that distributor id) is the
network operator of all its devices; a gas premise's gas transporter (one of the GT users) is named on
its GSME, GPF, comms hub and in-home devices. Every gas premise has a GPF on its comms hub: the GPF
holds the GSME's registers, profiles and prepayment values, which gas reads address.
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway import inventory
from rules.domain import DeviceRecord, DeviceStatus, DeviceType, Eui, Role, Tariff, UserRecord

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from pathlib import Path

INVENTORY_COLUMNS = (*inventory.INVENTORY_COLUMNS, *inventory.OPTIONAL_INVENTORY_COLUMNS)
INVENTORY_FILE = "inventory.csv"
USERS_FILE = "users.csv"

DEVICE_SUFFIX: Mapping[DeviceType, int] = {
    DeviceType.ESME: 0xA0,
    DeviceType.GSME: 0xA1,
    DeviceType.CHF: 0xA2,
    DeviceType.GPF: 0xA3,
    DeviceType.PPMID: 0xA4,
    DeviceType.HCALCS: 0xA6,
}
"""Last byte of a device EUI by device type: the convention of the DUIS sample requests."""

# GB electricity distributor ids (the first two digits of an MPAN core): the 14 licensed areas.
DISTRIBUTOR_IDS = tuple(range(10, 24))
_MPAN_PRIMES = (3, 5, 7, 13, 17, 19, 23, 29, 31, 37, 41, 43)

# Supplier market: (roles, weight as electricity supplier, weight as gas supplier).
_SUPPLIERS: tuple[tuple[frozenset[Role], int, int], ...] = (
    (frozenset({Role.IMPORT_SUPPLIER, Role.GAS_SUPPLIER, Role.EXPORT_SUPPLIER}), 24, 26),
    (frozenset({Role.IMPORT_SUPPLIER, Role.GAS_SUPPLIER}), 20, 22),
    (frozenset({Role.IMPORT_SUPPLIER, Role.GAS_SUPPLIER}), 14, 15),
    (frozenset({Role.IMPORT_SUPPLIER, Role.GAS_SUPPLIER}), 11, 12),
    (frozenset({Role.IMPORT_SUPPLIER, Role.GAS_SUPPLIER}), 9, 10),
    (frozenset({Role.IMPORT_SUPPLIER, Role.GAS_SUPPLIER}), 7, 8),
    (frozenset({Role.IMPORT_SUPPLIER}), 8, 0),
    (frozenset({Role.IMPORT_SUPPLIER}), 7, 0),
    (frozenset({Role.GAS_SUPPLIER}), 0, 7),
    (frozenset({Role.EXPORT_SUPPLIER}), 0, 0),
    (frozenset({Role.EXPORT_SUPPLIER}), 0, 0),
)
_GAS_TRANSPORTERS = 4
_SUPPLIER_AGENTS = 2
_OTHER_USERS = 3

_USER_KIND = {
    "supplier": 0x01,
    Role.ELECTRICITY_DISTRIBUTOR: 0x02,
    Role.GAS_TRANSPORTER: 0x03,
    Role.REGISTERED_SUPPLIER_AGENT: 0x04,
    Role.OTHER_USER: 0x05,
}


@dataclass(frozen=True, slots=True)
class Estate:
    devices: tuple[DeviceRecord, ...]
    users: tuple[UserRecord, ...]


def mpan_check_digit(first_twelve: str) -> int:
    """The MPAN core check digit (13th digit) of the 12 digits before it."""
    return sum(int(digit) * prime for digit, prime in zip(first_twelve, _MPAN_PRIMES, strict=True)) % 11 % 10


def _user_eui(kind: int, index: int) -> Eui:
    return Eui(f"90-B3-D5-1F-30-{kind:02X}-{index >> 8 & 0xFF:02X}-{index & 0xFF:02X}")


def _device_eui(premise: int, device_type: DeviceType) -> Eui:
    raw = f"00DB12{premise:08X}{DEVICE_SUFFIX[device_type]:02X}"
    return Eui("-".join(raw[i : i + 2] for i in range(0, 16, 2)))


@dataclass(frozen=True, slots=True)
class _Users:
    rows: tuple[UserRecord, ...]
    electricity: tuple[Eui, ...]
    electricity_weights: tuple[int, ...]
    gas: tuple[Eui, ...]
    gas_weights: tuple[int, ...]
    export: tuple[Eui, ...]
    distributors: Mapping[int, Eui]
    transporters: tuple[Eui, ...]


def _users() -> _Users:
    rows: list[UserRecord] = []
    electricity: list[Eui] = []
    electricity_weights: list[int] = []
    gas: list[Eui] = []
    gas_weights: list[int] = []
    export: list[Eui] = []
    for index, (roles, weight_electricity, weight_gas) in enumerate(_SUPPLIERS, start=1):
        eui = _user_eui(_USER_KIND["supplier"], index)
        rows.append(UserRecord(eui, roles))
        if weight_electricity:
            electricity.append(eui)
            electricity_weights.append(weight_electricity)
        if weight_gas:
            gas.append(eui)
            gas_weights.append(weight_gas)
        if Role.EXPORT_SUPPLIER in roles:
            export.append(eui)
    # The distributor id reads in the User ID: distributor 15 is 90-B3-D5-1F-30-02-00-15.
    distributors = {
        distributor: _user_eui(_USER_KIND[Role.ELECTRICITY_DISTRIBUTOR], int(str(distributor), 16))
        for distributor in DISTRIBUTOR_IDS
    }
    rows.extend(UserRecord(eui, frozenset({Role.ELECTRICITY_DISTRIBUTOR})) for eui in distributors.values())
    for role, count in (
        (Role.GAS_TRANSPORTER, _GAS_TRANSPORTERS),
        (Role.REGISTERED_SUPPLIER_AGENT, _SUPPLIER_AGENTS),
        (Role.OTHER_USER, _OTHER_USERS),
    ):
        rows.extend(
            UserRecord(_user_eui(_USER_KIND[role], index), frozenset({role})) for index in range(1, count + 1)
        )
    transporters = tuple(
        _user_eui(_USER_KIND[Role.GAS_TRANSPORTER], index) for index in range(1, _GAS_TRANSPORTERS + 1)
    )
    return _Users(
        tuple(rows),
        tuple(electricity),
        tuple(electricity_weights),
        tuple(gas),
        tuple(gas_weights),
        tuple(export),
        distributors,
        transporters,
    )


def _premise_devices(rng: random.Random, premise: int, users: _Users) -> list[DeviceRecord]:
    roll = rng.random()
    smets = 1 if roll < 0.08 else 2
    meter_status = (
        DeviceStatus.INSTALLED_NOT_COMMISSIONED if 0.08 <= roll < 0.12 else DeviceStatus.COMMISSIONED
    )
    hub_status = DeviceStatus.INSTALLED_NOT_COMMISSIONED if 0.12 <= roll < 0.16 else DeviceStatus.COMMISSIONED
    tariff = rng.choices(
        (Tariff.SINGLE, Tariff.ECONOMY7, Tariff.MULTI_RATE, Tariff.RTS), weights=(80, 10, 5, 5)
    )[0]
    wan = rng.random() >= 0.03
    has_gas = rng.random() < 0.6
    has_ppmid = rng.random() < 0.25
    has_export = rng.random() < 0.1
    distributor = rng.choice(DISTRIBUTOR_IDS)
    operator = users.distributors[distributor]
    import_supplier = rng.choices(users.electricity, weights=users.electricity_weights)[0]
    gas_supplier: Eui | None = None
    if has_gas:
        # Dual fuel from one supplier is the common case.
        same = import_supplier in users.gas and rng.random() < 0.7
        gas_supplier = import_supplier if same else rng.choices(users.gas, weights=users.gas_weights)[0]
    export_supplier = rng.choice(users.export) if has_export else None
    transporter = rng.choice(users.transporters) if has_gas else None
    mpan_head = f"{distributor:02d}{rng.randrange(10**10):010d}"
    mpan = f"{mpan_head}{mpan_check_digit(mpan_head)}"
    hub = _device_eui(premise, DeviceType.CHF)

    def row(  # noqa: PLR0913 - the columns that differ between a premise's devices
        device_type: DeviceType,
        status: DeviceStatus,
        *,
        mpxn: str | None = None,
        importer: Eui | None = None,
        exporter: Eui | None = None,
        gas: Eui | None = None,
        device_tariff: Tariff = tariff,
    ) -> DeviceRecord:
        return DeviceRecord(
            device_id=_device_eui(premise, device_type),
            device_type=device_type,
            smets=smets,
            status=status,
            comms_hub_id=None if device_type is DeviceType.CHF else hub,
            mpxn=mpxn,
            import_supplier=importer,
            export_supplier=exporter,
            gas_supplier=gas,
            tariff=device_tariff,
            wan=wan,
            network_operator=operator,
            gas_transporter=transporter if device_type is not DeviceType.ESME else None,
        )

    devices = [
        row(DeviceType.CHF, hub_status, importer=import_supplier, gas=gas_supplier),
        row(DeviceType.ESME, meter_status, mpxn=mpan, importer=import_supplier, exporter=export_supplier),
    ]
    if has_gas:
        mprn = f"{rng.randrange(10**9, 10**10)}"
        devices.append(row(DeviceType.GPF, meter_status, gas=gas_supplier, device_tariff=Tariff.SINGLE))
        devices.append(
            row(DeviceType.GSME, meter_status, mpxn=mprn, gas=gas_supplier, device_tariff=Tariff.SINGLE)
        )
    if has_ppmid:
        devices.append(row(DeviceType.PPMID, meter_status, importer=import_supplier, gas=gas_supplier))
    return devices


def generate_estate(seed: int, premises: int) -> Estate:
    """A deterministic estate of `premises` premises: the same (seed, premises) gives the same rows."""
    if premises < 1:
        raise ValueError("an estate needs at least one premise")
    rng = random.Random(f"mp169-estate:{seed}")  # noqa: S311 - a simulation, not security
    users = _users()
    # Distinct random premise numbers make each seed's device EUIs its own.
    numbers = rng.sample(range(1, 2**32), premises)
    devices = [device for number in numbers for device in _premise_devices(rng, number, users)]
    return Estate(tuple(devices), users.rows)


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def user_row(user: UserRecord) -> dict[str, str]:
    return {"user_id": user.user_id, "roles": " ".join(sorted(role.value for role in user.roles))}


def write_estate(estate: Estate, directory: Path) -> tuple[Path, Path]:
    """Write inventory.csv and users.csv into `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    inventory_path, users_path = directory / INVENTORY_FILE, directory / USERS_FILE
    _write_csv(inventory_path, INVENTORY_COLUMNS, (inventory.inventory_row(d) for d in estate.devices))
    _write_csv(users_path, inventory.USERS_COLUMNS, (user_row(user) for user in estate.users))
    return inventory_path, users_path


def read_estate(directory: Path) -> Estate:
    """Read inventory.csv and users.csv from `directory` (validated as `mp169 inventory import` does).

    Raises gateway.inventory.InventoryFileError listing the bad lines.
    """
    with (directory / INVENTORY_FILE).open(encoding="utf-8", newline="") as handle:
        devices = inventory.parse_inventory(handle)
    with (directory / USERS_FILE).open(encoding="utf-8", newline="") as handle:
        users = inventory.parse_users(handle)
    return Estate(tuple(devices), tuple(users))


def records_from_rows(rows: Iterable[Mapping[str, str]]) -> list[DeviceRecord]:
    """Inventory rows (as in an InventoryChange) as records, validated by the importer's own parser."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=INVENTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return inventory.parse_inventory(text.getvalue().splitlines())
