"""decide() and decide_device_message(): each branch, the real samples, and the MP169 properties."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from gateway.duis import parse_request
from rules.codes import ResponseCode
from rules.decide import (
    Action,
    Decision,
    Delivery,
    DeviceFacts,
    RequestFacts,
    decide,
    decide_device_message,
)
from rules.domain import (
    MAX_COUNTER,
    NO_PARTIES,
    DeviceMessage,
    DeviceMessageKind,
    DeviceParties,
    DeviceStatus,
    DeviceType,
    Eui,
    RequestId,
    Role,
    ServiceRequest,
    int_to_eui,
)
from rules.table import ALWAYS_FLOWING, Category, RulesTable, default_table
from tests.test_samples import SAMPLE_DEVICE_TYPES

TABLE = default_table()
DCC = Eui("90-B3-D5-1F-30-00-00-02")
SUPPLIER = Eui("90-B3-D5-1F-30-01-00-00")
METER = Eui("00-DB-12-34-56-78-90-A0")
NEIGHBOUR = Eui("00-DB-12-34-56-78-90-B0")
SAMPLES = Path(__file__).parents[2] / "rules"
ALL_ROLES = frozenset(Role)

SECURITY_CREDENTIAL_SRVS = {"6.15.1", "6.15.2", "6.17", "6.21", "6.23", "6.24.1", "6.24.2"}
FIRMWARE_SRVS = {"11.1", "11.2", "11.3", "11.4"}
SUPPLY_SRVS = {srv for srv in TABLE.srvs if srv.startswith("7.")}
SAFETY_SRVS = {srv for srv, rule in TABLE.srvs.items() if rule.category is Category.SAFETY}
NEVER_REFUSED = SECURITY_CREDENTIAL_SRVS | FIRMWARE_SRVS | SUPPLY_SRVS | SAFETY_SRVS


REGISTERED = DeviceParties(SUPPLIER, SUPPLIER, SUPPLIER, SUPPLIER, SUPPLIER)
"""SUPPLIER is registered for the device in every role that has a relationship."""


def device(
    eui: Eui = METER,
    *,
    flagged: bool = False,
    status: DeviceStatus = DeviceStatus.COMMISSIONED,
    device_type: DeviceType = DeviceType.ESME,
    parties: DeviceParties = REGISTERED,
) -> DeviceFacts:
    return DeviceFacts(eui, device_type, 2, status, parties, eui if flagged else None)


def facts(*devices: DeviceFacts, roles: frozenset[Role] | None = ALL_ROLES) -> RequestFacts:
    return RequestFacts(requester_roles=roles, devices={d.device_id: d for d in devices}, dcc_eui=DCC)


def request(
    srv: str,
    *,
    devices: tuple[Eui, ...] = (METER,),
    command_variant: int | None = None,
    target: Eui | None = None,
    scheduled_srv: str | None = None,
    counter: int = 1000,
    service_reference: str | None = None,
) -> ServiceRequest:
    """A Service Request as the parser gives it, valid for the SRV unless told otherwise."""
    rule = TABLE.srvs.get(srv)
    non_device = rule is None or rule.non_device
    if command_variant is None:
        command_variant = 8 if non_device else 4 if rule is not None and rule.critical else 1
    if target is None:
        target = DCC if non_device else devices[0]
    return ServiceRequest(
        request_id=RequestId(SUPPLIER, target, counter),
        command_variant=command_variant,
        service_reference=service_reference or (rule.service_reference if rule else srv.rsplit(".", 1)[0]),
        srv=srv,
        body_element="Body",
        concerned_devices=devices if non_device else (target,),
        scheduled_srv=scheduled_srv,
    )


def assert_decision(decision: Decision, action: Action, code: ResponseCode, reason: str) -> None:
    assert (decision.action, decision.response_code, decision.reason) == (action, code, reason), decision
    assert decision.detail


# -- branches, in decide()'s order ------------------------------------------------------------------


def test_unknown_srv_is_rejected():
    decision = decide(request("4.99"), facts(device()), TABLE)
    assert_decision(decision, Action.REJECT, ResponseCode.UNKNOWN_SRV, "unknown-srv")
    assert decision.rule is None


def test_service_reference_must_belong_to_the_srv():
    decision = decide(request("4.8.1", service_reference="4.6"), facts(device()), TABLE)
    assert_decision(decision, Action.REJECT, ResponseCode.UNKNOWN_SRV, "service-reference")
    assert decision.rule is TABLE.srvs["4.8.1"]


@pytest.mark.parametrize(
    ("srv", "variant", "target"),
    [
        ("8.2", 1, None),  # non-device with a device CommandVariant
        ("11.1", 4, None),
        ("7.1", 1, None),  # critical with a non-critical CommandVariant
        ("7.1", 8, None),
        ("4.8.1", 4, None),  # non-critical with a critical CommandVariant
        ("4.8.1", 8, None),
        ("4.8.1", 0, None),
        ("4.8.1", 9, None),
    ],
)
def test_command_variant_must_fit_the_srv(srv, variant, target):
    decision = decide(request(srv, command_variant=variant, target=target), facts(device()), TABLE)
    assert_decision(decision, Action.REJECT, ResponseCode.COMMAND_VARIANT_NOT_APPLICABLE, "command-variant")


def test_non_device_request_must_be_addressed_to_the_dcc():
    decision = decide(request("8.2", command_variant=8, target=METER), facts(device()), TABLE)
    assert_decision(decision, Action.REJECT, ResponseCode.NON_DEVICE_TARGET, "non-device-target")


@pytest.mark.parametrize(("srv", "variants"), [("7.1", (4, 5, 6, 7)), ("4.11.1", (1, 2, 3)), ("8.4", (8,))])
def test_valid_command_variants_pass(srv, variants):
    for variant in variants:
        assert decide(request(srv, command_variant=variant), facts(device()), TABLE).action is Action.FORWARD


def test_unknown_user_is_rejected():
    decision = decide(request("4.11.1"), facts(device(), roles=frozenset()), TABLE)
    assert_decision(decision, Action.REJECT, ResponseCode.USER_NOT_AUTHORISED, "unknown-user")


def test_ineligible_role_is_rejected():
    decision = decide(request("4.2"), facts(device(), roles=frozenset({Role.GAS_SUPPLIER})), TABLE)
    assert_decision(decision, Action.REJECT, ResponseCode.ROLE_NOT_ELIGIBLE, "role-not-eligible")


def test_one_eligible_role_is_enough_and_none_means_unchecked():
    roles = frozenset({Role.GAS_SUPPLIER, Role.EXPORT_SUPPLIER})
    assert decide(request("4.2"), facts(device(), roles=roles), TABLE).action is Action.FORWARD
    # 7.16: the matrix gives no eligible role; only an offline check (roles None) lets it pass.
    assert decide(request("7.16"), facts(device()), TABLE).reason == "role-not-eligible"
    assert decide(request("7.16"), facts(device(), roles=None), TABLE).action is Action.FORWARD


def test_unknown_device_is_rejected():
    decision = decide(request("11.1", devices=(METER, NEIGHBOUR)), facts(device()), TABLE)
    assert_decision(decision, Action.REJECT, ResponseCode.UNKNOWN_DEVICE, "unknown-device")
    assert NEIGHBOUR in decision.detail


@pytest.mark.parametrize("status", [DeviceStatus.DECOMMISSIONED, DeviceStatus.WITHDRAWN])
def test_inactive_device_is_rejected(status):
    decision = decide(request("4.11.1"), facts(device(status=status)), TABLE)
    assert_decision(decision, Action.REJECT, ResponseCode.DEVICE_STATUS_INVALID, "device-status")


@pytest.mark.parametrize(
    "status", sorted(set(DeviceStatus) - {DeviceStatus.DECOMMISSIONED, DeviceStatus.WITHDRAWN})
)
def test_other_statuses_are_forwarded(status):
    assert decide(request("4.11.1"), facts(device(status=status)), TABLE).action is Action.FORWARD


@pytest.mark.parametrize("srv", ["8.15.1", "8.15.2"])
@pytest.mark.parametrize("flagged", [False, True])
def test_flag_requests_are_handled_locally(srv, flagged):
    decision = decide(request(srv), facts(device(flagged=flagged)), TABLE)
    assert_decision(decision, Action.LOCAL, ResponseCode.SUCCESS, "flag-request")
    assert decision.rule is TABLE.srvs[srv]


@pytest.mark.parametrize("flagged", [False, True])
def test_read_inventory_is_handled_locally(flagged):
    decision = decide(request("8.2"), facts(device(flagged=flagged)), TABLE)
    assert_decision(decision, Action.LOCAL, ResponseCode.SUCCESS, "read-inventory")


def test_consumption_read_of_a_flagged_device_is_refused():
    decision = decide(request("4.8.1"), facts(device(flagged=True)), TABLE)
    assert_decision(decision, Action.REFUSE, ResponseCode.CONSUMER_CHOICE, "consumer-choice")
    assert decision.rule is TABLE.srvs["4.8.1"]
    assert METER in decision.detail


def test_consumption_read_of_an_unflagged_device_is_forwarded():
    decision = decide(request("4.8.1"), facts(device()), TABLE)
    assert_decision(decision, Action.FORWARD, ResponseCode.ACKNOWLEDGED, "forwarded")
    assert decision.rule is TABLE.srvs["4.8.1"]


def test_a_forward_decision_names_the_rule_of_the_table_it_was_decided_with():
    # Forward decisions are made once per SRV; one from another table is never handed out.
    rule = dataclasses.replace(TABLE.srvs["4.8.1"], rationale="Another table's reason.")
    other = RulesTable({**TABLE.srvs, "4.8.1": rule}, TABLE.alerts)
    for table in (TABLE, other, TABLE):
        decision = decide(request("4.8.1"), facts(device()), table)
        assert_decision(decision, Action.FORWARD, ResponseCode.ACKNOWLEDGED, "forwarded")
        assert decision.rule is table.srvs["4.8.1"]


def test_create_schedule_of_a_refused_srv_for_a_flagged_device_is_refused():
    decision = decide(request("5.1", scheduled_srv="4.6.1"), facts(device(flagged=True)), TABLE)
    assert_decision(decision, Action.REFUSE, ResponseCode.CONSUMER_CHOICE, "consumer-choice")
    assert decision.rule is TABLE.srvs["5.1"]
    assert decide(request("5.1", scheduled_srv="4.6.1"), facts(device()), TABLE).action is Action.FORWARD
    assert (
        decide(request("5.1", scheduled_srv="11.2"), facts(device(flagged=True)), TABLE).action
        is Action.FORWARD
    )


@pytest.mark.parametrize("scheduled", ["4.99", None])
def test_create_schedule_of_an_unknown_srv_is_rejected(scheduled):
    decision = decide(request("5.1", scheduled_srv=scheduled), facts(device()), TABLE)
    assert_decision(decision, Action.REJECT, ResponseCode.UNKNOWN_SRV, "unknown-srv")


def test_non_device_request_without_devices_is_forwarded():
    assert decide(request("12.1", devices=()), facts(), TABLE).action is Action.FORWARD


# -- the real samples ---------------------------------------------------------------------------------


def _samples() -> list[ServiceRequest]:
    paths = sorted((SAMPLES / "duis" / "requests").glob("*.XML")) + sorted(
        (SAMPLES / "mp169-requests").glob("*.XML")
    )
    parsed = [parse_request(path.read_bytes()) for path in paths]
    assert all(isinstance(item, ServiceRequest) for item in parsed)
    return [item for item in parsed if isinstance(item, ServiceRequest)]


def _sample_facts(sample: ServiceRequest, *, flagged: bool) -> RequestFacts:
    rule = TABLE.srvs[sample.srv]
    user = sample.request_id.originator
    registered = DeviceParties(user, user, user, user, user)
    return facts(
        *(
            device(eui, flagged=flagged, device_type=SAMPLE_DEVICE_TYPES[eui[-2:]], parties=registered)
            for eui in sample.concerned_devices
        ),
        roles=rule.eligible_roles or None,
    )


def test_every_real_sample_passes_the_checks_and_is_routed_as_the_table_says():
    samples = _samples()
    assert {sample.srv for sample in samples} == set(TABLE.srvs)
    for sample in samples:
        unflagged = decide(sample, _sample_facts(sample, flagged=False), TABLE)
        flagged = decide(sample, _sample_facts(sample, flagged=True), TABLE)
        if sample.srv in {"8.2", "8.15.1", "8.15.2"}:
            assert unflagged.action is flagged.action is Action.LOCAL
            continue
        assert unflagged.action is Action.FORWARD, (sample.srv, unflagged)
        scheduled = TABLE.srvs[sample.scheduled_srv] if sample.scheduled_srv else None
        refused = TABLE.srvs[sample.srv].refused_when_flagged or (
            scheduled is not None and scheduled.refused_when_flagged
        )
        assert flagged.action is (Action.REFUSE if refused else Action.FORWARD), (sample.srv, flagged)


# -- properties ---------------------------------------------------------------------------------------

euis = st.sampled_from([int_to_eui(0x00DB_1200_0000_0000 + n) for n in range(6)])
device_facts = st.builds(
    DeviceFacts,
    device_id=euis,
    device_type=st.sampled_from(DeviceType),
    smets=st.sampled_from([1, 2]),
    status=st.sampled_from(DeviceStatus),
    parties=st.sampled_from([REGISTERED, NO_PARTIES]),
)
role_sets = st.none() | st.frozensets(st.sampled_from(Role))


ALL_SRVS = st.sampled_from(sorted(TABLE.srvs))
REFUSED_SRVS = sorted(srv for srv, rule in TABLE.srvs.items() if rule.refused_when_flagged)


@st.composite
def scenarios(
    draw: st.DrawFn,
    srvs: st.SearchStrategy[str] = ALL_SRVS,
    scheduled_srvs: st.SearchStrategy[str] = ALL_SRVS,
    *,
    one_flagged: bool = False,
) -> tuple[ServiceRequest, RequestFacts]:
    """A Service Request for any SRV, with any CommandVariant and counter, and facts about its devices.

    one_flagged: at least one device the request concerns is known and flagged.
    """
    srv = draw(srvs)
    rule = TABLE.srvs[srv]
    smallest = 1 if one_flagged or not rule.non_device else 0
    concerned = tuple(draw(st.lists(euis, min_size=smallest, max_size=3, unique=True)))
    target = DCC if rule.non_device and draw(st.booleans()) else draw(euis)
    originator = draw(st.sampled_from([SUPPLIER, NEIGHBOUR]))
    sample = ServiceRequest(
        request_id=RequestId(originator, target, draw(st.integers(0, MAX_COUNTER))),
        command_variant=draw(st.integers(1, 8)),
        service_reference=rule.service_reference,
        srv=srv,
        body_element="Body",
        concerned_devices=concerned if rule.non_device else (target,),
        scheduled_srv=draw(scheduled_srvs) if srv == "5.1" else None,
    )
    known = {}
    for eui in sample.concerned_devices:
        if draw(st.integers(0, 9)):  # mostly known devices
            known[eui] = dataclasses.replace(draw(device_facts), device_id=eui)
    if one_flagged:
        eui = draw(st.sampled_from(sample.concerned_devices))
        known[eui] = dataclasses.replace(draw(device_facts), device_id=eui, flagged_meter=eui)
    return sample, RequestFacts(requester_roles=draw(role_sets), devices=known, dcc_eui=DCC)


@given(scenarios(st.sampled_from(sorted(NEVER_REFUSED))))
def test_firmware_security_supply_and_safety_srvs_are_never_refused(scenario):
    sample, request_facts = scenario
    assert decide(sample, request_facts, TABLE).action is not Action.REFUSE


@given(scenarios(st.sampled_from([*REFUSED_SRVS, "5.1"]), st.sampled_from(REFUSED_SRVS), one_flagged=True))
def test_refused_srv_to_a_flagged_device_is_never_forwarded(scenario):
    sample, request_facts = scenario
    assert decide(sample, request_facts, TABLE).action is not Action.FORWARD


@given(scenarios(), device_facts, st.booleans())
def test_decision_never_depends_on_another_devices_facts(scenario, other, present):
    sample, request_facts = scenario
    assume(other.device_id not in sample.concerned_devices)
    devices = dict(request_facts.devices)
    if present:
        devices[other.device_id] = other
    with_other = dataclasses.replace(request_facts, devices=devices)
    flipped = dict(devices)
    flipped[other.device_id] = dataclasses.replace(
        other, flagged_meter=None if other.flagged else other.device_id
    )
    assert decide(sample, request_facts, TABLE) == decide(sample, with_other, TABLE)
    assert decide(sample, with_other, TABLE) == decide(
        sample, dataclasses.replace(request_facts, devices=flipped), TABLE
    )


@given(scenarios())
def test_decide_is_deterministic(scenario):
    sample, request_facts = scenario
    copy = dataclasses.replace(request_facts, devices=dict(request_facts.devices))
    assert decide(sample, request_facts, TABLE) == decide(dataclasses.replace(sample), copy, TABLE)


@given(
    st.lists(euis, min_size=1, max_size=5, unique=True),
    st.lists(st.booleans(), min_size=5, max_size=5),
    st.integers(0, MAX_COUNTER),
)
def test_firmware_update_to_flagged_devices_is_forwarded(devices, flags, counter):
    sample = request("11.1", devices=tuple(devices), counter=counter)
    request_facts = facts(*(device(eui, flagged=flag) for eui, flag in zip(devices, flags, strict=False)))
    assert decide(sample, request_facts, TABLE).action is Action.FORWARD


@given(
    st.integers(0, MAX_COUNTER),
    role_sets.filter(lambda roles: roles is None or Role.IMPORT_SUPPLIER in roles),
)
def test_schedules_for_a_flagged_device(counter, roles):
    flagged = facts(device(flagged=True), roles=roles)
    refused = decide(request("5.1", scheduled_srv="4.6.1", counter=counter), flagged, TABLE)
    assert refused.action is Action.REFUSE
    assert refused.response_code is ResponseCode.CONSUMER_CHOICE
    assert (
        decide(request("5.1", scheduled_srv="11.2", counter=counter), flagged, TABLE).action is Action.FORWARD
    )


# -- device responses and alerts ----------------------------------------------------------------------


def alert(code: str | None, kind: DeviceMessageKind = DeviceMessageKind.DEVICE_ALERT) -> DeviceMessage:
    return DeviceMessage(kind=kind, response_code="I0", request_id=None, srv=None, alert_code=code)


def response(srv: str | None, *, scheduled: bool = False) -> DeviceMessage:
    return DeviceMessage(
        kind=DeviceMessageKind.RESPONSE,
        response_code="I0",
        request_id=RequestId(SUPPLIER, METER, 1000),
        srv=srv,
        alert_code=None,
        scheduled=scheduled,
    )


def _kind(code: str) -> DeviceMessageKind:
    return DeviceMessageKind.DCC_ALERT if code[0] in "AN" else DeviceMessageKind.DEVICE_ALERT


@given(st.booleans())
def test_billing_data_log_alert_is_redacted_only_when_flagged(flagged):
    verdict = decide_device_message(alert("8F0A"), device(flagged=flagged), TABLE)
    assert verdict.delivery is (Delivery.REDACT if flagged else Delivery.DELIVER)
    assert verdict.reason == ("consumer-choice-redacted" if flagged else "delivered")
    assert verdict.category is Category.BILLING


@given(
    st.sampled_from(sorted(code for code, rule in TABLE.alerts.items() if rule.category in ALWAYS_FLOWING)),
    st.booleans(),
)
def test_protected_alerts_are_always_delivered(code, flagged):
    verdict = decide_device_message(alert(code, _kind(code)), device(flagged=flagged), TABLE)
    assert verdict.delivery is Delivery.DELIVER
    assert verdict.category in ALWAYS_FLOWING


@given(st.sampled_from(sorted(TABLE.alerts)), st.booleans())
def test_alerts_are_withheld_exactly_as_the_table_says(code, flagged):
    rule = TABLE.alerts[code]
    verdict = decide_device_message(alert(code, _kind(code)), device(flagged=flagged), TABLE)
    expected = Delivery.DELIVER
    if flagged and rule.withheld_when_flagged:
        expected = Delivery.WITHHOLD
    elif flagged and rule.redacted_when_flagged:
        expected = Delivery.REDACT
    assert verdict.delivery is expected
    assert verdict.notify_network_operator is (
        verdict.delivery is not Delivery.WITHHOLD and rule.notify_network_operator
    )


def test_power_outage_alerts_notify_the_network_operator():
    for code in ("8F35", "8F3C"):
        assert decide_device_message(alert(code), device(flagged=True), TABLE).notify_network_operator
    dcc = decide_device_message(alert("AD1", DeviceMessageKind.DCC_ALERT), device(flagged=True), TABLE)
    assert dcc.delivery is Delivery.DELIVER
    assert dcc.category is Category.POWER_OUTAGE
    assert dcc.notify_network_operator


@given(st.text("0123456789ABCDEFN", min_size=1, max_size=5), st.booleans())
def test_unknown_alert_codes_are_rejected(code, flagged):
    assume(code not in TABLE.alerts)
    for kind in (DeviceMessageKind.DEVICE_ALERT, DeviceMessageKind.DCC_ALERT):
        verdict = decide_device_message(alert(code, kind), device(flagged=flagged), TABLE)
        assert verdict.delivery is Delivery.REJECT
        assert verdict.reason == "unknown-alert-code"
        assert verdict.category is None


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (None, DeviceMessageKind.DEVICE_ALERT),
        ("AD1", DeviceMessageKind.DEVICE_ALERT),
        ("8F35", DeviceMessageKind.DCC_ALERT),
    ],
)
def test_alert_code_must_fit_the_alert_kind(code, kind):
    verdict = decide_device_message(alert(code, kind), device(), TABLE)
    assert (verdict.delivery, verdict.reason) == (Delivery.REJECT, "unknown-alert-code")


def test_lower_case_alert_code_is_understood():
    assert decide_device_message(alert("8f0a"), device(flagged=True), TABLE).delivery is Delivery.REDACT


@given(st.sampled_from(sorted(TABLE.srvs)), st.booleans(), st.booleans())
def test_responses_are_withheld_exactly_for_refused_srvs_from_flagged_devices(srv, flagged, scheduled):
    verdict = decide_device_message(response(srv, scheduled=scheduled), device(flagged=flagged), TABLE)
    withheld = flagged and TABLE.srvs[srv].refused_when_flagged
    assert verdict.delivery is (Delivery.WITHHOLD if withheld else Delivery.DELIVER)
    assert verdict.category is TABLE.srvs[srv].category
    assert not verdict.notify_network_operator


def test_scheduled_daily_read_from_a_flagged_device_is_withheld():
    verdict = decide_device_message(response("4.6.1", scheduled=True), device(flagged=True), TABLE)
    assert (verdict.delivery, verdict.reason) == (Delivery.WITHHOLD, "consumer-choice")


@pytest.mark.parametrize("srv", ["4.99", None])
def test_response_for_an_unknown_srv_is_rejected(srv):
    verdict = decide_device_message(response(srv), device(), TABLE)
    assert (verdict.delivery, verdict.reason) == (Delivery.REJECT, "unknown-srv")


def test_response_from_a_device_not_in_the_inventory_is_delivered():
    assert decide_device_message(response("4.6.1"), None, TABLE).delivery is Delivery.DELIVER
