"""RoutingView: what routing reads, loaded from a real store and kept current."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.storage import open_store
from gateway.store import CommitBatch, FlagStore, SqliteStore
from gateway.view import RoutingView
from rules.decide import DeviceFacts
from rules.domain import (
    DeviceParties,
    DeviceRecord,
    DeviceStatus,
    DeviceType,
    Eui,
    Role,
    Tariff,
    UserRecord,
    device_parties,
    int_to_eui,
)
from tests.gateway.test_inventory import (
    DISTRIBUTOR,
    EXPORT_SUPPLIER,
    GAS_METER,
    GAS_PROXY,
    GAS_SUPPLIER,
    HUB,
    IMPORT_SUPPLIER,
    METER,
    NEW_SUPPLIER,
    USERS,
    comms_hub,
    esme,
    gsme,
    premise,
)
from tests.gateway.test_store import event

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from gateway.config import StoreSettings


@pytest.fixture
async def store(store_settings: StoreSettings) -> AsyncIterator[FlagStore]:
    async with open_store(store_settings) as opened:
        await opened.upsert_devices(
            [*premise(), gsme(device_id=GAS_PROXY, device_type=DeviceType.GPF, mpxn=None)]
        )
        await opened.upsert_users(USERS)
        await opened.commit(CommitBatch(flag_events=[event(GAS_METER)]))
        yield opened


async def test_load_gives_device_facts_roles_and_flags(store: FlagStore) -> None:
    view = await RoutingView.load(store)
    assert len(view) == 4
    assert view.device_facts(METER) == DeviceFacts(
        METER, DeviceType.ESME, 2, DeviceStatus.COMMISSIONED, device_parties(esme())
    )
    assert view.device_facts(GAS_METER) == DeviceFacts(
        GAS_METER, DeviceType.GSME, 2, DeviceStatus.COMMISSIONED, device_parties(gsme()), GAS_METER
    )
    # The GPF holds the flagged GSME's data: reads through it are the GSME's.
    proxy = view.device_facts(GAS_PROXY)
    assert proxy is not None
    assert (proxy.device_type, proxy.flagged_meter) == (DeviceType.GPF, GAS_METER)
    assert set(view.premises(METER)) == {HUB, METER, GAS_METER, GAS_PROXY}
    assert view.premises(METER)[0] == HUB
    assert view.device_facts(Eui("00-DB-12-00-00-00-00-01")) is None
    assert view.roles(IMPORT_SUPPLIER) == frozenset({Role.IMPORT_SUPPLIER, Role.GAS_SUPPLIER})
    assert view.roles(Eui("90-B3-D5-1F-30-09-09-09")) == frozenset()
    assert view.flagged == frozenset({GAS_METER})


async def test_device_is_the_inventory_entry_without_mpxn(store: FlagStore) -> None:
    view = await RoutingView.load(store)
    assert view.device(METER) == esme(mpxn=None)
    assert view.device(HUB) == comms_hub()
    assert view.device(Eui("00-DB-12-00-00-00-00-01")) is None


async def test_registered_parties_by_fuel(store: FlagStore) -> None:
    view = await RoutingView.load(store)

    def parties(eui: Eui) -> DeviceParties:
        facts = view.device_facts(eui)
        assert facts is not None
        return facts.parties

    assert parties(METER) == DeviceParties(IMPORT_SUPPLIER, EXPORT_SUPPLIER, None, DISTRIBUTOR, None)
    # The gas devices' rows name the distributor too: it has no relationship to them.
    assert parties(GAS_METER) == parties(GAS_PROXY) == DeviceParties(gas_supplier=GAS_SUPPLIER)
    assert parties(HUB) == DeviceParties(IMPORT_SUPPLIER, None, GAS_SUPPLIER, DISTRIBUTOR, None)


async def test_flags_set_and_clear_in_memory_only(store: FlagStore) -> None:
    view = await RoutingView.load(store)
    view.set_flag(METER)
    view.clear_flag(GAS_METER)
    view.clear_flag(GAS_METER)  # clearing a clear flag is harmless
    assert view.is_flagged(METER)
    assert not view.is_flagged(GAS_METER)
    assert (await RoutingView.load(store)).flagged == frozenset({GAS_METER})


async def test_refresh_applies_upserts_made_since_the_load(store: FlagStore) -> None:
    view = await RoutingView.load(store)
    assert await view.refresh(store) == 0
    moved = esme(import_supplier=NEW_SUPPLIER, tariff=Tariff.ECONOMY7, status=DeviceStatus.SUSPENDED)
    added = esme(device_id=Eui("00-DB-12-00-00-00-00-A0"))
    await store.upsert_devices([moved, added])
    await store.upsert_users([UserRecord(NEW_SUPPLIER, frozenset({Role.GAS_SUPPLIER}))])
    assert await view.refresh(store) == 3
    assert view.device(METER) == dataclasses.replace(moved, mpxn=None)
    assert view.device_facts(added.device_id) is not None
    assert view.roles(NEW_SUPPLIER) == frozenset({Role.GAS_SUPPLIER})
    assert view.is_flagged(GAS_METER)  # an inventory update never touches a flag
    assert await view.refresh(store) == 0


async def test_profiles_are_shared_between_alike_devices(tmp_path: Path) -> None:
    devices = [esme(device_id=int_to_eui(0x00DB120000000000 + n), mpxn=str(n)) for n in range(1, 3000)]
    async with SqliteStore(tmp_path / "db.sqlite3") as store:
        await store.upsert_devices(devices)
        view = await RoutingView.load(store)
    assert len(view) == len(devices)
    assert view.profile_count == 1
    assert all(view.device(d.device_id) == dataclasses.replace(d, mpxn=None) for d in devices)


# The hash table: keys that crowd together, tables that grow, keys that are absent.
_keys = st.lists(
    st.one_of(
        st.integers(min_value=1, max_value=2**64 - 1),
        st.integers(min_value=1, max_value=4096),
        st.integers(min_value=1, max_value=4096).map(lambda n: n << 44),  # differ in the top bits only
    ),
    unique=True,
    max_size=3000,
)


@given(present=_keys, absent=_keys)
def test_the_table_finds_exactly_what_was_put(present: list[int], absent: list[int]) -> None:
    view = RoutingView()
    statuses = list(DeviceStatus)
    records = [
        esme(
            device_id=int_to_eui(key),
            status=statuses[key % len(statuses)],
            comms_hub_id=int_to_eui(key ^ 1) if key != 1 else None,
        )
        for key in present
    ]
    view.apply_devices(records)
    view.apply_devices(records[: len(records) // 2])  # updates do not add devices
    assert len(view) == len(records)
    for record in records:
        facts = view.device_facts(record.device_id)
        assert facts is not None
        assert (facts.device_id, facts.status) == (record.device_id, record.status)
        assert view.device(record.device_id) == dataclasses.replace(record, mpxn=None)
    for key in set(absent) - set(present):
        assert view.device_facts(int_to_eui(key)) is None


def test_the_all_zero_eui_is_never_a_device() -> None:
    view = RoutingView()
    view.apply_devices([esme()])
    assert view.device_facts(Eui("00-00-00-00-00-00-00-00")) is None
    with pytest.raises(ValueError, match="not a device"):
        view.apply_devices([esme(device_id=Eui("00-00-00-00-00-00-00-00"))])


_HUBS = [int_to_eui(0x00DB_1200_0000_00A2 + (n << 8)) for n in range(3)]
_MEMBERS = [int_to_eui(0x00DB_1300_0000_0000 + n) for n in range(6)]
_MEMBER_TYPES = [DeviceType.ESME, DeviceType.GSME, DeviceType.GPF, DeviceType.PPMID]


@given(
    st.lists(
        st.tuples(
            st.sampled_from(_MEMBERS + _HUBS),
            st.sampled_from(_MEMBER_TYPES),
            st.none() | st.sampled_from(_HUBS),
            st.booleans(),
        ),
        max_size=30,
    )
)
def test_premises_and_the_gpfs_meter_follow_any_order_of_upserts_and_flags(steps) -> None:
    """Devices arrive before or after their hub, move between hubs, change type, get flagged and
    cleared: the premises chains and the GPF's flagged GSME always match a plain model."""
    view = RoutingView()
    rows: dict[Eui, DeviceRecord] = {}
    flags: set[Eui] = set()
    for eui, device_type, hub, flag in steps:
        if eui in _HUBS:
            record = comms_hub(device_id=eui)
        else:
            record = dataclasses.replace(
                gsme(), device_id=eui, device_type=device_type, comms_hub_id=hub, mpxn=None
            )
        view.apply_devices([record])
        rows[eui] = record
        (view.set_flag if flag else view.clear_flag)(eui)
        (flags.add if flag else flags.discard)(eui)
        for hub_eui in _HUBS:
            members = {e for e, r in rows.items() if r.comms_hub_id == hub_eui}
            if hub_eui in rows:
                premises = view.premises(hub_eui)
                assert premises[0] == hub_eui
                assert sorted(premises[1:]) == sorted(members)
        for member, row in rows.items():
            facts = view.device_facts(member)
            assert facts is not None
            if row.device_type is DeviceType.GPF and member not in flags:
                meters = {
                    e
                    for e, r in rows.items()
                    if r.device_type is DeviceType.GSME and e in flags and r.comms_hub_id == row.comms_hub_id
                }
                assert (
                    (facts.flagged_meter in meters)
                    if meters and row.comms_hub_id
                    else facts.flagged_meter is None
                )
            else:
                assert facts.flagged_meter == (member if member in flags else None)


def test_premises_survive_the_table_growing_and_devices_moving() -> None:
    """More devices than the smallest table holds: slots move as it grows; chains must follow."""
    view = RoutingView()
    hubs = [int_to_eui(0x00DB_2000_0000_00A2 + (n << 8)) for n in range(120)]
    members = {int_to_eui(0x00DB_3000_0000_0000 + n): hubs[n % len(hubs)] for n in range(700)}
    # Half the members arrive before their hub.
    early = dict(list(members.items())[:350])
    view.apply_devices(
        dataclasses.replace(esme(), device_id=eui, comms_hub_id=hub) for eui, hub in early.items()
    )
    view.apply_devices(comms_hub(device_id=hub) for hub in hubs)
    late = dict(list(members.items())[350:])
    view.apply_devices(
        dataclasses.replace(esme(), device_id=eui, comms_hub_id=hub) for eui, hub in late.items()
    )
    moved = {eui: hubs[(hubs.index(hub) + 1) % len(hubs)] for eui, hub in list(members.items())[::7]}
    view.apply_devices(
        dataclasses.replace(esme(), device_id=eui, comms_hub_id=hub) for eui, hub in moved.items()
    )
    members.update(moved)
    for hub in hubs:
        premises = view.premises(hub)
        assert premises[0] == hub
        assert sorted(premises[1:]) == sorted(eui for eui, home in members.items() if home == hub)
