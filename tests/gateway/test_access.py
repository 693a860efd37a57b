"""DCC access control and MP169 coverage over generated estates: the routing view, the facts gathered
from it and the decision, together (no broker, no store)."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.facts import alert_recipients, inventory_entries, request_facts
from gateway.view import RoutingView
from rules.codes import ResponseCode
from rules.decide import Action, Delivery, MessageDecision, decide, decide_device_message
from rules.domain import (
    DCC_EUI,
    DeviceMessage,
    DeviceMessageKind,
    DeviceRecord,
    DeviceType,
    Eui,
    RequestId,
    Role,
    ServiceRequest,
    device_parties,
)
from rules.table import default_table
from simulator.estate import Estate, generate_estate

TABLE = default_table()
CONSUMPTION_SRVS = sorted(srv for srv, rule in TABLE.srvs.items() if rule.refused_when_flagged)
METERS = frozenset({DeviceType.ESME, DeviceType.GSME})
SUPPLIER_ROLES = frozenset({Role.IMPORT_SUPPLIER, Role.EXPORT_SUPPLIER, Role.GAS_SUPPLIER})
RELATIONSHIP_SRVS = sorted(srv for srv, rule in TABLE.srvs.items() if rule.device_relationship)


@cache
def estate(seed: int) -> Estate:
    return generate_estate(seed, 12)


def view_of(estate: Estate) -> RoutingView:
    view = RoutingView()
    view.apply_devices(estate.devices)
    view.apply_users(estate.users)
    return view


def addressed(srv: str, user: Eui, device: Eui, scheduled_srv: str | None = None) -> ServiceRequest:
    """`srv` from `user` about `device` (the RequestID target, or the Body's device), well formed."""
    rule = TABLE.srvs[srv]
    return ServiceRequest(
        request_id=RequestId(user, DCC_EUI if rule.non_device else device, 1),
        command_variant=8 if rule.non_device else 4 if rule.critical else 1,
        service_reference=rule.service_reference,
        srv=srv,
        body_element="Body",
        concerned_devices=(device,),
        scheduled_srv=scheduled_srv,
    )


def whose_data(device: DeviceRecord, estate: Estate) -> Eui | None:
    """The meter whose consumption data `device` returns, from the inventory rows themselves."""
    if device.device_type in METERS:
        return device.device_id
    if device.device_type is DeviceType.GPF:
        return next(
            (
                other.device_id
                for other in estate.devices
                if other.device_type is DeviceType.GSME and other.comms_hub_id == device.comms_hub_id
            ),
            None,
        )
    return None


seeds = st.integers(0, 2**16)


@settings(max_examples=60)
@given(seeds, st.data())
def test_any_consumption_srv_to_any_device_of_a_premises_whose_meters_are_flagged_is_refused(
    seed: int, data: st.DataObject
) -> None:
    generated = estate(seed)
    view = view_of(generated)
    hub = data.draw(st.sampled_from([d for d in generated.devices if d.device_type is DeviceType.CHF]))
    premises = view.premises(hub.device_id)
    records = {d.device_id: d for d in generated.devices}
    assert set(premises) == {hub.device_id} | {
        d.device_id for d in generated.devices if d.comms_hub_id == hub.device_id
    }
    for eui in premises:
        if records[eui].device_type in METERS:
            view.set_flag(eui)
    device = data.draw(st.sampled_from(premises))
    srv = data.draw(st.sampled_from([*CONSUMPTION_SRVS, "5.1"]))
    user = data.draw(st.sampled_from(generated.users)).user_id
    scheduled = data.draw(st.sampled_from(CONSUMPTION_SRVS)) if srv == "5.1" else None
    request = addressed(srv, user, device, scheduled)
    decision = decide(request, request_facts(request, view, DCC_EUI), TABLE)
    assert decision.action is not Action.FORWARD, decision
    if decision.action is Action.REFUSE:
        assert decision.response_code is ResponseCode.CONSUMER_CHOICE


@settings(max_examples=60)
@given(seeds, st.data())
def test_a_consumption_read_of_a_flagged_meters_data_is_refused_wherever_it_is_read_from(
    seed: int, data: st.DataObject
) -> None:
    generated = estate(seed)
    view = view_of(generated)
    meter = data.draw(st.sampled_from([d for d in generated.devices if d.device_type in METERS]))
    view.set_flag(meter.device_id)
    holders = [d for d in generated.devices if whose_data(d, generated) == meter.device_id]
    assert meter in holders
    device = data.draw(st.sampled_from(holders))
    srv = data.draw(
        st.sampled_from([s for s in CONSUMPTION_SRVS if device.device_type in TABLE.srvs[s].device_types])
    )
    rule = TABLE.srvs[srv]
    parties = device_parties(device)
    users = [
        u.user_id
        for u in generated.users
        if any(parties.registered(u.user_id, role) for role in u.roles & rule.eligible_roles)
    ]
    if not users:
        return
    request = addressed(srv, data.draw(st.sampled_from(users)), device.device_id)
    facts = request_facts(request, view, DCC_EUI)
    decision = decide(request, facts, TABLE)
    if device.status.value in {"Decommissioned", "Withdrawn"}:
        assert decision.response_code is ResponseCode.DEVICE_STATUS_INVALID
        return
    assert (decision.action, decision.response_code) == (Action.REFUSE, ResponseCode.CONSUMER_CHOICE)
    assert meter.device_id in decision.detail
    # ... and its answer, should one arrive (a late answer, a DCC-scheduled execution), is withheld.
    answer = DeviceMessage(DeviceMessageKind.RESPONSE, "I0", request.request_id, srv, None)
    assert decide_device_message(answer, facts.devices[device.device_id], TABLE).delivery is Delivery.WITHHOLD


@settings(max_examples=60)
@given(seeds, st.data())
def test_a_supplier_not_registered_for_a_device_gets_e4_for_every_srv_that_needs_a_relationship(
    seed: int, data: st.DataObject
) -> None:
    generated = estate(seed)
    view = view_of(generated)
    device = data.draw(st.sampled_from(generated.devices))
    parties = device_parties(device)
    strangers = [
        user
        for user in generated.users
        if user.roles <= SUPPLIER_ROLES and not any(parties.registered(user.user_id, r) for r in user.roles)
    ]
    user = data.draw(st.sampled_from(strangers))
    tried = 0
    for srv in RELATIONSHIP_SRVS:
        if user.roles.isdisjoint(TABLE.srvs[srv].eligible_roles):
            continue
        request = addressed(srv, user.user_id, device.device_id, "11.2" if srv == "5.1" else None)
        decision = decide(request, request_facts(request, view, DCC_EUI), TABLE)
        assert decision.action is not Action.FORWARD, (srv, decision)
        assert decision.response_code is ResponseCode.DEVICE_NOT_AUTHORISED, (srv, decision)
        tried += 1
    assert tried > 0


def _premises_with_gas(generated: Estate) -> tuple[DeviceRecord, DeviceRecord, DeviceRecord]:
    """(comms hub, GSME, GPF) of a gas premises."""
    gsme = next(d for d in generated.devices if d.device_type is DeviceType.GSME)
    hub = next(d for d in generated.devices if d.device_id == gsme.comms_hub_id)
    gpf = next(
        d for d in generated.devices if d.device_type is DeviceType.GPF and d.comms_hub_id == hub.device_id
    )
    return hub, gsme, gpf


def test_read_inventory_lists_the_premises_and_shows_the_flag_only_to_registered_users() -> None:
    generated = estate(1)
    view = view_of(generated)
    hub, gsme, gpf = _premises_with_gas(generated)
    at = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
    view.set_flag(gsme.device_id, at)
    assert gsme.gas_supplier is not None
    other_user = next(u.user_id for u in generated.users if Role.OTHER_USER in u.roles)
    for user, shown in ((gsme.gas_supplier, True), (other_user, False)):
        entries = inventory_entries(addressed("8.2", user, gpf.device_id), view)
        listed = {entry.device_id: entry for entry in entries}
        assert set(listed) == {
            d.device_id for d in generated.devices if hub.device_id in {d.device_id, d.comms_hub_id}
        }
        assert entries[0].device_id == hub.device_id
        flag = listed[gsme.device_id]
        if shown:
            assert (flag.reduced_communications, flag.flag_set_at) == (True, at.isoformat())
        else:
            assert (flag.reduced_communications, flag.flag_set_at) == (None, None)
        assert shown or all(entry.reduced_communications is None for entry in entries)


def test_alerts_go_to_the_requests_user_or_by_device_type() -> None:
    generated = estate(1)
    view = view_of(generated)
    hub, gsme, gpf = _premises_with_gas(generated)
    delivered = MessageDecision(Delivery.DELIVER, "delivered", "", None, notify_network_operator=False)
    distributor = next(u.user_id for u in generated.users if Role.ELECTRICITY_DISTRIBUTOR in u.roles)
    # A future-dated command's outcome goes to the user whose RequestID it carries, whoever that is.
    future = DeviceMessage(
        DeviceMessageKind.DEVICE_ALERT, "I0", RequestId(distributor, gsme.device_id, 7), None, "8F66"
    )
    assert alert_recipients(gsme.device_id, future, delivered, view) == (distributor,)
    # ... but never for a RequestID that is not this device's, or an unknown user's.
    assert alert_recipients(gpf.device_id, future, delivered, view) == ()
    stranger = DeviceMessage(
        DeviceMessageKind.DEVICE_ALERT,
        "I0",
        RequestId(Eui("90-B3-D5-1F-30-09-09-09"), gsme.device_id, 7),
        None,
        "8F66",
    )
    assert alert_recipients(gsme.device_id, stranger, delivered, view) == ()
    unsolicited = DeviceMessage(DeviceMessageKind.DEVICE_ALERT, "I0", None, None, "8F1C")
    assert alert_recipients(gpf.device_id, unsolicited, delivered, view) == (gpf.gas_supplier,)
    assert set(alert_recipients(hub.device_id, unsolicited, delivered, view)) == {
        hub.import_supplier,
        hub.gas_supplier,
    }
    outage = MessageDecision(Delivery.DELIVER, "delivered", "", None, notify_network_operator=True)
    esme = next(
        d for d in generated.devices if d.device_type is DeviceType.ESME and d.comms_hub_id == hub.device_id
    )
    assert alert_recipients(esme.device_id, unsolicited, outage, view) == (
        esme.import_supplier,
        esme.network_operator,
    )
