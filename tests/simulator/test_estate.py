"""The simulated estate: deterministic, realistic in mix, and readable by the gateway's importer."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from gateway.inventory import inventory_row, parse_inventory, parse_users
from rules.domain import DeviceStatus, DeviceType, Role, Tariff
from simulator.estate import (
    DEVICE_SUFFIX,
    INVENTORY_COLUMNS,
    generate_estate,
    mpan_check_digit,
    read_estate,
    records_from_rows,
    write_estate,
)

USER_EUI = re.compile(r"90-B3-D5-1F-30(-[0-9A-F]{2}){3}")
DEVICE_EUI = re.compile(r"00-DB-12(-[0-9A-F]{2}){5}")


@pytest.fixture(scope="module")
def estate():
    return generate_estate(7, 3000)


def test_same_seed_same_estate_and_other_seed_another():
    assert generate_estate(3, 50) == generate_estate(3, 50)
    assert generate_estate(3, 50) != generate_estate(4, 50)
    assert generate_estate(3, 50).devices != generate_estate(3, 51).devices


def test_rejects_an_empty_estate():
    with pytest.raises(ValueError, match="at least one premise"):
        generate_estate(1, 0)


def test_every_premise_has_a_hub_and_an_esme_and_about_sixty_percent_gas(estate):
    hubs = {d.device_id for d in estate.devices if d.device_type is DeviceType.CHF}
    by_hub = Counter((d.comms_hub_id, d.device_type) for d in estate.devices if d.comms_hub_id)
    assert len(hubs) == 3000
    assert all(by_hub[hub, DeviceType.ESME] == 1 for hub in hubs)
    gas = sum(1 for hub in hubs if by_hub[hub, DeviceType.GSME])
    assert 0.55 < gas / 3000 < 0.65
    assert all(by_hub[hub, DeviceType.GPF] == by_hub[hub, DeviceType.GSME] for hub in hubs)
    assert 0 < sum(1 for hub in hubs if by_hub[hub, DeviceType.PPMID]) < 3000


def test_identifiers_follow_duis(estate):
    ids = [d.device_id for d in estate.devices]
    assert len(set(ids)) == len(ids)
    assert all(DEVICE_EUI.fullmatch(eui) for eui in ids)
    assert all(int(d.device_id[-2:], 16) == DEVICE_SUFFIX[d.device_type] for d in estate.devices)
    assert all(USER_EUI.fullmatch(user.user_id) for user in estate.users)
    assert {role for user in estate.users for role in user.roles} == set(Role)


def test_mpans_are_valid_and_name_the_network_operator(estate):
    operators = {user.user_id for user in estate.users if Role.ELECTRICITY_DISTRIBUTOR in user.roles}
    for device in estate.devices:
        assert device.network_operator in operators
        if device.device_type is DeviceType.ESME:
            mpan = device.mpxn
            assert mpan is not None
            assert len(mpan) == 13
            assert int(mpan[12]) == mpan_check_digit(mpan[:12])
            # The ED's User ID spells the distributor id: 90-B3-D5-1F-30-02-00-<id>.
            assert device.network_operator.endswith(f"-{mpan[:2]}")


def test_the_mix_holds_every_exception_the_flag_rules_know(estate):
    meters = [d for d in estate.devices if d.device_type is DeviceType.ESME]
    hubs = {d.device_id: d for d in estate.devices if d.device_type is DeviceType.CHF}
    tariffs = Counter(d.tariff for d in meters)
    assert tariffs[Tariff.SINGLE] > 0.7 * len(meters)
    assert all(tariffs[t] > 0 for t in (Tariff.ECONOMY7, Tariff.MULTI_RATE, Tariff.RTS))
    assert any(not d.wan for d in meters)
    assert any(d.smets == 1 for d in meters)
    assert sum(d.smets == 2 and d.status is DeviceStatus.COMMISSIONED for d in meters) > 0.8 * len(meters)
    assert any(d.status is DeviceStatus.INSTALLED_NOT_COMMISSIONED for d in meters)
    assert any(
        hubs[d.comms_hub_id].status is not DeviceStatus.COMMISSIONED and d.status is DeviceStatus.COMMISSIONED
        for d in meters
    )
    assert any(d.export_supplier for d in meters)


def test_suppliers_hold_the_role_their_column_needs(estate):
    roles = {user.user_id: user.roles for user in estate.users}
    for device in estate.devices:
        if device.import_supplier:
            assert Role.IMPORT_SUPPLIER in roles[device.import_supplier]
        if device.gas_supplier:
            assert Role.GAS_SUPPLIER in roles[device.gas_supplier]
        if device.export_supplier:
            assert Role.EXPORT_SUPPLIER in roles[device.export_supplier]
        if device.device_type is DeviceType.ESME:
            assert device.import_supplier
            assert not device.gas_supplier
        if device.device_type in {DeviceType.GSME, DeviceType.GPF}:
            assert device.gas_supplier
            assert not device.import_supplier


def test_written_files_pass_the_importer_and_read_back_equal(tmp_path):
    estate = generate_estate(11, 200)
    inventory, users = write_estate(estate, tmp_path / "estate")
    header = inventory.read_text().splitlines()[0]
    assert header == ",".join(INVENTORY_COLUMNS)
    assert header.endswith(",network_operator,gas_transporter")
    assert parse_inventory(inventory.read_text().splitlines()) == list(estate.devices)
    assert parse_users(users.read_text().splitlines()) == list(estate.users)
    assert read_estate(tmp_path / "estate") == estate


def test_rows_convert_back_to_records():
    estate = generate_estate(2, 5)
    assert records_from_rows([inventory_row(d) for d in estate.devices]) == list(estate.devices)
