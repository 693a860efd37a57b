"""Every SRV x device type against the DUIS SRV definitions: E11 exactly where DUIS says so.

The compatibility is written out here, grouped as docs/rules.md derives it ("SRV x device type"), on
purpose rather than read from the rules table it checks.
"""

from __future__ import annotations

import pytest

from rules.codes import ResponseCode
from rules.decide import Action, DeviceFacts, RequestFacts, decide
from rules.domain import DeviceParties, DeviceStatus, DeviceType, Eui, RequestId, ServiceRequest
from rules.table import default_table

TABLE = default_table()
DCC = Eui("90-B3-D5-1F-30-00-00-02")
USER = Eui("90-B3-D5-1F-30-01-00-00")
DEVICE = Eui("00-DB-12-34-56-78-90-00")
E, G, C, P, PP, H = (DeviceType[name] for name in ("ESME", "GSME", "CHF", "GPF", "PPMID", "HCALCS"))
EVERY = frozenset(DeviceType)
HAN_DEVICES = frozenset({E, G, C, P, PP, H})
"""The devices with an identity, firmware and event log of their own (an IHD, a type 2 device, has none)."""

_GROUPS: tuple[tuple[str, frozenset[DeviceType]], ...] = (
    # Supplier tariff, price, prepayment and display: written to the meter itself.
    ("1.1.1 1.2.1 1.5 1.6 2.1 2.2 2.3 2.5 3.1 3.2 3.4 3.5", frozenset({E, G})),
    ("1.1.2 1.2.2 1.7", frozenset({E})),  # secondary element, block counters: electricity only
    ("3.3 6.2.4 6.13 11.2", HAN_DEVICES),
    # Reads of consumption, prepayment values and logs: an ESME's own, or a gas meter's through its
    # GPF, which holds the GSME's data (the battery-powered GSME is not woken for reads).
    (
        "4.1.1 4.1.2 4.3 4.4.2 4.4.3 4.4.4 4.4.5 4.6.1 4.8.1 4.10 4.11.1 4.13 4.14 4.17 4.18",
        frozenset({E, P}),
    ),
    ("4.1.4", frozenset({P})),  # gas block counters
    ("4.1.3 4.2 4.6.2 4.8.2 4.8.3 4.11.2 4.12.1 4.12.2 4.15 4.16", frozenset({E})),
    ("14.1", frozenset({G, P})),
    ("5.1 5.2 5.3 8.2 8.3 8.4 12.1 12.2 8.15.1 8.15.2", EVERY),
    (
        (
            "6.2.1 6.2.2 6.2.5 6.4.1 6.4.2 6.5 6.12 6.14.1 6.14.2 6.18.1 6.18.2 6.20.2 6.25 6.26 6.27 "
            "7.1 7.5 7.6 7.7 7.8 7.9 7.10 7.11 7.12"
        ),
        frozenset({E}),
    ),
    (
        (
            "6.2.3 6.2.7 6.2.9 6.2.10 6.8 6.11 6.15.1 6.15.2 6.17 6.20.1 6.22 6.23 6.24.1 6.24.2 "
            "7.2 7.3 7.4 8.1.1 8.5 8.6 8.7.1 8.8.1 8.13 9.1"
        ),
        frozenset({E, G}),
    ),
    ("6.2.8 6.6 6.7", frozenset({G})),
    ("6.14.3 7.13 7.14 7.15 7.16", frozenset({E, H})),  # auxiliary proportional controller
    ("6.21 8.9 8.11", frozenset({C, P})),  # the DCC-controlled comms hub functions
    ("6.28 6.29 6.30 6.31 6.32 8.12.1 8.14.1 8.14.2 8.14.3 8.14.4", frozenset({C})),
    ("8.7.2 8.8.2", frozenset({P, PP, H})),
    ("8.12.2", frozenset({P})),
    ("11.1 11.3", frozenset({E, G, C, PP, H})),
    ("11.4", frozenset({PP})),
)
EXPECTED = {srv: types for srvs, types in _GROUPS for srv in srvs.split()}


def test_every_srv_has_its_device_types_written_out_once() -> None:
    assert sorted(EXPECTED) == sorted(TABLE.srvs)
    assert sum(len(srvs.split()) for srvs, _ in _GROUPS) == len(EXPECTED)


@pytest.mark.parametrize("srv", sorted(EXPECTED))
def test_the_table_holds_the_duis_device_types(srv: str) -> None:
    assert TABLE.srvs[srv].device_types == EXPECTED[srv]


def addressed(srv: str, device_type: DeviceType) -> tuple[ServiceRequest, RequestFacts]:
    rule = TABLE.srvs[srv]
    variant = 8 if rule.non_device else 4 if rule.critical else 1
    target = DCC if rule.non_device else DEVICE
    request = ServiceRequest(
        request_id=RequestId(USER, target, 1),
        command_variant=variant,
        service_reference=rule.service_reference,
        srv=srv,
        body_element="Body",
        concerned_devices=(DEVICE,),
        scheduled_srv="11.2" if srv == "5.1" else None,
    )
    device = DeviceFacts(
        DEVICE, device_type, 2, DeviceStatus.COMMISSIONED, DeviceParties(USER, USER, USER, USER, USER)
    )
    return request, RequestFacts(
        requester_roles=rule.eligible_roles or None, devices={DEVICE: device}, dcc_eui=DCC
    )


@pytest.mark.parametrize("device_type", sorted(DeviceType))
@pytest.mark.parametrize("srv", sorted(EXPECTED))
def test_e11_exactly_where_duis_says_the_srv_cannot_address_the_device_type(
    srv: str, device_type: DeviceType
) -> None:
    request, facts = addressed(srv, device_type)
    decision = decide(request, facts, TABLE)
    # 5.1 is checked against its scheduled SRV (11.2 here).
    compatible = device_type in EXPECTED["11.2" if srv == "5.1" else srv]
    if compatible:
        assert decision.action in {Action.FORWARD, Action.LOCAL}, decision
    else:
        assert (decision.action, decision.response_code) == (
            Action.REJECT,
            ResponseCode.DEVICE_TYPE_INCOMPATIBLE,
        ), decision
        assert decision.reason == "device-type"
