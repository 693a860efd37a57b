"""Inventory and users CSV files: every row validated, every bad line named, nothing half-read.

The record factories at the top are shared by the flag, store, view and admin tests.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.inventory import (
    INVENTORY_COLUMNS,
    InventoryFileError,
    _DeviceRow,
    inventory_row,
    parse_inventory,
    parse_users,
)
from rules.domain import (
    DeviceRecord,
    DeviceStatus,
    DeviceType,
    Eui,
    Role,
    Tariff,
    UserRecord,
    responsible_supplier,
)

# -- shared factories ---------------------------------------------------------------------------------

IMPORT_SUPPLIER = Eui("90-B3-D5-1F-30-01-00-01")
NEW_SUPPLIER = Eui("90-B3-D5-1F-30-01-00-02")
GAS_SUPPLIER = Eui("90-B3-D5-1F-30-01-00-03")
EXPORT_SUPPLIER = Eui("90-B3-D5-1F-30-01-00-0A")
DISTRIBUTOR = Eui("90-B3-D5-1F-30-02-00-15")
TRANSPORTER = Eui("90-B3-D5-1F-30-03-00-01")
AGENT = Eui("90-B3-D5-1F-30-04-00-01")
OTHER_USER = Eui("90-B3-D5-1F-30-05-00-01")

METER = Eui("00-DB-12-34-56-78-90-A0")
GAS_METER = Eui("00-DB-12-34-56-78-90-A1")
HUB = Eui("00-DB-12-34-56-78-90-A2")
GAS_PROXY = Eui("00-DB-12-34-56-78-90-A3")


def esme(**changes: Any) -> DeviceRecord:
    """A flaggable SMETS2 electricity meter: Commissioned, single rate, WAN, on HUB."""
    base = DeviceRecord(
        device_id=METER,
        device_type=DeviceType.ESME,
        smets=2,
        status=DeviceStatus.COMMISSIONED,
        comms_hub_id=HUB,
        mpxn="1012345678906",
        import_supplier=IMPORT_SUPPLIER,
        export_supplier=EXPORT_SUPPLIER,
        gas_supplier=None,
        tariff=Tariff.SINGLE,
        wan=True,
        network_operator=DISTRIBUTOR,
    )
    return dataclasses.replace(base, **changes)


def gsme(**changes: Any) -> DeviceRecord:
    base = dataclasses.replace(
        esme(),
        device_id=GAS_METER,
        device_type=DeviceType.GSME,
        mpxn="1234567890",
        import_supplier=None,
        export_supplier=None,
        gas_supplier=GAS_SUPPLIER,
    )
    return dataclasses.replace(base, **changes)


def comms_hub(**changes: Any) -> DeviceRecord:
    base = dataclasses.replace(
        esme(), device_id=HUB, device_type=DeviceType.CHF, comms_hub_id=None, mpxn=None, export_supplier=None
    )
    return dataclasses.replace(base, gas_supplier=GAS_SUPPLIER, **changes)


def premise() -> list[DeviceRecord]:
    return [comms_hub(), esme(), gsme()]


USERS = [
    UserRecord(IMPORT_SUPPLIER, frozenset({Role.IMPORT_SUPPLIER, Role.GAS_SUPPLIER})),
    UserRecord(NEW_SUPPLIER, frozenset({Role.IMPORT_SUPPLIER})),
    UserRecord(GAS_SUPPLIER, frozenset({Role.GAS_SUPPLIER})),
    UserRecord(EXPORT_SUPPLIER, frozenset({Role.EXPORT_SUPPLIER})),
    UserRecord(DISTRIBUTOR, frozenset({Role.ELECTRICITY_DISTRIBUTOR})),
    UserRecord(TRANSPORTER, frozenset({Role.GAS_TRANSPORTER})),
    UserRecord(AGENT, frozenset({Role.REGISTERED_SUPPLIER_AGENT})),
    UserRecord(OTHER_USER, frozenset({Role.OTHER_USER})),
]


def inventory_csv(records: list[DeviceRecord], *, columns: tuple[str, ...] | None = None) -> str:
    """Records as an inventory CSV file (with the optional network_operator column unless told)."""
    names = columns or (*INVENTORY_COLUMNS, "network_operator")
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow(inventory_row(record))
    return out.getvalue()


def users_csv(records: list[UserRecord]) -> str:
    rows = [f"{user.user_id},{' '.join(sorted(role.value for role in user.roles))}" for user in records]
    return "user_id,roles\n" + "\n".join(rows) + "\n"


def lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def problems_of(text: str, parse: Any = parse_inventory) -> dict[int, str]:
    with pytest.raises(InventoryFileError) as caught:
        parse(lines(text))
    return {problem.line: problem.message for problem in caught.value.problems}


# -- inventory ---------------------------------------------------------------------------------------


def test_a_good_file_gives_its_records_in_order() -> None:
    records = premise()
    assert parse_inventory(lines(inventory_csv(records))) == records


def test_network_operator_column_is_optional() -> None:
    text = inventory_csv(premise(), columns=INVENTORY_COLUMNS)
    parsed = parse_inventory(lines(text))
    assert [record.network_operator for record in parsed] == [None, None, None]
    assert parsed[1] == esme(network_operator=None)


def test_columns_may_come_in_any_order_and_values_are_normalised() -> None:
    text = (
        "wan,tariff,device_id,device_type,smets,status,comms_hub_id,mpxn,import_supplier,"
        "export_supplier,gas_supplier\n"
        " YES , economy7 ,00-db-12-34-56-78-90-a0, ESME ,2 , Commissioned ,00-db-12-34-56-78-90-a2,"
        " 1012345678906 ,90-b3-d5-1f-30-01-00-01,,\n"
    )
    [record] = parse_inventory(lines(text))
    assert record == esme(tariff=Tariff.ECONOMY7, export_supplier=None, network_operator=None)


def test_blank_lines_are_skipped_and_line_numbers_stay_physical() -> None:
    rows = lines(inventory_csv([esme(), gsme()]))
    text = rows[0] + "\n" + rows[1] + "\n" + rows[2].replace(",2,", ",3,", 1)
    assert problems_of(text) == {5: "smets: smets must be 1 or 2, not '3'"}


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("device_id", "00-DB-12", "device_id: not an EUI-64"),
        ("device_id", "", "device_id: not an EUI-64"),
        ("device_id", "00-00-00-00-00-00-00-00", "is not a Device ID"),
        ("device_type", "METER", "device_type: Input should be 'ESME', 'GSME'"),
        ("smets", "two", "smets: smets must be 1 or 2"),
        ("status", "Live", "status: Input should be 'Pending'"),
        ("comms_hub_id", "hub-1", "comms_hub_id: not an EUI-64"),
        ("comms_hub_id", "00-DB-12-34-56-78-90-B0", "a device is not its own comms hub"),
        ("import_supplier", "90-B3-D5-1F-30-01-00", "import_supplier: not an EUI-64"),
        ("gas_supplier", GAS_SUPPLIER, "an ESME has no gas_supplier"),
        ("tariff", "economy10", "tariff: Input should be 'single', 'multi-rate', 'economy7' or 'rts'"),
        ("wan", "maybe", "wan: wan must be yes or no"),
        ("network_operator", "ED", "network_operator: not an EUI-64"),
        ("mpxn", "1" * 33, "mpxn is longer than 32 characters"),
    ],
)
def test_each_kind_of_bad_value_is_named_with_its_line(column: str, value: str, message: str) -> None:
    good = inventory_row(esme())
    bad = inventory_row(dataclasses.replace(esme(), device_id=Eui("00-DB-12-34-56-78-90-B0")))
    bad[column] = value
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(good), lineterminator="\n")
    writer.writeheader()
    writer.writerows([good, bad])
    found = problems_of(out.getvalue())
    assert list(found) == [3]
    assert message in found[3]


def test_a_gas_meter_with_an_import_supplier_is_refused() -> None:
    found = problems_of(inventory_csv([gsme(import_supplier=IMPORT_SUPPLIER)]))
    assert "a GSME has no import or export supplier" in found[2]


def test_every_bad_line_is_reported_at_once() -> None:
    text = inventory_csv(premise())
    rows = lines(text)
    rows[1] = rows[1].replace("CHF", "HUB")
    rows[3] = rows[3].replace("single", "flat")
    rows.append("00-DB-12-34-56-78-90-A5,ESME\n")  # wrong number of fields
    rows.append(rows[2])  # the ESME again
    found = problems_of("".join(rows))
    assert sorted(found) == [2, 4, 5, 6]
    assert "expected 12 fields as in the header, found 2" in found[5]
    assert found[6] == f"device {METER} is already on line 3"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("device_id,device_type\n", "bad header: missing column(s) smets, status"),
        (",".join((*INVENTORY_COLUMNS, "colour")) + "\n", "bad header: unknown column(s) colour"),
        (",".join((*INVENTORY_COLUMNS, "wan")) + "\n", "bad header: repeated column(s) wan"),
        ("", "empty file"),
    ],
)
def test_a_bad_header_is_line_one(header: str, message: str) -> None:
    found = problems_of(header)
    assert list(found) == [1]
    assert found[1].startswith(message)


def test_a_header_only_file_is_empty_not_bad() -> None:
    assert parse_inventory(lines(inventory_csv([]))) == []


def test_responsible_supplier_by_device_type() -> None:
    assert responsible_supplier(esme()) == IMPORT_SUPPLIER
    assert responsible_supplier(gsme()) == GAS_SUPPLIER
    assert responsible_supplier(gsme(device_type=DeviceType.GPF)) == GAS_SUPPLIER
    assert responsible_supplier(comms_hub()) is None
    assert responsible_supplier(esme(import_supplier=None)) is None


# The fast path must accept exactly what the model accepts, with the same record.
_eui_text = st.sampled_from([METER, METER.lower(), " " + METER, "00-DB-12-34", "00-00-00-00-00-00-00-00"])
_optional_eui_text = st.sampled_from(["", " ", HUB, HUB.lower(), IMPORT_SUPPLIER, "XX-DB-12-34-56-78-90-A0"])
_row = st.fixed_dictionaries(
    {
        "device_id": _eui_text,
        "device_type": st.sampled_from(["ESME", "GSME", "CHF", "esme", " GPF", "METER"]),
        "smets": st.sampled_from(["1", "2", " 2", "3", ""]),
        "status": st.sampled_from(["Commissioned", "Pending", "commissioned", "Commissioned "]),
        "comms_hub_id": _optional_eui_text,
        "mpxn": st.sampled_from(["", "1012345678906", " 12 ", "9" * 33]),
        "import_supplier": _optional_eui_text,
        "export_supplier": _optional_eui_text,
        "gas_supplier": _optional_eui_text,
        "tariff": st.sampled_from(["single", "rts", "RTS", "economy7 ", "flat"]),
        "wan": st.sampled_from(["yes", "no", "YES", " no", "true"]),
        "network_operator": _optional_eui_text,
    }
)


@given(_row)
def test_the_fast_path_agrees_with_the_model(row: dict[str, str]) -> None:
    try:
        expected: DeviceRecord | None = _DeviceRow.model_validate(row).record()
    except ValueError:
        expected = None
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(row), lineterminator="\n")
    writer.writeheader()
    writer.writerow(row)
    try:
        [parsed] = parse_inventory(lines(out.getvalue()))
    except InventoryFileError:
        assert expected is None
    else:
        assert parsed == expected


# -- users ------------------------------------------------------------------------------------------


def test_users_file_round_trips() -> None:
    assert parse_users(lines(users_csv(USERS))) == USERS


def test_bad_user_lines_are_named() -> None:
    text = "user_id,roles\n90-B3-D5-1F-30-01-00-01,IS GS\n90-B3-D5-1F-30-01-00-02,IS XX\nnope,IS\n"
    text += "90-B3-D5-1F-30-01-00-03,\n90-b3-d5-1f-30-01-00-01,ES\n"
    found = problems_of(text, parse_users)
    assert found == {
        3: "roles: unknown role 'XX': roles are IS ES GS ED GT RSA OU",
        4: "user_id: not an EUI-64 (expected 8 hex pairs joined by '-'): 'nope'",
        5: "roles: at least one role is needed (IS ES GS ED GT RSA OU)",
        6: "user 90-B3-D5-1F-30-01-00-01 is already on line 2",
    }
