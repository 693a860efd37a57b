"""The request stream: deterministic, built from the real shapes, consistent RequestIDs, the whole mix."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from gateway.duis import ParseError, parse_request
from rules.decide import Action, RequestFacts, decide
from rules.domain import DCC_EUI, DeviceType, Role, ServiceRequest, responsible_supplier
from rules.table import default_table
from simulator.estate import generate_estate, records_from_rows
from simulator.recording import InventoryChange, PublishItem
from simulator.traffic import (
    FLAG_INVALID_KINDS,
    INVALID_KINDS,
    MALFORMED_KINDS,
    TrafficMix,
    flag_faults,
    generate_traffic,
    load_templates,
    srv_eligibility,
)

REQUESTS = 3000


@pytest.fixture(scope="module")
def estate():
    return generate_estate(5, 400)


@pytest.fixture(scope="module")
def traffic(estate):
    return generate_traffic(estate, 9, REQUESTS)


@pytest.fixture(scope="module")
def parsed(traffic):
    """(item, parse result) for every publish, in stream order."""
    return [(item, parse_request(item.payload)) for item in traffic.items if isinstance(item, PublishItem)]


def _user(item):
    return item.topic.rsplit("/", 1)[1]


def test_same_seed_same_stream_other_seed_another(estate, traffic):
    assert generate_traffic(estate, 9, REQUESTS) == traffic
    assert generate_traffic(estate, 10, REQUESTS).items != traffic.items


def test_exactly_the_requests_asked_for_in_time_order(traffic, parsed):
    assert len(parsed) == REQUESTS
    times = [item.t for item in traffic.items]
    assert times == sorted(times)
    assert times[0] >= 0
    assert all(item.topic.startswith("dsp/in/") for item, _ in parsed)


def test_every_kind_of_the_mix_is_there(traffic):
    scenarios = Counter(item.scenario for item in traffic.items)
    expected = {
        "daily-read",
        "on-demand-read",
        "tariff",
        "firmware",
        "schedule",
        "other",
        "flag-set",
        "flag-clear",
        "spoofed",
        "change-of-supplier",
        "change-of-supplier/read-inventory",
        "change-of-supplier/old-supplier-clear",
        "change-of-tenancy/restrict-access",
        *(f"flag-invalid/{kind}" for kind in FLAG_INVALID_KINDS),
        *(f"malformed/{kind}" for kind in MALFORMED_KINDS),
        *(f"invalid/{kind}" for kind in INVALID_KINDS),
    }
    assert expected <= set(scenarios)
    # The overnight burst is the bulk of the traffic, as in the DCC's.
    assert scenarios["daily-read"] == max(scenarios.values())


def test_requests_parse_except_the_malformed_ones_which_are_rejected(parsed):
    table = default_table()
    for item, request in parsed:
        if not item.scenario.startswith("malformed/"):
            assert isinstance(request, ServiceRequest), (item.scenario, request)
            continue
        if isinstance(request, ParseError):
            continue
        # Parseable but wrong (an SRV no one knows): the gateway's decision rejects it.
        facts = RequestFacts(requester_roles=None, devices={}, dcc_eui=DCC_EUI)
        assert decide(request, facts, table).action is Action.REJECT, item.scenario


def test_counters_rise_strictly_per_originator(parsed):
    last: dict[str, int] = {}
    for _, request in parsed:
        request_id = request.request_id
        if request_id is None:
            continue
        assert request_id.counter > last.get(request_id.originator, 0)
        last[request_id.originator] = request_id.counter


def test_targets_are_the_devices_or_the_dcc_and_bodies_name_the_devices(estate, parsed):
    known = {device.device_id for device in estate.devices}
    for item, request in parsed:
        if not isinstance(request, ServiceRequest):
            continue
        if request.command_variant == 8:
            assert request.request_id.target == DCC_EUI
        else:
            assert request.concerned_devices == (request.request_id.target,)
        if item.scenario != "invalid/unknown-device" and not item.scenario.startswith("malformed/"):
            assert set(request.concerned_devices) <= known, item.scenario


def test_bodies_are_the_real_samples_with_only_ids_rewritten(parsed):
    templates = load_templates()
    ids = re.compile(
        rb"<sr:(RequestID|DeviceID|DeviceIDList|ConsumerReference|AllReasonableStepsTaken)>[^<]*<"
    )
    for item, request in parsed:
        if not isinstance(request, ServiceRequest) or item.scenario.startswith("malformed/"):
            continue
        template = templates[request.srv].raw
        assert ids.sub(b"", item.payload) == ids.sub(b"", template), request.srv


def test_users_are_eligible_and_publish_on_their_own_topic_unless_injected(estate, parsed):
    roles = {user.user_id: user.roles for user in estate.users}
    eligibility = srv_eligibility()
    for item, request in parsed:
        if not isinstance(request, ServiceRequest) or request.srv not in eligibility:
            continue
        originator = request.request_id.originator
        eligible = bool(roles[originator] & eligibility[request.srv])
        assert eligible is (item.scenario != "invalid/ineligible-role"), (item.scenario, request.srv)
        assert (_user(item) == originator) is (item.scenario != "spoofed")


def test_flag_requests_match_their_scenario(estate, traffic):
    devices = {device.device_id: device for device in estate.devices}
    roles = {user.user_id: user.roles for user in estate.users}
    for item in traffic.items:
        if isinstance(item, InventoryChange):
            for record in records_from_rows(item.rows):
                devices[record.device_id] = record
            continue
        request = parse_request(item.payload)
        if not isinstance(request, ServiceRequest) or request.flag is None:
            continue
        device = devices[request.flag.device_id]
        hub = devices.get(device.comms_hub_id) if device.comms_hub_id else None
        sender = request.request_id.originator
        responsible = sender == (responsible_supplier(device) or device.import_supplier)
        kind = item.scenario.removeprefix("flag-invalid/")
        if kind in {"other-supplier", "other-user", "distributor"}:
            assert not responsible
            expected_role = {"other-user": Role.OTHER_USER, "distributor": Role.ELECTRICITY_DISTRIBUTOR}
            assert (
                expected_role.get(
                    kind, Role.IMPORT_SUPPLIER if device.device_type is DeviceType.ESME else Role.GAS_SUPPLIER
                )
                in roles[sender]
            )
        elif item.scenario == "change-of-supplier/old-supplier-clear":
            assert not responsible
        else:
            assert responsible, item.scenario
        if kind in FLAG_INVALID_KINDS and kind not in {
            "other-supplier",
            "other-user",
            "distributor",
            "no-declaration",
        }:
            assert flag_faults(device, hub) == {kind}
        elif item.scenario != "change-of-supplier/old-supplier-clear":
            assert flag_faults(device, hub) == set(), item.scenario
        if request.flag.set:
            assert request.flag.all_reasonable_steps_taken is (kind != "no-declaration")


def test_change_of_supplier_moves_the_sender(traffic):
    changes = [item for item in traffic.items if isinstance(item, InventoryChange)]
    assert changes
    for change in changes:
        row = change.rows[0]
        follow_up = next(
            parse_request(item.payload)
            for item in traffic.items
            if isinstance(item, PublishItem)
            and item.t >= change.t
            and item.scenario == "change-of-supplier/read-inventory"
            and row["device_id"].encode() in item.payload
        )
        assert follow_up.request_id.originator == row["import_supplier"]


def test_flag_devices_are_the_valid_flag_sets(traffic):
    sets = {
        parse_request(item.payload).flag.device_id
        for item in traffic.items
        if isinstance(item, PublishItem) and item.scenario == "flag-set"
    }
    assert sets == set(traffic.flag_devices)
    assert sets


def test_the_mix_is_configurable(estate):
    only_reads = TrafficMix(
        on_demand_reads=0,
        tariff_updates=0,
        firmware=0,
        schedules=0,
        other=0,
        flag_requests=0,
        change_of_supplier=0,
        change_of_tenancy=0,
        spoofed=0,
        malformed=0,
        invalid=0,
        duration_seconds=10,
        burst_window=(0.5, 0.6),
    )
    items = generate_traffic(estate, 1, 50, only_reads).items
    assert {item.scenario for item in items} == {"daily-read"}
    assert all(5.0 <= item.t <= 6.0 for item in items)
    with pytest.raises(ValueError, match="burst_window"):
        TrafficMix(burst_window=(0.5, 0.4))
    based = generate_traffic(estate, 1, 5, TrafficMix(counter_base=1_000_000)).items
    assert all(parse_request(item.payload).request_id.counter >= 1_000_000 for item in based)
