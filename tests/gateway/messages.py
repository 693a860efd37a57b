"""DUIS messages for gateway tests: requests rendered from the real templates, device answers, alerts."""

from __future__ import annotations

from datetime import UTC, datetime

from lxml import etree

from gateway.duis import PARSER
from gateway.responses import response_xml
from rules.codes import ResponseCode
from rules.domain import DCC_EUI, FLAG_CLEAR_SRV, FLAG_SET_SRV, Eui, RequestId
from simulator.devices import device_alert_xml
from simulator.traffic import load_templates, render
from tests.gateway.test_inventory import IMPORT_SUPPLIER, METER

DCC = DCC_EUI
AT = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
TEMPLATES = load_templates()
SR = "{http://www.dccinterface.co.uk/ServiceUserGateway}"
UNKNOWN_METER = Eui("00-DB-12-34-56-78-99-99")

CONSUMPTION_SRV = "4.8.1"  # Read Instantaneous Import Registers
FIRMWARE_SRV = "11.1"  # Update Firmware (non-device, DCC target)
SECURITY_SRV = "6.15.1"  # Update Security Credentials (KRP)


def request(srv: str, originator: Eui, target: Eui, counter: int, **fields: str) -> bytes:
    return render(TEMPLATES[srv], RequestId(originator, target, counter), fields)


def flag_request(
    originator: Eui,
    counter: int,
    device: Eui,
    *,
    set_flag: bool,
    declared: bool = True,
    reference: str | None = None,
) -> bytes:
    fields = {"DeviceID": device}
    if set_flag:
        fields["AllReasonableStepsTaken"] = "true" if declared else "false"
        if reference is not None:
            fields["ConsumerReference"] = reference
    return request(FLAG_SET_SRV if set_flag else FLAG_CLEAR_SRV, originator, DCC, counter, **fields)


def meter_reading_answer(counter: int, originator: Eui = IMPORT_SUPPLIER) -> bytes:
    """The meter's I0 answer to the consumption read `counter`."""
    return response_xml(
        request_id=RequestId(originator, METER, counter),
        code=ResponseCode.SUCCESS,
        service_reference=None,
        srv=CONSUMPTION_SRV,
        at=AT,
    )


def alert(device: Eui, code: str, counter: int = 1) -> bytes:
    return device_alert_xml(response_id=f"{device}:{DCC}:{counter}", code=code, at=AT, gbcs_payload=b"\x01")


def header(payload: bytes) -> tuple[str | None, str | None]:
    """(RequestID, ResponseCode) of a DUIS document, None where absent or unreadable."""
    try:
        root = etree.fromstring(payload, PARSER)
    except etree.XMLSyntaxError:
        return None, None
    return root.findtext(f"{SR}Header/{SR}RequestID"), root.findtext(f"{SR}Header/{SR}ResponseCode")


def response_code(payload: bytes) -> str:
    code = header(payload)[1]
    assert code is not None
    return code
