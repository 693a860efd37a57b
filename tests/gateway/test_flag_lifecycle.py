"""The MP169 flag over its life: requests, Change of Supplier, Change of Tenancy, restarts, crashes.

Every request goes through the router as DUIS XML (tests/gateway/desk.py drives it with no event
loop); its durable state is what the router's commits made of it, and a restart builds a new router
from that state, as a new process builds its view from the store.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from rules.codes import ResponseCode
from rules.domain import (
    OUTCOME_ACCEPTED,
    OUTCOME_UNCHANGED,
    DeviceRecord,
    DeviceStatus,
    DeviceType,
    Eui,
    FlagEvent,
    Tariff,
    responsible_supplier,
)
from tests.gateway.desk import Desk, Durable
from tests.gateway.messages import flag_request
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
    comms_hub,
    esme,
    premise,
)


@dataclasses.dataclass(frozen=True)
class Verdict:
    code: str
    outcome: str

    @property
    def accepted(self) -> bool:
        return self.outcome in {OUTCOME_ACCEPTED, OUTCOME_UNCHANGED}

    @property
    def changed(self) -> bool:
        return self.outcome == OUTCOME_ACCEPTED


class FlagCounter:
    """The supplier side: rising RequestID counters, one flag Service Request at a time."""

    def __init__(self, desk: Desk) -> None:
        self.desk = desk
        self.counters = itertools.count(1)

    def __call__(
        self,
        requester: Eui,
        device: Eui = METER,
        *,
        set_flag: bool,
        declared: bool = True,
        reference: str | None = None,
        crash: bool = False,
    ) -> Verdict:
        """One flag request; with `crash`, the process dies after its commit, before it hears so."""
        desk = self.desk
        payload = flag_request(
            requester, next(self.counters), device, set_flag=set_flag, declared=declared, reference=reference
        )
        before = len(desk.durable.history)
        desk.hold = crash
        answers = desk.send(requester, payload)
        if crash:
            if desk.waiting_reads:
                desk.read()
            desk.crash_after_commit()
            desk.hold = False
        code = "" if crash else desk.answers_to(requester, answers)[0]
        if len(desk.durable.history) == before:  # refused by the rules before the flag checks
            return Verdict(code, code)
        assert len(desk.durable.history) == before + 1
        event: FlagEvent = desk.durable.history[-1]
        return Verdict(code, event.outcome)


@pytest.fixture
def desk() -> Desk:
    return Desk(Durable.of(premise()))


@pytest.fixture
def ask(desk: Desk) -> FlagCounter:
    return FlagCounter(desk)


def outcomes(desk: Desk, device: Eui = METER) -> list[tuple[str, Eui, str]]:
    return [
        ("set" if e.set else "clear", e.requester, e.outcome)
        for e in desk.durable.history
        if e.device_id == device
    ]


def test_the_responsible_supplier_sets_and_clears(desk: Desk, ask: FlagCounter) -> None:
    assert ask(IMPORT_SUPPLIER, set_flag=True, reference="CR-42").changed
    assert desk.agree() == {METER}
    facts = desk.router.view.device_facts(METER)
    assert facts is not None
    assert facts.flagged
    set_event = desk.durable.history[-1]
    assert (set_event.requester, set_event.consumer_reference) == (IMPORT_SUPPLIER, "CR-42")
    assert ask(IMPORT_SUPPLIER, set_flag=False).changed
    assert desk.agree() == frozenset()
    assert outcomes(desk) == [("set", IMPORT_SUPPLIER, "accepted"), ("clear", IMPORT_SUPPLIER, "accepted")]


@pytest.mark.parametrize(
    "requester", [OTHER_USER, DISTRIBUTOR, TRANSPORTER, AGENT, EXPORT_SUPPLIER, NEW_SUPPLIER]
)
def test_everyone_else_is_refused_and_the_refusal_recorded(
    desk: Desk, ask: FlagCounter, requester: Eui
) -> None:
    ask(IMPORT_SUPPLIER, set_flag=True)
    for device, set_it in ((GAS_METER, True), (METER, False)):
        verdict = ask(requester, device, set_flag=set_it)
        assert verdict.code == ResponseCode.NOT_RESPONSIBLE_SUPPLIER
    assert desk.agree() == {METER}
    assert outcomes(desk)[-1] == ("clear", requester, ResponseCode.NOT_RESPONSIBLE_SUPPLIER.value)
    assert outcomes(desk, GAS_METER) == [("set", requester, ResponseCode.NOT_RESPONSIBLE_SUPPLIER.value)]


@pytest.mark.parametrize(
    ("meter", "hub", "declared", "code"),
    [
        (esme(smets=1), comms_hub(), True, ResponseCode.FLAG_NOT_SMETS2),
        (esme(status=DeviceStatus.PENDING), comms_hub(), True, ResponseCode.FLAG_DEVICE_NOT_COMMISSIONED),
        (
            esme(),
            comms_hub(status=DeviceStatus.INSTALLED_NOT_COMMISSIONED),
            True,
            ResponseCode.FLAG_COMMS_HUB_NOT_COMMISSIONED,
        ),
        (esme(tariff=Tariff.MULTI_RATE), comms_hub(), True, ResponseCode.FLAG_MULTI_RATE_TARIFF),
        (esme(tariff=Tariff.ECONOMY7), comms_hub(), True, ResponseCode.FLAG_MULTI_RATE_TARIFF),
        (esme(tariff=Tariff.RTS), comms_hub(), True, ResponseCode.FLAG_RADIO_TELESWITCH),
        (esme(wan=False), comms_hub(), True, ResponseCode.FLAG_NO_WAN),
        (esme(), comms_hub(), False, ResponseCode.FLAG_DECLARATION_MISSING),
        (esme(device_type=DeviceType.PPMID), comms_hub(), True, ResponseCode.FLAG_DEVICE_TYPE),
    ],
)
def test_refusals_leave_the_flag_and_are_recorded_with_their_code(
    desk: Desk, ask: FlagCounter, meter: DeviceRecord, hub: DeviceRecord, declared: bool, code: ResponseCode
) -> None:
    desk.upsert(meter, hub)
    verdict = ask(IMPORT_SUPPLIER, set_flag=True, declared=declared)
    assert (verdict.accepted, verdict.code) == (False, code)
    assert desk.agree() == frozenset()
    assert outcomes(desk) == [("set", IMPORT_SUPPLIER, code.value)]


def test_an_unknown_device_is_refused_by_the_rules_before_the_flag_checks(
    desk: Desk, ask: FlagCounter
) -> None:
    unknown = Eui("00-DB-12-00-00-00-00-A0")
    assert ask(IMPORT_SUPPLIER, unknown, set_flag=True).code == ResponseCode.UNKNOWN_DEVICE
    assert outcomes(desk, unknown) == []  # no device, no flag history: the decision is in the outcomes


def test_repeats_are_accepted_unchanged_and_recorded(desk: Desk, ask: FlagCounter) -> None:
    first = ask(IMPORT_SUPPLIER, set_flag=False)
    ask(IMPORT_SUPPLIER, set_flag=True)
    again = ask(IMPORT_SUPPLIER, set_flag=True)
    assert (first.accepted, first.changed, again.accepted, again.changed) == (True, False, True, False)
    assert desk.agree() == {METER}
    assert [o for _, _, o in outcomes(desk)] == ["unchanged", "accepted", "unchanged"]


def test_a_set_flag_stays_through_an_exception_and_can_always_be_cleared(
    desk: Desk, ask: FlagCounter
) -> None:
    ask(IMPORT_SUPPLIER, set_flag=True)
    desk.upsert(esme(tariff=Tariff.RTS, wan=False))  # the site became an exception later
    assert desk.agree() == {METER}
    assert ask(IMPORT_SUPPLIER, set_flag=False).changed
    assert desk.agree() == frozenset()


def test_change_of_supplier_moves_responsibility_never_the_flag(desk: Desk, ask: FlagCounter) -> None:
    ask(IMPORT_SUPPLIER, set_flag=True)
    desk.upsert(esme(import_supplier=NEW_SUPPLIER))
    desk.restart()
    assert desk.agree() == {METER}
    record = desk.router.view.device(METER)
    assert record is not None
    assert responsible_supplier(record) == NEW_SUPPLIER
    assert ask(IMPORT_SUPPLIER, set_flag=False).code == ResponseCode.NOT_RESPONSIBLE_SUPPLIER
    assert desk.agree() == {METER}
    assert ask(NEW_SUPPLIER, set_flag=False).changed
    assert desk.agree() == frozenset()


def test_change_of_tenancy_clears_and_sets_again_keeping_the_history(desk: Desk, ask: FlagCounter) -> None:
    ask(IMPORT_SUPPLIER, set_flag=True, reference="tenant-1")
    ask(IMPORT_SUPPLIER, set_flag=False)  # the old occupant moved out
    ask(IMPORT_SUPPLIER, set_flag=True, reference="tenant-2")  # the new one asks too
    desk.restart()
    assert desk.agree() == {METER}
    assert [(e.set, e.consumer_reference, e.outcome) for e in desk.durable.history] == [
        (True, "tenant-1", "accepted"),
        (False, None, "accepted"),
        (True, "tenant-2", "accepted"),
    ]


@pytest.mark.parametrize("set_it", [True, False], ids=["set", "clear"])
def test_a_crash_between_commit_and_answer_leaves_view_and_store_agreeing(
    desk: Desk, ask: FlagCounter, set_it: bool
) -> None:
    if not set_it:
        ask(IMPORT_SUPPLIER, set_flag=True)
    ask(IMPORT_SUPPLIER, set_flag=set_it, crash=True)
    assert desk.agree() == ({METER} if set_it else frozenset())
    assert desk.durable.counters[IMPORT_SUPPLIER] == len(desk.durable.history)


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
        self.inventory = {record.device_id: record for record in premise()}
        self.desk = Desk(Durable.of(self.inventory.values()))
        self.ask = FlagCounter(self.desk)
        self.flagged: set[Eui] = set()
        self.requests = 0

    def allowed(self, requester: Eui, device_id: Eui, *, set_it: bool, declared: bool) -> bool:
        device = self.inventory.get(device_id)
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
        if set_it:
            return ready and declared and device.tariff is Tariff.SINGLE and device.wan
        return ready

    @rule(
        requester=st.sampled_from(REQUESTERS),
        device=st.sampled_from(DEVICES),
        set_it=st.booleans(),
        declared=st.booleans(),
        crash=st.booleans(),
    )
    def request(self, requester: Eui, device: Eui, set_it: bool, declared: bool, crash: bool) -> None:
        verdict = self.ask(requester, device, set_flag=set_it, declared=declared, crash=crash)
        self.requests += device in self.inventory  # an unknown device is refused before the flag checks
        assert verdict.accepted == self.allowed(requester, device, set_it=set_it, declared=declared)
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
        self.desk.upsert(record)

    @rule(device=st.sampled_from([METER, GAS_METER]))
    def change_of_tenancy(self, device: Eui) -> None:
        """The responsible supplier clears the flag for the old occupant and sets it for the new one."""
        supplier = responsible_supplier(self.inventory[device])
        if supplier is None:
            return
        self.request(supplier, device, set_it=False, declared=False, crash=False)
        self.request(supplier, device, set_it=True, declared=True, crash=False)

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
        self.desk.upsert(record)

    @rule()
    def restart(self) -> None:
        self.desk.restart()

    @invariant()
    def view_store_and_model_agree(self) -> None:
        assert self.desk.agree() == self.flagged
        for device in self.inventory:
            facts = self.desk.router.view.device_facts(device)
            assert facts is not None
            assert facts.flagged == (device in self.flagged)

    @invariant()
    def every_request_is_in_the_history(self) -> None:
        assert len(self.desk.durable.history) == self.requests


FlagLives.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestFlagLives = FlagLives.TestCase
