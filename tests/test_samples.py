"""The 129 real DUIS sample requests, table-driven: each parses and gets the decision docs/mp169.md section 4
states for its SRV, for an unflagged and for a flagged device. The refused list is written out here, on
purpose, rather than read from the rules table it checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.duis import parse_request
from gateway.schema import DuisSchema, load_schema, validate
from rules.codes import ResponseCode
from rules.decide import Action, DeviceFacts, RequestFacts, decide
from rules.domain import NO_PARTIES, DeviceStatus, DeviceType, Eui, ServiceRequest
from rules.table import default_table
from tests.gateway.test_responses import schema_errors

RULES = Path(__file__).resolve().parent.parent / "rules"
SAMPLES = sorted((RULES / "duis" / "requests").glob("*.XML"))
FLAG_SAMPLES = sorted((RULES / "mp169-requests").glob("*.XML"))
DCC = Eui("90-B3-D5-1F-30-00-00-02")

# docs/mp169.md section 4: refused while the device is flagged. 5.1 Create Schedule is refused when
# the SRV it schedules is: the sample schedules 4.6.1.
REFUSED_WHEN_FLAGGED = frozenset(
    {
        "4.1.1", "4.1.2", "4.1.3", "4.1.4", "4.2",  # registers
        "4.3", "4.18",  # prepayment values, meter balance
        "4.4.2", "4.4.3", "4.4.4", "4.4.5",  # billing data logs
        "4.6.1", "4.6.2",  # daily read logs
        "4.8.1", "4.8.2", "4.8.3",  # profile data
        "4.10",  # network data
        "4.12.1", "4.12.2",  # maximum demand
        "4.14", "4.15",  # prepayment daily read log, load limit data
        "4.16", "4.17",  # active power, daily consumption log
        "14.1",  # record network data (gas)
        "5.1",  # Create Schedule of 4.6.1
    }
)  # fmt: skip
HANDLED_LOCALLY = frozenset({"8.2"})  # Read Inventory: answered by the gateway, with the MP169 flag
# The device-type convention of the samples' Device IDs (last byte).
SAMPLE_DEVICE_TYPES = {
    "A0": DeviceType.ESME,
    "A1": DeviceType.GSME,
    "A2": DeviceType.CHF,
    "A3": DeviceType.GPF,
    "A4": DeviceType.PPMID,
    "A6": DeviceType.HCALCS,
}


def facts(request: ServiceRequest, *, flagged: bool) -> RequestFacts:
    devices = {
        eui: DeviceFacts(
            device_id=eui,
            device_type=SAMPLE_DEVICE_TYPES[eui[-2:]],
            smets=2,
            status=DeviceStatus.COMMISSIONED,
            parties=NO_PARTIES,
            flagged_meter=eui if flagged else None,
        )
        for eui in request.concerned_devices
    }
    return RequestFacts(requester_roles=None, devices=devices, dcc_eui=DCC)


def expected_action(srv: str, *, flagged: bool) -> Action:
    if srv in HANDLED_LOCALLY:
        return Action.LOCAL
    if flagged and srv in REFUSED_WHEN_FLAGGED:
        return Action.REFUSE
    return Action.FORWARD


def test_the_table_covers_all_129_samples_and_the_refused_list_is_all_there() -> None:
    srvs = set()
    for path in SAMPLES:
        request = parse_request(path.read_bytes())
        assert isinstance(request, ServiceRequest), path.name
        srvs.add(request.srv)
    assert len(SAMPLES) == len(srvs) == 129
    assert srvs >= REFUSED_WHEN_FLAGGED | HANDLED_LOCALLY


@pytest.mark.parametrize("flagged", [False, True], ids=["unflagged", "flagged"])
@pytest.mark.parametrize("path", SAMPLES, ids=lambda path: path.name)
def test_sample_decision(path: Path, flagged: bool) -> None:
    request = parse_request(path.read_bytes())
    assert isinstance(request, ServiceRequest)
    decision = decide(request, facts(request, flagged=flagged), default_table())
    expected = expected_action(request.srv, flagged=flagged)
    assert (decision.action, request.srv) == (expected, request.srv), decision
    if expected is Action.REFUSE:
        assert decision.response_code is ResponseCode.CONSUMER_CHOICE
        assert decision.reason == "consumer-choice"
    assert decision.rule is not None
    assert decision.rule.srv == request.srv


def test_the_create_schedule_sample_schedules_a_refused_srv() -> None:
    request = parse_request(next(path for path in SAMPLES if "_5.1." in path.name).read_bytes())
    assert isinstance(request, ServiceRequest)
    assert request.scheduled_srv == "4.6.1"
    assert request.scheduled_srv in REFUSED_WHEN_FLAGGED


@pytest.mark.parametrize("flagged", [False, True], ids=["unflagged", "flagged"])
@pytest.mark.parametrize("path", FLAG_SAMPLES, ids=lambda path: path.name)
def test_flag_request_examples_are_handled_by_the_gateway(path: Path, flagged: bool) -> None:
    request = parse_request(path.read_bytes())
    assert isinstance(request, ServiceRequest)
    assert request.flag is not None
    decision = decide(request, facts(request, flagged=flagged), default_table())
    assert decision.action is Action.LOCAL


def test_flag_request_examples_are_duis_v54_but_for_the_mp169_parts() -> None:
    schema = load_schema(DuisSchema.V54)
    for path in FLAG_SAMPLES:
        assert validate(path.read_bytes()).schema is DuisSchema.MP169
        body = "SetReducedCommunications" if "8.15.1" in path.name else "RemoveReducedCommunications"
        assert schema_errors(schema, path.read_bytes()) == [
            "Element 'ServiceReference'",
            "Element 'ServiceReferenceVariant'",
            f"Element '{body}'",
        ]
