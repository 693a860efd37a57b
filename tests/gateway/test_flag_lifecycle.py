"""The MP169 flag over its life: requests, Change of Supplier, Change of Tenancy, restarts, crashes.

Everything goes through a real SQLite store in a temporary folder and a RoutingView built from it.
`FlagDesk` does what the pipeline does with a flag Service Request: read the device and its comms
hub from the store, evaluate, commit the event in one transaction, then update the view.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gateway.flags import FlagVerdict, evaluate_flag_request
from gateway.store import OUTCOME_ACCEPTED, OUTCOME_UNCHANGED, CommitBatch, FlagEvent, SqliteStore
from gateway.view import RoutingView
from rules.codes import ResponseCode
from rules.domain import (
    DeviceRecord,
    DeviceStatus,
    DeviceType,
    Eui,
    FlagInstruction,
    Tariff,
    responsible_supplier,
)
from tests.gateway.test_inventory import (
    AGENT,
    DISTRIBUTOR,
    EXPORT_SUPPLIER,
    GAS_METER,
    GAS_SUPPLIER,
    HUB,
    IMPORT_SUPPLIER,
    METER,
    NEW_SUPPLIER,
    OTHER_USER,
    TRANSPORTER,
    USERS,
    comms_hub,
    esme,
    premise,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable

DCC = "90-B3-D5-1F-30-00-00-02"
START = datetime(2025, 6, 1, tzinfo=UTC)


class FlagDesk:
    """A store and the view built from it, handling flag requests as the pipeline does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = SqliteStore(path)
        self.view = RoutingView()
        self.requests = 0

    async def start(self) -> None:
        self.store = SqliteStore(self.path)
        await self.store.open()
        self.view = await RoutingView.load(self.store)

    async def restart(self) -> None:
        await self.store.close()
        await self.start()

    async def close(self) -> None:
        await self.store.close()

    async def upsert(self, *records: DeviceRecord) -> None:
        await self.store.upsert_devices(records)
        await self.view.refresh(self.store)

    async def request(
        self, requester: Eui, instruction: FlagInstruction, *, crash: bool = False
    ) -> FlagVerdict:
        """Handle one request; with `crash`, the process dies after the commit, before the view update."""
        self.requests += 1
        device = await self.store.get_device(instruction.device_id)
        hub = None
        if device is not None and device.comms_hub_id is not None:
            hub = await self.store.get_device(device.comms_hub_id)
        verdict = evaluate_flag_request(
            instruction, requester, device, hub, self.view.is_flagged(instruction.device_id)
        )
        if verdict.accepted:
            outcome = OUTCOME_ACCEPTED if verdict.changed else OUTCOME_UNCHANGED
        else:
            outcome = verdict.code.value
        flag_event = FlagEvent(
            device_id=instruction.device_id,
            set=instruction.set,
            requester=requester,
            request_id=f"{requester}:{DCC}:{self.requests}",
            declaration=instruction.all_reasonable_steps_taken if instruction.set else None,
            consumer_reference=instruction.consumer_reference,
            outcome=outcome,
            at=START + timedelta(seconds=self.requests),
        )
        await self.store.commit(CommitBatch(flag_events=[flag_event], counters={requester: self.requests}))
        if crash:
            await self.restart()  # the old view is gone with the process; the new one comes from the store
        elif verdict.changed:
            (self.view.set_flag if instruction.set else self.view.clear_flag)(instruction.device_id)
        return verdict

    async def agree(self) -> frozenset[Eui]:
        """The flagged devices; fails unless the view and the database say the same."""
        stored = frozenset(await self.store.load_flags())
        assert self.view.flagged == stored
        return stored


def set_flag(device: Eui = METER, *, declared: bool = True, reference: str | None = None) -> FlagInstruction:
    return FlagInstruction(
        device, set=True, all_reasonable_steps_taken=declared, consumer_reference=reference
    )


def clear_flag(device: Eui = METER) -> FlagInstruction:
    return FlagInstruction(device, set=False, all_reasonable_steps_taken=False)


@pytest.fixture
async def desk(tmp_path: Path) -> AsyncIterator[FlagDesk]:
    desk = FlagDesk(tmp_path / "var" / "mp169.sqlite3")
    await desk.start()
    await desk.store.upsert_devices(premise())
    await desk.store.upsert_users(USERS)
    await desk.restart()
    yield desk
    await desk.close()


async def outcomes(desk: FlagDesk, device: Eui = METER) -> list[tuple[str, Eui, str]]:
    return [
        ("set" if e.set else "clear", e.requester, e.outcome) for e in await desk.store.flag_history(device)
    ]


async def test_the_responsible_supplier_sets_and_clears(desk: FlagDesk) -> None:
    assert (await desk.request(IMPORT_SUPPLIER, set_flag(reference="CR-42"))).changed
    assert await desk.agree() == {METER}
    facts = desk.view.device_facts(METER)
    assert facts is not None
    assert facts.flagged
    state = (await desk.store.load_flags())[METER]
    assert (state.set_by, state.consumer_reference) == (IMPORT_SUPPLIER, "CR-42")
    assert (await desk.request(IMPORT_SUPPLIER, clear_flag())).changed
    assert await desk.agree() == frozenset()
    assert await outcomes(desk) == [
        ("set", IMPORT_SUPPLIER, "accepted"),
        ("clear", IMPORT_SUPPLIER, "accepted"),
    ]


@pytest.mark.parametrize(
    "requester", [OTHER_USER, DISTRIBUTOR, TRANSPORTER, AGENT, EXPORT_SUPPLIER, NEW_SUPPLIER]
)
async def test_everyone_else_is_refused_and_the_refusal_recorded(desk: FlagDesk, requester: Eui) -> None:
    await desk.request(IMPORT_SUPPLIER, set_flag())
    for instruction in (set_flag(GAS_METER), clear_flag()):
        verdict = await desk.request(requester, instruction)
        assert verdict.code is ResponseCode.NOT_RESPONSIBLE_SUPPLIER
    assert await desk.agree() == {METER}
    assert (await outcomes(desk))[-1] == ("clear", requester, "E3")
    assert await outcomes(desk, GAS_METER) == [("set", requester, "E3")]


@pytest.mark.parametrize(
    ("meter", "hub", "instruction", "code"),
    [
        (esme(smets=1), comms_hub(), set_flag(), ResponseCode.FLAG_NOT_SMETS2),
        (
            esme(status=DeviceStatus.PENDING),
            comms_hub(),
            set_flag(),
            ResponseCode.FLAG_DEVICE_NOT_COMMISSIONED,
        ),
        (
            esme(),
            comms_hub(status=DeviceStatus.INSTALLED_NOT_COMMISSIONED),
            set_flag(),
            ResponseCode.FLAG_COMMS_HUB_NOT_COMMISSIONED,
        ),
        (esme(tariff=Tariff.MULTI_RATE), comms_hub(), set_flag(), ResponseCode.FLAG_MULTI_RATE_TARIFF),
        (esme(tariff=Tariff.ECONOMY7), comms_hub(), set_flag(), ResponseCode.FLAG_MULTI_RATE_TARIFF),
        (esme(tariff=Tariff.RTS), comms_hub(), set_flag(), ResponseCode.FLAG_RADIO_TELESWITCH),
        (esme(wan=False), comms_hub(), set_flag(), ResponseCode.FLAG_NO_WAN),
        (esme(), comms_hub(), set_flag(declared=False), ResponseCode.FLAG_DECLARATION_MISSING),
        (esme(device_type=DeviceType.PPMID), comms_hub(), set_flag(), ResponseCode.FLAG_DEVICE_TYPE),
    ],
)
async def test_refusals_leave_the_flag_and_are_recorded_with_their_code(
    desk: FlagDesk, meter: DeviceRecord, hub: DeviceRecord, instruction: FlagInstruction, code: ResponseCode
) -> None:
    await desk.upsert(meter, hub)
    verdict = await desk.request(IMPORT_SUPPLIER, instruction)
    assert (verdict.accepted, verdict.code) == (False, code)
    assert await desk.agree() == frozenset()
    assert await outcomes(desk) == [("set", IMPORT_SUPPLIER, code.value)]


async def test_an_unknown_device_is_refused_and_recorded(desk: FlagDesk) -> None:
    unknown = Eui("00-DB-12-00-00-00-00-A0")
    assert (await desk.request(IMPORT_SUPPLIER, set_flag(unknown))).code is ResponseCode.UNKNOWN_DEVICE
    assert await outcomes(desk, unknown) == [("set", IMPORT_SUPPLIER, "E19")]


async def test_repeats_are_accepted_unchanged_and_recorded(desk: FlagDesk) -> None:
    first = await desk.request(IMPORT_SUPPLIER, clear_flag())
    await desk.request(IMPORT_SUPPLIER, set_flag())
    again = await desk.request(IMPORT_SUPPLIER, set_flag())
    assert (first.accepted, first.changed, again.accepted, again.changed) == (True, False, True, False)
    assert await desk.agree() == {METER}
    assert [o for _, _, o in await outcomes(desk)] == ["unchanged", "accepted", "unchanged"]
    # The flag row still names the request that set it.
    assert (await desk.store.load_flags())[METER].request_id.endswith(":2")


async def test_a_set_flag_stays_through_an_exception_and_can_always_be_cleared(desk: FlagDesk) -> None:
    await desk.request(IMPORT_SUPPLIER, set_flag())
    await desk.upsert(esme(tariff=Tariff.RTS, wan=False))  # the site became an exception later
    assert await desk.agree() == {METER}
    assert (await desk.request(IMPORT_SUPPLIER, clear_flag())).changed
    assert await desk.agree() == frozenset()


async def test_change_of_supplier_moves_responsibility_never_the_flag(desk: FlagDesk) -> None:
    await desk.request(IMPORT_SUPPLIER, set_flag())
    await desk.upsert(esme(import_supplier=NEW_SUPPLIER))
    await desk.restart()
    assert await desk.agree() == {METER}
    record = desk.view.device(METER)
    assert record is not None
    assert responsible_supplier(record) == NEW_SUPPLIER
    old = await desk.request(IMPORT_SUPPLIER, clear_flag())
    assert old.code is ResponseCode.NOT_RESPONSIBLE_SUPPLIER
    assert await desk.agree() == {METER}
    assert (await desk.request(NEW_SUPPLIER, clear_flag())).changed
    assert await desk.agree() == frozenset()


async def test_change_of_tenancy_clears_and_sets_again_keeping_the_history(desk: FlagDesk) -> None:
    await desk.request(IMPORT_SUPPLIER, set_flag(reference="tenant-1"))
    await desk.request(IMPORT_SUPPLIER, clear_flag())  # the old occupant moved out
    await desk.request(IMPORT_SUPPLIER, set_flag(reference="tenant-2"))  # the new one asks too
    await desk.restart()
    assert await desk.agree() == {METER}
    history = await desk.store.flag_history(METER)
    assert [(e.set, e.consumer_reference, e.outcome) for e in history] == [
        (True, "tenant-1", "accepted"),
        (False, None, "accepted"),
        (True, "tenant-2", "accepted"),
    ]
    assert (await desk.store.load_flags())[METER].consumer_reference == "tenant-2"


@pytest.mark.parametrize("instruction", [set_flag(), clear_flag()], ids=["set", "clear"])
async def test_a_crash_between_commit_and_answer_leaves_view_and_database_agreeing(
    desk: FlagDesk, instruction: FlagInstruction
) -> None:
    if not instruction.set:
        await desk.request(IMPORT_SUPPLIER, set_flag())
    await desk.request(IMPORT_SUPPLIER, instruction, crash=True)
    assert await desk.agree() == ({METER} if instruction.set else frozenset())
    assert (await desk.store.load_request_counters())[IMPORT_SUPPLIER] == desk.requests


# -- random lives ---------------------------------------------------------------------------------------

DEVICES = (METER, GAS_METER, Eui("00-DB-12-00-00-00-00-A0"))
REQUESTERS = (IMPORT_SUPPLIER, NEW_SUPPLIER, GAS_SUPPLIER, EXPORT_SUPPLIER, DISTRIBUTOR, OTHER_USER)


class FlagLives(RuleBasedStateMachine):
    """Random sets, clears, Changes of Supplier and Tenancy, inventory changes, restarts and crashes.

    The model is the plain statement of the rule: the flag changes only when the device's
    responsible supplier asks, the meter is a Commissioned SMETS2 ESME or GSME on a Commissioned
    comms hub, and, for a set, the declaration is made and the site is no exception.
    """

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.folder = tempfile.TemporaryDirectory()
        self.desk = FlagDesk(Path(self.folder.name) / "mp169.sqlite3")
        self.inventory = {record.device_id: record for record in premise()}
        self.flagged: set[Eui] = set()
        self.run(self.desk.start())
        self.run(self.desk.store.upsert_devices(self.inventory.values()))
        self.run(self.desk.restart())

    def run(self, step: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(step)

    def teardown(self) -> None:
        self.run(self.desk.close())
        self.loop.close()
        self.folder.cleanup()

    def allowed(self, requester: Eui, instruction: FlagInstruction) -> bool:
        device = self.inventory.get(instruction.device_id)
        if device is None or device.device_type not in {DeviceType.ESME, DeviceType.GSME}:
            return False
        supplier = device.import_supplier if device.device_type is DeviceType.ESME else device.gas_supplier
        hub = self.inventory.get(device.comms_hub_id) if device.comms_hub_id else None
        ready = (
            requester == supplier
            and device.smets == 2
            and device.status is DeviceStatus.COMMISSIONED
            and hub is not None
            and hub.status is DeviceStatus.COMMISSIONED
        )
        if instruction.set:
            return (
                ready
                and instruction.all_reasonable_steps_taken
                and device.tariff is Tariff.SINGLE
                and device.wan
            )
        return ready

    @rule(
        requester=st.sampled_from(REQUESTERS),
        device=st.sampled_from(DEVICES),
        set_it=st.booleans(),
        declared=st.booleans(),
        crash=st.booleans(),
    )
    def request(self, requester: Eui, device: Eui, set_it: bool, declared: bool, crash: bool) -> None:
        instruction = FlagInstruction(device, set=set_it, all_reasonable_steps_taken=declared)
        verdict: FlagVerdict = self.run(self.desk.request(requester, instruction, crash=crash))
        assert verdict.accepted == self.allowed(requester, instruction)
        if verdict.accepted:
            assert verdict.changed == ((device in self.flagged) != set_it)
            (self.flagged.add if set_it else self.flagged.discard)(device)

    @rule(device=st.sampled_from([METER, GAS_METER]), supplier=st.sampled_from(REQUESTERS))
    def change_of_supplier(self, device: Eui, supplier: Eui) -> None:
        record = self.inventory[device]
        if record.device_type is DeviceType.ESME:
            record = dataclasses.replace(record, import_supplier=supplier)
        else:
            record = dataclasses.replace(record, gas_supplier=supplier)
        self.inventory[device] = record
        self.run(self.desk.upsert(record))

    @rule(device=st.sampled_from([METER, GAS_METER]))
    def change_of_tenancy(self, device: Eui) -> None:
        """The responsible supplier clears the flag for the old occupant and sets it for the new one."""
        supplier = responsible_supplier(self.inventory[device])
        if supplier is None:
            return
        before = len(self.run(self.desk.store.flag_history(device)))
        self.request(supplier, device, set_it=False, declared=False, crash=False)
        self.request(supplier, device, set_it=True, declared=True, crash=False)
        assert len(self.run(self.desk.store.flag_history(device))) == before + 2

    @rule(
        device=st.sampled_from([METER, GAS_METER, HUB]),
        smets=st.sampled_from([1, 2, 2]),
        status=st.sampled_from(
            [DeviceStatus.COMMISSIONED, DeviceStatus.COMMISSIONED, DeviceStatus.SUSPENDED]
        ),
        tariff=st.sampled_from([Tariff.SINGLE, Tariff.SINGLE, Tariff.ECONOMY7, Tariff.RTS]),
        wan=st.sampled_from([True, True, False]),
    )
    def inventory_change(
        self, device: Eui, smets: int, status: DeviceStatus, tariff: Tariff, wan: bool
    ) -> None:
        record = dataclasses.replace(
            self.inventory[device], smets=smets, status=status, tariff=tariff, wan=wan
        )
        self.inventory[device] = record
        self.run(self.desk.upsert(record))

    @rule()
    def restart(self) -> None:
        self.run(self.desk.restart())

    @invariant()
    def view_database_and_model_agree(self) -> None:
        assert self.run(self.desk.agree()) == self.flagged
        for device in self.inventory:
            facts = self.desk.view.device_facts(device)
            assert facts is not None
            assert facts.flagged == (device in self.flagged)

    @invariant()
    def every_request_is_in_the_history(self) -> None:
        assert len(self.run(self.desk.store.flag_history())) == self.desk.requests


FlagLives.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestFlagLives = FlagLives.TestCase
