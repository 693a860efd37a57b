"""gateway.duis: the real samples parse; every ParseError reason is reachable; hostile input never raises,
never reads a file and never opens a connection."""

from __future__ import annotations

import json
import re
import socket
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from gateway import duis
from gateway.duis import (
    PARSE_ERROR_REASONS,
    ParseError,
    parse_device_message,
    parse_request,
    parse_request_tree,
)
from rules.domain import (
    MAX_COUNTER,
    DeviceMessage,
    DeviceMessageKind,
    Eui,
    FlagInstruction,
    RequestId,
    ServiceRequest,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

RULES = Path(__file__).resolve().parents[2] / "rules"
DUIS_SAMPLES = sorted((RULES / "duis" / "requests").glob("*.XML"))
MP169_SAMPLES = sorted((RULES / "mp169-requests").glob("*.XML"))
ALL_SAMPLES = DUIS_SAMPLES + MP169_SAMPLES
SAMPLE_BYTES = [path.read_bytes() for path in ALL_SAMPLES]
SRV_IN_NAME = re.compile(r"(?:^|_)(\d+(?:\.\d+)+)\.?_")

USER = Eui("90-B3-D5-1F-30-01-00-00")
DCC = Eui("90-B3-D5-1F-30-00-00-02")
ESME = Eui("00-DB-12-34-56-78-90-A0")
SECRET = "MP169-SECRET-4c1d9e"


def sample(name: str) -> bytes:
    return next(path for path in ALL_SAMPLES if path.name.startswith(name)).read_bytes()


def header_text(raw: bytes, tag: str) -> str:
    match = re.search(rb"<sr:" + tag.encode() + rb">([^<]*)</sr:", raw)
    assert match is not None
    return match.group(1).decode()


def with_request_id(raw: bytes, request_id: str) -> bytes:
    return re.sub(rb"<sr:RequestID>[^<]*<", b"<sr:RequestID>" + request_id.encode() + b"<", raw, count=1)


def request(header: str, body: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<sr:Request xmlns:sr="http://www.dccinterface.co.uk/ServiceUserGateway" schemaVersion="5.4">'
        f"<sr:Header>{header}</sr:Header><sr:Body>{body}</sr:Body></sr:Request>"
    ).encode()


def header(
    request_id: str = f"{USER}:{ESME}:7",
    command_variant: str = "1",
    srv: str = "4.8.1",
    reference: str = "4.8",
) -> str:
    return (
        f"<sr:RequestID>{request_id}</sr:RequestID><sr:CommandVariant>{command_variant}</sr:CommandVariant>"
        f"<sr:ServiceReference>{reference}</sr:ServiceReference>"
        f"<sr:ServiceReferenceVariant>{srv}</sr:ServiceReferenceVariant>"
    )


def flag_request(srv: str, body: str) -> bytes:
    return request(header(f"{USER}:{DCC}:7", "8", srv, "8.15"), body)


def response(header_xml: str, body: str) -> bytes:
    return (
        '<sr:Response xmlns:sr="http://www.dccinterface.co.uk/ServiceUserGateway" schemaVersion="5.4">'
        f"<sr:Header>{header_xml}<sr:ResponseDateTime>2026-01-01T00:00:00Z</sr:ResponseDateTime></sr:Header>"
        f"<sr:Body>{body}</sr:Body></sr:Response>"
    ).encode()


# -- the real samples ------------------------------------------------------------------------------


def test_there_is_one_duis_sample_per_srv_of_the_matrix() -> None:
    matrix = json.loads((RULES / "duis" / "srv-matrix.json").read_text(encoding="utf-8"))
    srvs = [parse_request(path.read_bytes()) for path in DUIS_SAMPLES]
    assert all(isinstance(parsed, ServiceRequest) for parsed in srvs)
    assert sorted(p.srv for p in srvs if isinstance(p, ServiceRequest)) == sorted(
        row["Service Reference Variant"] for row in matrix
    )
    assert len(DUIS_SAMPLES) == 129


@pytest.mark.parametrize("path", ALL_SAMPLES, ids=lambda path: path.name)
def test_every_sample_parses_with_its_header(path: Path) -> None:
    raw = path.read_bytes()
    parsed = parse_request(raw)
    assert isinstance(parsed, ServiceRequest), parsed
    name_match = SRV_IN_NAME.search(path.name)
    assert name_match is not None
    assert parsed.srv == name_match.group(1) == header_text(raw, "ServiceReferenceVariant")
    assert parsed.service_reference == header_text(raw, "ServiceReference")
    assert parsed.command_variant == int(header_text(raw, "CommandVariant"))
    originator, target, counter = header_text(raw, "RequestID").split(":")
    assert parsed.request_id == RequestId(Eui(originator), Eui(target), int(counter))
    assert parsed.raw is raw
    if parsed.command_variant != 8:
        assert parsed.concerned_devices == (parsed.request_id.target,)


@pytest.mark.parametrize(
    ("name", "body_element", "devices", "scheduled_srv"),
    [
        ("11.1_", "UpdateFirmware", ("00-DB-12-34-56-78-90-A0",), None),
        ("11.4_", "UpdatePPMIDFirmware", ("00-DB-12-34-56-78-90-A4",), None),
        ("ECS21a_5.1", "CreateSchedule", ("00-DB-12-34-56-78-90-A0",), "4.6.1"),
        ("8.2_", "ReadInventory", ("00-DB-12-34-56-78-90-A2",), None),
        ("8.3_", "DecommissionDevice", ("00-DB-12-34-56-78-90-A0",), None),
        ("8.14.3_", "CHFFaultReturn", ("00-DB-12-34-56-78-90-A2",), None),  # not OtherDeviceID
        ("5.2_", "ReadSchedule", (), None),
        ("5.3_", "DeleteSchedule", (), None),
        ("8.13_", "ReturnLocalCommandResponse", (), None),
        ("12.1_", "RequestWANMatrix", (), None),
        ("8.15.1_", "SetReducedCommunications", ("00-DB-12-34-56-78-90-A0",), None),
    ],
)
def test_non_device_requests_name_the_devices_in_their_body(
    name: str, body_element: str, devices: tuple[str, ...], scheduled_srv: str | None
) -> None:
    parsed = parse_request(sample(name))
    assert isinstance(parsed, ServiceRequest)
    assert parsed.command_variant == 8
    assert parsed.request_id.target == DCC
    assert parsed.body_element == body_element
    assert parsed.concerned_devices == devices
    assert parsed.scheduled_srv == scheduled_srv


def test_device_request_concerns_its_target_and_reads_no_body() -> None:
    # A body that would be a bad DeviceID list in a CV 8 request is not even looked at for CV 1.
    raw = request(
        header(command_variant="1"),
        "<sr:ReadProfileData><sr:DeviceIDList>junk</sr:DeviceIDList></sr:ReadProfileData>",
    )
    parsed = parse_request(raw)
    assert isinstance(parsed, ServiceRequest)
    assert parsed.concerned_devices == (ESME,)
    assert parsed.body_element == "ReadProfileData"
    assert parsed.flag is None


def test_device_id_list_is_comma_separated_normalised_and_deduplicated() -> None:
    raw = request(
        header(f"{USER}:{DCC}:9", "8", "11.1", "11.1"),
        "<sr:UpdateFirmware><sr:FirmwareImage>AAAA</sr:FirmwareImage>"
        "<sr:DeviceIDList>00-db-12-34-56-78-90-a0,00-DB-12-34-56-78-90-A1, 00-DB-12-34-56-78-90-A0"
        "</sr:DeviceIDList></sr:UpdateFirmware>",
    )
    parsed = parse_request(raw)
    assert isinstance(parsed, ServiceRequest)
    assert parsed.concerned_devices == (ESME, "00-DB-12-34-56-78-90-A1")


def test_request_id_is_normalised_and_counter_spans_u64() -> None:
    raw = with_request_id(sample("ECS22b_4.8.1"), f"  {USER.lower()}:{ESME.lower()}:{MAX_COUNTER}  ")
    parsed = parse_request(raw)
    assert isinstance(parsed, ServiceRequest)
    assert parsed.request_id == RequestId(USER, ESME, MAX_COUNTER)
    assert str(parsed.request_id) == f"{USER}:{ESME}:{MAX_COUNTER}"


HEADER_FIELDS = [match.group() for match in re.finditer(r"<sr:(\w+)>[^<]*</sr:\1>", header())]
HEADER_LAYOUTS = {
    "schema order": "".join(HEADER_FIELDS),
    "optional fields": HEADER_FIELDS[0]
    + "<sr:FirstInSequence>true</sr:FirstInSequence>"
    + f"<sr:PrecedingServiceRequestID>{USER}:{ESME}:6</sr:PrecedingServiceRequestID>"
    + "".join(HEADER_FIELDS[1:]),
    "blanks and comments": "\n  <!-- c -->" + "\n  ".join(HEADER_FIELDS) + " <?pi x?>\n",
}


@pytest.mark.parametrize("layout", HEADER_LAYOUTS)
def test_every_header_layout_the_schema_allows_reads_the_same_fields(layout: str) -> None:
    raw = request(HEADER_LAYOUTS[layout], "<sr:ReadX/>")
    expected = ServiceRequest(RequestId(USER, ESME, 7), 1, "4.8", "4.8.1", "ReadX", (ESME,))
    assert parse_request(raw) == expected
    assert parse_request_tree(etree.fromstring(raw, duis.PARSER), raw) == expected


REQUEST_ID_FIELD, COMMAND_VARIANT_FIELD, REFERENCE_FIELD, SRV_FIELD = HEADER_FIELDS
FLAGGED_METER_ID = f"<sr:RequestID>{USER}:{ESME}:7</sr:RequestID>"
OTHER_METER_ID = f"<sr:RequestID>{USER}:00-DB-12-34-56-78-90-B0:7</sr:RequestID>"
# Headers the DUIS V5.4 schema forbids: each is refused on either route, whatever its values.
BAD_HEADERS = {
    "two RequestIDs": FLAGGED_METER_ID + OTHER_METER_ID + "".join(HEADER_FIELDS[1:]),
    "a RequestID after the SRV": FLAGGED_METER_ID + "".join(HEADER_FIELDS[1:]) + OTHER_METER_ID,
    "two CommandVariants": REQUEST_ID_FIELD + COMMAND_VARIANT_FIELD * 2 + REFERENCE_FIELD + SRV_FIELD,
    "two SRVs": "".join(HEADER_FIELDS) + SRV_FIELD.replace("4.8.1", "4.8.2"),
    "reversed": "".join(reversed(HEADER_FIELDS)),
    "optional field out of order": REQUEST_ID_FIELD + COMMAND_VARIANT_FIELD
    + "<sr:FirstInSequence>true</sr:FirstInSequence>" + REFERENCE_FIELD + SRV_FIELD,
    "unknown DUIS element": "".join(HEADER_FIELDS) + "<sr:Note>x</sr:Note>",
    "element in another namespace": "".join(HEADER_FIELDS) + '<x:Note xmlns:x="urn:x"/>',
    "SRV in another namespace": "".join(HEADER_FIELDS[:3])
    + '<x:ServiceReferenceVariant xmlns:x="urn:x">4.8.1</x:ServiceReferenceVariant>',
    "attribute on a field": REQUEST_ID_FIELD.replace("<sr:RequestID>", '<sr:RequestID a="1">')
    + "".join(HEADER_FIELDS[1:]),
    "element inside a field": REQUEST_ID_FIELD.replace("</sr:RequestID>", "<sr:X/></sr:RequestID>")
    + "".join(HEADER_FIELDS[1:]),
    "text between fields": REQUEST_ID_FIELD + "stray" + "".join(HEADER_FIELDS[1:]),
    "FirstInSequence not a boolean": REQUEST_ID_FIELD + "<sr:FirstInSequence>yes</sr:FirstInSequence>"
    + "".join(HEADER_FIELDS[1:]),
    "PrecedingServiceRequestID not a RequestID": REQUEST_ID_FIELD
    + "<sr:PrecedingServiceRequestID>6</sr:PrecedingServiceRequestID>" + "".join(HEADER_FIELDS[1:]),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_a_header_the_schema_forbids_is_refused(case: str) -> None:
    raw = request(BAD_HEADERS[case], "<sr:ReadX/>")
    parsed = parse_request(raw)
    assert isinstance(parsed, ParseError)
    assert parsed.reason == "bad-header", parsed
    assert parse_request_tree(etree.fromstring(raw, duis.PARSER), raw) == parsed


def test_an_attribute_on_the_header_is_refused() -> None:
    raw = request("".join(HEADER_FIELDS), "<sr:ReadX/>").replace(b"<sr:Header>", b'<sr:Header id="h">')
    assert parse_request(raw) == ParseError("bad-header", "the Header element has attributes")


def test_a_header_with_two_request_ids_is_never_decided_on_either_of_them() -> None:
    # Issue 15: the gateway decided on the last RequestID and forwarded bytes whose first one named a
    # flagged meter. Refused whichever comes first, on a real sample.
    existing = re.search(rb"<sr:RequestID>[^<]*</sr:RequestID>", VALID)
    assert existing is not None
    other = OTHER_METER_ID.encode()
    for doubled in (other + existing.group(), existing.group() + other):
        raw = VALID.replace(existing.group(), doubled, 1)
        assert parse_request(raw) == ParseError(
            "bad-header", "Header element 'RequestID' is repeated or out of schema order"
        )


@pytest.mark.parametrize(
    ("prolog", "declares"),
    [
        (b"", False),
        (b'<?xml version="1.0" encoding="UTF-8"?>\n', False),
        (b"\xef\xbb\xbf<?xml version='1.0'?>\r\n\t", False),
        (b'<?xml version="1.0"?><!-- <!DOCTYPE r> -->', False),
        (b"<!DOCTYPE r>", True),
        (b"\xef\xbb\xbf<!DOCTYPE r>", True),
        (b'<?xml version="1.0"?>\n<!DOCTYPE r>', True),
        (b'<?xml version="1.0" x=">"?><!DOCTYPE r>', True),  # a ">" in the declaration
        (b'<?xml version="1.0"?><?pi a?><!DOCTYPE r>', True),
        (b'<?xml version="1.0"?><!-- c --><!DOCTYPE r>', True),
    ],
)
def test_the_doctype_byte_check_reads_the_prolog(prolog: bytes, declares: bool) -> None:
    # The usual prolog is matched in one go; every other one is walked item by item.
    assert duis.declares_doctype(prolog + b"<r/>") is declares


def test_blank_text_between_elements_is_dropped_and_leaf_text_kept() -> None:
    root = etree.fromstring(b"<r>\n  <a>  </a>\n  <b> x <c/></b>\n</r>", duis.PARSER)
    assert root.text is None
    assert [child.text for child in root] == ["  ", " x "]


# -- the MP169 flag requests -----------------------------------------------------------------------


def test_flag_samples_carry_their_instruction() -> None:
    set_request = parse_request(sample("8.15.1_"))
    remove_request = parse_request(sample("8.15.2_"))
    assert isinstance(set_request, ServiceRequest)
    assert isinstance(remove_request, ServiceRequest)
    assert (set_request.service_reference, set_request.srv) == ("8.15", "8.15.1")
    assert set_request.flag == FlagInstruction(
        ESME, set=True, all_reasonable_steps_taken=True, consumer_reference="CUSTOMER-CASE-0001"
    )
    assert remove_request.flag == FlagInstruction(ESME, set=False, all_reasonable_steps_taken=False)
    assert remove_request.concerned_devices == (ESME,)


@pytest.mark.parametrize(
    ("declaration", "declared"),
    [
        ("<sr:AllReasonableStepsTaken>true</sr:AllReasonableStepsTaken>", True),
        ("<sr:AllReasonableStepsTaken> 1 </sr:AllReasonableStepsTaken>", True),
        ("<sr:AllReasonableStepsTaken>false</sr:AllReasonableStepsTaken>", False),
        ("<sr:AllReasonableStepsTaken>0</sr:AllReasonableStepsTaken>", False),
        ("<sr:AllReasonableStepsTaken>yes</sr:AllReasonableStepsTaken>", False),
        ("<sr:AllReasonableStepsTaken/>", False),
        ("", False),  # absent: the flag handler refuses it with its own code
    ],
)
def test_set_declaration_is_an_xs_boolean_and_absent_means_not_declared(
    declaration: str, declared: bool
) -> None:
    raw = flag_request(
        "8.15.1",
        f"<sr:SetReducedCommunications><sr:DeviceID>{ESME}</sr:DeviceID>{declaration}"
        "</sr:SetReducedCommunications>",
    )
    parsed = parse_request(raw)
    assert isinstance(parsed, ServiceRequest)
    assert parsed.flag == FlagInstruction(ESME, set=True, all_reasonable_steps_taken=declared)


def test_flag_request_with_another_command_variant_still_carries_its_instruction() -> None:
    # The rules reject the CommandVariant; the instruction is there so nothing downstream guesses.
    raw = request(
        header(f"{USER}:{DCC}:7", "4", "8.15.2", "8.15"),
        f"<sr:RemoveReducedCommunications><sr:DeviceID>{ESME}</sr:DeviceID></sr:RemoveReducedCommunications>",
    )
    parsed = parse_request(raw)
    assert isinstance(parsed, ServiceRequest)
    assert parsed.flag == FlagInstruction(ESME, set=False, all_reasonable_steps_taken=False)
    assert parsed.concerned_devices == (DCC,)


# -- every ParseError reason -----------------------------------------------------------------------

VALID = sample("ECS22b_4.8.1")
FLAG_SET = sample("8.15.1_")
ALERT = response(
    "<sr:ResponseCode>I0</sr:ResponseCode>",
    "<sr:DeviceAlertMessage><sr:AlertCode>8F0A</sr:AlertCode>"
    "<sr:GBCSPayload>AA==</sr:GBCSPayload></sr:DeviceAlertMessage>",
)

REQUEST_FAILURES: list[tuple[str, bytes, str, bool]] = [
    # (case, input, reason, request_id readable)
    ("over the limit", VALID + b" " * duis.DEFAULT_MAX_BYTES, "too-large", False),
    (
        "internal DTD",
        b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY e "x">]><r>&e;</r>',
        "doctype-forbidden",
        False,
    ),
    (
        "latin-1 bytes",
        VALID.replace(b"<sr:ServiceReference>", "<sr:ServiceReference>é".encode("latin-1")),
        "invalid-encoding",
        False,
    ),
    ("utf-16", VALID.decode().encode("utf-16"), "invalid-encoding", False),
    ("truncated", VALID[: len(VALID) // 2], "not-well-formed", False),
    ("empty", b"", "not-well-formed", False),
    ("too deep", b"<a>" * 300 + b"</a>" * 300, "not-well-formed", False),
    ("undeclared entity", VALID.replace(b"4.8.1<", b"&x;<"), "not-well-formed", False),
    ("other namespace", VALID.replace(b"ServiceUserGateway", b"Other"), "wrong-namespace", False),
    ("no namespace", b"<Request><Header/><Body/></Request>", "wrong-namespace", False),
    ("body element elsewhere", request(header(), '<x:Read xmlns:x="urn:x"/>'), "wrong-namespace", True),
    ("a response", ALERT, "wrong-root", False),
    ("no header", request("", "").replace(b"<sr:Header></sr:Header>", b""), "missing-field", False),
    ("no body", request(header(), "").replace(b"<sr:Body></sr:Body>", b""), "missing-field", False),
    ("no RequestID", request(header().split("</sr:RequestID>")[1], "<sr:X/>"), "missing-field", False),
    (
        "no CommandVariant",
        request(header().replace("<sr:CommandVariant>1</sr:CommandVariant>", ""), "<sr:X/>"),
        "missing-field",
        True,
    ),
    ("empty SRV", request(header(srv=""), "<sr:X/>"), "missing-field", True),
    (
        "no ServiceReference",
        request(header().replace("<sr:ServiceReference>4.8</sr:ServiceReference>", ""), "<sr:X/>"),
        "missing-field",
        True,
    ),
    ("empty Body", request(header(), ""), "missing-field", True),
    (
        "flag without DeviceID",
        flag_request("8.15.1", "<sr:SetReducedCommunications/>"),
        "missing-field",
        True,
    ),
    ("two parts", with_request_id(VALID, f"{USER}:{ESME}"), "bad-request-id", False),
    ("bad EUI", with_request_id(VALID, f"{USER}:00-DB-12-34-56-78-90:7"), "bad-request-id", False),
    ("leading zero", with_request_id(VALID, f"{USER}:{ESME}:07"), "bad-request-id", False),
    ("negative", with_request_id(VALID, f"{USER}:{ESME}:-1"), "bad-request-id", False),
    ("over u64", with_request_id(VALID, f"{USER}:{ESME}:{MAX_COUNTER + 1}"), "bad-request-id", False),
    (
        "ligature upper-cases to hex",
        with_request_id(VALID, f"\ufb00{USER[2:]}:{ESME}:7"),
        "bad-request-id",
        False,
    ),
    ("non-XML blank", with_request_id(VALID, f"\u00a0{USER}:{ESME}:7"), "bad-request-id", False),
    ("CV 9", request(header(command_variant="9"), "<sr:X/>"), "bad-command-variant", True),
    ("CV 0", request(header(command_variant="0"), "<sr:X/>"), "bad-command-variant", True),
    ("CV text", request(header(command_variant="one"), "<sr:X/>"), "bad-command-variant", True),
    ("bad DeviceID", sample("8.2_").replace(b"00-DB-12-34-56-78-90-A2", b"00-DB-12"), "bad-device-id", True),
    (
        "bad list",
        sample("11.1_").replace(b"00-DB-12-34-56-78-90-A0<", b"00-DB-12-34-56-78-90-A0;00<"),
        "bad-device-id",
        True,
    ),
    ("flag DeviceID", FLAG_SET.replace(b"00-DB-12-34-56-78-90-A0", b"meter"), "bad-device-id", True),
    (
        "remove body for a set",
        flag_request(
            "8.15.1",
            f"<sr:RemoveReducedCommunications><sr:DeviceID>{ESME}"
            "</sr:DeviceID></sr:RemoveReducedCommunications>",
        ),
        "wrong-body",
        True,
    ),
    ("long reference", FLAG_SET.replace(b"CUSTOMER-CASE-0001", b"x" * 65), "invalid-field", True),
    (
        "two RequestIDs",
        request(HEADER_FIELDS[0] + "".join(HEADER_FIELDS), "<sr:X/>"),
        "bad-header",
        False,
    ),
    (
        "too much markup",
        VALID.replace(b"<sr:Body>", b"<sr:Body>" + b"<a/>" * duis.MAX_MARKUP),
        "too-much-markup",
        False,
    ),
]

MESSAGE_FAILURES: list[tuple[str, bytes, str, bool]] = [
    ("a request", VALID, "wrong-root", False),
    (
        "no ResponseCode",
        response(f"<sr:RequestID>{USER}:{ESME}:7</sr:RequestID>", "<sr:ResponseMessage/>"),
        "missing-field",
        True,
    ),
    (
        "bad RequestID",
        response(
            "<sr:RequestID>nope</sr:RequestID><sr:ResponseCode>I0</sr:ResponseCode>", "<sr:ResponseMessage/>"
        ),
        "bad-request-id",
        False,
    ),
    (
        "bad ResponseCode",
        response("<sr:ResponseCode>OK</sr:ResponseCode>", "<sr:ResponseMessage/>"),
        "invalid-field",
        False,
    ),
    ("bad AlertCode", ALERT.replace(b"8F0A", b"8F0"), "invalid-field", False),
    ("no AlertCode", ALERT.replace(b"<sr:AlertCode>8F0A</sr:AlertCode>", b""), "missing-field", False),
    (
        "bad DCCAlertCode",
        response(
            "<sr:ResponseCode>I0</sr:ResponseCode>",
            "<sr:DCCAlertMessage><sr:DCCAlertCode>ad-1</sr:DCCAlertCode></sr:DCCAlertMessage>",
        ),
        "invalid-field",
        False,
    ),
    (
        "SMETS1 body",
        response("<sr:ResponseCode>I0</sr:ResponseCode>", "<sr:SMETS1ResponseMessage/>"),
        "wrong-body",
        False,
    ),
    ("empty Body", response("<sr:ResponseCode>I0</sr:ResponseCode>", ""), "missing-field", False),
]


@pytest.mark.parametrize(
    ("case", "raw", "reason", "has_request_id"), REQUEST_FAILURES, ids=[case[0] for case in REQUEST_FAILURES]
)
def test_request_failures(case: str, raw: bytes, reason: str, has_request_id: bool) -> None:
    parsed = parse_request(raw)
    assert isinstance(parsed, ParseError)
    assert parsed.reason == reason, parsed
    assert parsed.detail
    assert (parsed.request_id is not None) == has_request_id


@pytest.mark.parametrize(
    ("case", "raw", "reason", "has_request_id"), MESSAGE_FAILURES, ids=[case[0] for case in MESSAGE_FAILURES]
)
def test_device_message_failures(case: str, raw: bytes, reason: str, has_request_id: bool) -> None:
    parsed = parse_device_message(raw)
    assert isinstance(parsed, ParseError)
    assert parsed.reason == reason, parsed
    assert (parsed.request_id is not None) == has_request_id


def test_the_failure_tables_reach_every_documented_reason() -> None:
    reached = {case[2] for case in REQUEST_FAILURES + MESSAGE_FAILURES} | {"parser-failure"}
    assert reached == set(PARSE_ERROR_REASONS)


def test_an_unexpected_failure_is_returned_not_raised() -> None:
    parsed = parse_request("not bytes")  # type: ignore[arg-type]
    assert isinstance(parsed, ParseError)
    assert parsed.reason == "parser-failure"
    assert "TypeError" in parsed.detail


def test_the_parsed_document_is_checked_for_a_doctype_too() -> None:
    # Behind the byte check: a document parsed with the hardened parser that still has a DTD is caught.
    root = etree.fromstring(b'<!DOCTYPE r [<!ENTITY e "x">]><r>&e;</r>', duis.PARSER)
    assert duis.has_doctype(root)
    assert not duis.has_doctype(etree.fromstring(b"<r/>", duis.PARSER))


def test_a_declared_encoding_is_not_honoured_but_utf8_bom_is_fine() -> None:
    assert isinstance(parse_request(b"\xef\xbb\xbf" + VALID), ServiceRequest)
    latin = VALID.replace(b'encoding="UTF-8"', b'encoding="ISO-8859-1"')
    assert isinstance(parse_request(latin), ServiceRequest)


def test_the_markup_limit_counts_tags_not_bytes() -> None:
    raw = request(header(), "<sr:ReadX/>")
    # The XML declaration, Request, Header, four fields of two tags, Header's end, Body, ReadX,
    # Body's end, Request's end.
    markup = 16
    assert isinstance(parse_request(raw, max_markup=markup), ServiceRequest)
    assert parse_request(raw, max_markup=markup - 1) == ParseError(
        "too-much-markup", f"{markup} tags and other markup, over the limit of {markup - 1}"
    )
    # Text is not markup, however long.
    long_text = raw.replace(b"<sr:ReadX/>", b"<sr:ReadX>" + b"x" * 100 * markup + b"</sr:ReadX>")
    assert isinstance(parse_request(long_text, max_markup=markup + 1), ServiceRequest)


def nested(depth: int) -> bytes:
    """VALID with its Body element holding elements nested so that the document is `depth` deep."""
    inner = depth - 3  # Request, Body, the Body element
    return re.sub(
        rb"<sr:ReadActiveImportProfileData>.*</sr:ReadActiveImportProfileData>",
        b"<sr:ReadActiveImportProfileData>"
        + b"<a>" * inner
        + b"</a>" * inner
        + b"</sr:ReadActiveImportProfileData>",
        VALID,
        flags=re.DOTALL,
    )


@pytest.mark.parametrize(
    "depth", [duis.MAX_DEPTH - 1, duis.MAX_DEPTH, duis.MAX_DEPTH + 1, duis.MAX_DEPTH + 2]
)
@pytest.mark.parametrize("padding", [0, 20_000], ids=["counted", "long"])
def test_both_routes_stop_at_the_same_depth(depth: int, padding: int) -> None:
    # The scan alone would allow one level more than a tree; the gateway holds it to the tree's limit,
    # for short documents (whose "<" it counts) and long ones alike.
    raw = nested(depth).replace(b"</sr:Header>", b"</sr:Header>" + b" " * padding)
    assert duis.PLAIN_REQUEST.match(raw) is not None
    parsed = parse_request(raw)
    if depth <= duis.MAX_DEPTH:
        assert isinstance(parsed, ServiceRequest)
        assert parse_request_tree(etree.fromstring(raw, duis.PARSER), raw) == parsed
    else:
        assert isinstance(parsed, ParseError)
        assert parsed.reason == "not-well-formed"
        with pytest.raises(etree.XMLSyntaxError):
            etree.fromstring(raw, duis.PARSER)


def test_every_sample_is_in_the_plain_form_and_device_requests_take_the_fast_route() -> None:
    # Otherwise the properties below would only ever compare the tree route with itself.
    assert all(duis.PLAIN_REQUEST.match(raw) is not None for raw in SAMPLE_BYTES)
    requests = [parse_request(raw) for raw in SAMPLE_BYTES]
    fast = [
        r
        for r in requests
        if isinstance(r, ServiceRequest) and not duis.needs_body(str(r.command_variant), r.srv)
    ]
    assert len(fast) > 100


@pytest.mark.parametrize(("command_variant", "srv", "needed"), [
    ("8", "5.1", True), ("8", "11.1", True), ("8", "8.2", True), ("8", "99.9", True),
    ("8", "8.15.1", True), ("4", "8.15.2", True), ("1", "4.8.1", False), ("4", "6.15.1", False),
])  # fmt: skip
def test_the_body_is_parsed_for_non_device_and_flag_requests(
    command_variant: str, srv: str, needed: bool
) -> None:
    assert duis.needs_body(command_variant, srv) is needed


def test_a_header_is_read_the_same_from_a_root_that_kept_comments_and_blanks() -> None:
    # The XMLDSig verifier may parse with comments and blank text kept.
    keeping = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    for raw in SAMPLE_BYTES:
        assert parse_request_tree(etree.fromstring(raw, keeping), raw) == parse_request(raw)


def duis_request_with(header_xml: str, body: str, root_attributes: str) -> bytes:
    head = f"<sr:Request {root_attributes}><sr:Header>{header_xml}</sr:Header>"
    return f"{head}<sr:Body>{body}</sr:Body></sr:Request>".encode()


DUIS_NS = f'xmlns:sr="{duis.NAMESPACE}"'
# Spellings whose XML reading the plain form cannot be sure of: each gets the tree route's answer.
TREE_SPELLINGS = {
    "Body element redeclares the prefix": ("<sr:ReadX xmlns:sr='urn:x'/>", DUIS_NS, "wrong-namespace"),
    "prefix bound by a character reference": (
        "<sr:ReadX/>",
        DUIS_NS.replace("http", "&#104;ttp"),
        None,
    ),
    "a decoy binding inside another attribute": (
        "<sr:ReadX/>",
        f"a='{DUIS_NS}' xmlns:sr='urn:x'",
        "wrong-namespace",
    ),
    "a '>' inside an attribute value": ("<sr:ReadX/>", "a='>' " + DUIS_NS, None),
    "the default namespace": ("<sr:ReadX/>", DUIS_NS + ' xmlns="urn:x"', None),
}


@pytest.mark.parametrize("case", TREE_SPELLINGS)
def test_spellings_the_plain_form_cannot_read_get_the_tree_answer(case: str) -> None:
    body, attributes, reason = TREE_SPELLINGS[case]
    raw = duis_request_with(header(), body, attributes)
    parsed = parse_request(raw)
    assert parsed == tree_route(raw)
    assert (parsed.reason if isinstance(parsed, ParseError) else None) == reason


MALFORMED_BODIES = {
    "unclosed element": (b"</sr:Body>", b"<sr:Open></sr:Body>"),
    "mismatched end tag": (b"</sr:Body>", b"</sr:Other></sr:Body>"),
    "bare ampersand": (b"</sr:Body>", b"a & b</sr:Body>"),
    "undefined entity": (b"</sr:Body>", b"&nope;</sr:Body>"),
    "bare <": (b"</sr:Body>", b"<</sr:Body>"),
    "undeclared prefix": (b"</sr:Body>", b"<zz:X/></sr:Body>"),
    "duplicate attribute": (b"</sr:Body>", b'<sr:X a="1" a="2"/></sr:Body>'),
    "control character": (b"</sr:Body>", b"\x01</sr:Body>"),
    "invalid UTF-8": (b"</sr:Body>", b"\xff\xfe</sr:Body>"),
    "]]> in text": (b"</sr:Body>", b"]]></sr:Body>"),
    "unterminated comment": (b"</sr:Body>", b"<!-- </sr:Body>"),
    "second root": (b"</sr:Request>", b"</sr:Request><sr:Request/>"),
    "text after the root": (b"</sr:Request>", b"</sr:Request>trailing"),
    "unclosed root": (b"</sr:Request>", b""),
    "signature cut short": (b"</ds:Signature>", b""),
}


@pytest.mark.parametrize("case", MALFORMED_BODIES)
def test_a_document_malformed_after_its_header_is_refused(case: str) -> None:
    old, new = MALFORMED_BODIES[case]
    raw = VALID.replace(old, new, 1)
    assert raw != VALID
    assert duis.PLAIN_REQUEST.match(raw) is not None  # so the fast route's scan is what refuses it
    with pytest.raises(etree.XMLSyntaxError):
        etree.fromstring(raw, duis.PARSER)
    parsed = parse_request(raw)
    assert isinstance(parsed, ParseError)
    assert parsed.reason in {"not-well-formed", "invalid-encoding"}, parsed


# -- device messages -------------------------------------------------------------------------------


def test_device_response_with_its_srv() -> None:
    raw = response(
        f"<sr:RequestID>{USER.lower()}:{ESME}:7</sr:RequestID><sr:ResponseCode>I0</sr:ResponseCode>",
        "<sr:ResponseMessage><sr:ServiceReference>4.8</sr:ServiceReference>"
        "<sr:ServiceReferenceVariant>4.8.1</sr:ServiceReferenceVariant>"
        "<sr:GBCSPayload>AA==</sr:GBCSPayload></sr:ResponseMessage>",
    )
    assert parse_device_message(raw) == DeviceMessage(
        DeviceMessageKind.RESPONSE, "I0", RequestId(USER, ESME, 7), "4.8.1", None, scheduled=False
    )


def test_dcc_scheduled_execution_is_marked() -> None:
    raw = response(
        f"<sr:RequestID>{USER}:{ESME}:8</sr:RequestID><sr:ResponseCode>I0</sr:ResponseCode>",
        "<sr:ResponseMessage><sr:ServiceReference>4.6</sr:ServiceReference>"
        "<sr:ServiceReferenceVariant>4.6.1</sr:ServiceReferenceVariant><sr:DSPScheduledMessage>"
        "<sr:GBCSPayload>AA==</sr:GBCSPayload><sr:DSPScheduleID>12</sr:DSPScheduleID>"
        "</sr:DSPScheduledMessage></sr:ResponseMessage>",
    )
    parsed = parse_device_message(raw)
    assert isinstance(parsed, DeviceMessage)
    assert (parsed.kind, parsed.srv, parsed.scheduled) == (DeviceMessageKind.RESPONSE, "4.6.1", True)


def test_device_alert_code_is_upper_case_hex() -> None:
    raw = ALERT.replace(b"8F0A", b"8f0a").replace(
        b"<sr:ResponseCode>", f"<sr:ResponseID>{ESME}:{DCC}:3</sr:ResponseID><sr:ResponseCode>".encode()
    )
    assert parse_device_message(raw) == DeviceMessage(
        DeviceMessageKind.DEVICE_ALERT, "I0", None, None, "8F0A"
    )


def test_future_dated_alert_is_a_device_alert_with_its_srv() -> None:
    raw = response(
        f"<sr:RequestID>{USER}:{ESME}:9</sr:RequestID><sr:ResponseCode>I0</sr:ResponseCode>",
        "<sr:ResponseMessage><sr:ServiceReference>4.1</sr:ServiceReference>"
        "<sr:ServiceReferenceVariant>4.1.1</sr:ServiceReferenceVariant><sr:FutureDatedDeviceAlertMessage>"
        "<sr:FutureDatedAlertCode>8F66</sr:FutureDatedAlertCode><sr:GBCSPayload>AA==</sr:GBCSPayload>"
        "<sr:InstructionNumber>1</sr:InstructionNumber><sr:TotalCommandInstructions>1</sr:TotalCommandInstructions>"
        "</sr:FutureDatedDeviceAlertMessage></sr:ResponseMessage>",
    )
    assert parse_device_message(raw) == DeviceMessage(
        DeviceMessageKind.DEVICE_ALERT, "I0", RequestId(USER, ESME, 9), "4.1.1", "8F66"
    )


def test_dcc_alert() -> None:
    raw = response(
        "<sr:ResponseCode>I0</sr:ResponseCode>",
        "<sr:DCCAlertMessage><sr:DCCAlertCode>AD1</sr:DCCAlertCode><sr:DCCAlert/></sr:DCCAlertMessage>",
    )
    assert parse_device_message(raw) == DeviceMessage(DeviceMessageKind.DCC_ALERT, "I0", None, None, "AD1")


# -- hostile input: properties ---------------------------------------------------------------------

EUIS = st.lists(st.sampled_from("0123456789ABCDEFabcdef"), min_size=16, max_size=16).map(
    lambda digits: "-".join("".join(digits[i : i + 2]) for i in range(0, 16, 2))
)


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "secret.txt"
    # Read as text it is the secret; read as a DTD it declares &leak; as the secret.
    path.write_text(f'<!ENTITY leak "{SECRET}">', encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def listener() -> Iterator[socket.socket]:
    """A local TCP port that records whether anything connected to it."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def assert_no_connection(server: socket.socket) -> None:
    # A completed local TCP handshake sits in the backlog before connect() returns to its caller.
    with pytest.raises(BlockingIOError):
        server.accept()


def assert_contained(parsed: object, secret: str = SECRET) -> None:
    """Never raises (we got here), a known outcome, no internal failure, and nothing of the secret."""
    assert isinstance(parsed, (ServiceRequest, DeviceMessage, ParseError))
    if isinstance(parsed, ParseError):
        assert parsed.reason in PARSE_ERROR_REASONS
        assert parsed.reason != "parser-failure", parsed
    for field in fields(parsed):
        if field.name != "raw":  # the input itself, which names the file
            assert secret not in repr(getattr(parsed, field.name))


@pytest.fixture
def no_python_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object) -> None:
        pytest.fail("the parser opened a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


HOSTILE = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@HOSTILE
@given(raw=st.sampled_from(SAMPLE_BYTES), originator=EUIS, target=EUIS, counter=st.integers(0, MAX_COUNTER))
def test_valid_requests_with_any_request_id_parse(
    raw: bytes, originator: str, target: str, counter: int
) -> None:
    parsed = parse_request(with_request_id(raw, f"{originator}:{target}:{counter}"))
    assert isinstance(parsed, ServiceRequest)
    assert parsed.request_id == RequestId(Eui(originator.upper()), Eui(target.upper()), counter)


@HOSTILE
@given(raw=st.sampled_from(SAMPLE_BYTES), data=st.data())
def test_truncated_requests_never_raise(raw: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, raw.rindex(b">") - 1))
    parsed = parse_request(raw[:cut])
    assert_contained(parsed)
    assert isinstance(parsed, ParseError)


@HOSTILE
@given(raw=st.sampled_from(SAMPLE_BYTES), data=st.data())
def test_mutated_requests_never_raise(raw: bytes, data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(raw)))
    inserted = data.draw(st.binary(max_size=16))
    removed = data.draw(st.integers(0, 8))
    assert_contained(parse_request(raw[:position] + inserted + raw[position + removed :]))
    assert_contained(parse_device_message(raw[:position] + inserted + raw[position + removed :]))


@HOSTILE
@given(
    raw=st.sampled_from(SAMPLE_BYTES),
    namespace=st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=40),
)
def test_any_other_namespace_is_refused(raw: bytes, namespace: str) -> None:
    parsed = parse_request(raw.replace(duis.NAMESPACE.encode(), f"urn:{namespace}".encode()))
    assert isinstance(parsed, ParseError)
    assert parsed.reason == "wrong-namespace"


@HOSTILE
@given(raw=st.sampled_from(SAMPLE_BYTES), extra=st.integers(1, 2**20), limit=st.integers(1, 4096))
def test_anything_over_the_limit_is_refused_before_parsing(raw: bytes, extra: int, limit: int) -> None:
    padded = raw + b" " * max(0, limit - len(raw)) + b" " * extra
    parsed = parse_request(padded, max_bytes=len(padded) - extra)
    assert parsed == ParseError("too-large", f"{len(padded)} bytes, over the limit of {len(padded) - extra}")


def test_a_huge_request_over_the_default_limit_is_refused() -> None:
    huge = VALID.replace(b"<sr:Body>", b"<sr:Body>" + b"<!-- padding -->" * 70_000)
    assert len(huge) > duis.DEFAULT_MAX_BYTES
    parsed = parse_request(huge)
    assert isinstance(parsed, ParseError)
    assert parsed.reason == "too-large"


@HOSTILE
@given(
    name=st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True),
    value=st.text(st.characters(codec="ascii", categories=["L", "N"]), max_size=30),
)
def test_internal_entities_are_refused(name: str, value: str, no_python_sockets: None) -> None:
    raw = VALID.replace(
        b"<sr:Request ", f'<!DOCTYPE sr:Request [<!ENTITY {name} "{value}">]>\n<sr:Request '.encode()
    )
    raw = raw.replace(b">4.8.1<", f">&{name};<".encode())
    assert parse_request(raw) == ParseError(
        "doctype-forbidden", "DUIS documents have no DOCTYPE (DTDs and entities refused)"
    )


def billion_laughs() -> bytes:
    entities = '<!ENTITY lol0 "lol">' + "".join(
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)
    )
    return VALID.replace(
        b"<sr:Request ", f"<!DOCTYPE sr:Request [{entities}]>\n<sr:Request ".encode()
    ).replace(b">4.8.1<", b">&lol9;<")


PROLOG_ITEMS = st.lists(
    st.sampled_from(
        ["\n", "  ", "<?pi data?>", "<!-- note -->", "<!-- <sr:Request> ? > -->", "<?pi <!-- ?>"]
    ),
    max_size=12,
)
BYTE_CHECK = ParseError("doctype-forbidden", "DUIS documents have no DOCTYPE (DTDs and entities refused)")


@HOSTILE
@given(items=PROLOG_ITEMS)
def test_a_doctype_after_any_prolog_is_caught_before_parsing(items: list[str]) -> None:
    body = VALID.split(b"?>", 1)[1]
    raw = b'<?xml version="1.0" encoding="UTF-8"?>' + "".join(items).encode()
    assert parse_request(raw + b'<!DOCTYPE sr:Request [<!ENTITY e "x">]>' + body) == BYTE_CHECK
    assert isinstance(parse_request(raw + body), ServiceRequest)


def test_doctype_text_outside_the_prolog_is_just_text() -> None:
    in_prolog_comment = VALID.replace(b"?>", b"?><!-- <!DOCTYPE x> -->", 1)
    in_cdata = VALID.replace(b"</sr:Body>", b"<![CDATA[<!DOCTYPE y>]]></sr:Body>")
    in_body_comment = VALID.replace(b"</sr:Body>", b"<!-- <!DOCTYPE z> --></sr:Body>")
    for raw in (in_prolog_comment, in_cdata, in_body_comment):
        parsed = parse_request(raw)
        assert isinstance(parsed, ServiceRequest), parsed
        assert parsed.srv == "4.8.1"


def test_billion_laughs_is_refused() -> None:
    parsed = parse_request(billion_laughs())
    assert isinstance(parsed, ParseError)
    assert parsed.reason == "doctype-forbidden"


def external_dtds(secret_file: Path, port: int) -> list[str]:
    """DOCTYPEs that would pull in the secret file or reach the network if anything resolved them."""
    file, web = secret_file.as_uri(), f"http://127.0.0.1:{port}"
    return [
        (
            f'<!DOCTYPE sr:Request [<!ENTITY leak SYSTEM "{file}"><!ENTITY web SYSTEM "{web}/x">'
            '<!ENTITY discard SYSTEM "http://127.0.0.1:9/">]>'
        ),
        f'<!DOCTYPE sr:Request [<!ENTITY % defs SYSTEM "{file}"> %defs;]>',
        f'<!DOCTYPE sr:Request [<!ENTITY % remote SYSTEM "{web}/dtd"> %remote;]>',
        f'<!DOCTYPE sr:Request SYSTEM "{file}">',
        f'<!DOCTYPE sr:Request PUBLIC "-//MP169//x" "{web}/dtd">',
    ]


def with_dtd(dtd: str, where: str = "ServiceReferenceVariant") -> bytes:
    raw = VALID.decode().replace("<sr:Request ", f"{dtd}\n<sr:Request ")
    return re.sub(f"<sr:{where}>[^<]*<", f"<sr:{where}>&leak;<", raw).encode()


@HOSTILE
@given(
    which=st.integers(0, 4),
    where=st.sampled_from(["RequestID", "ServiceReferenceVariant", "CommandVariant"]),
    encoding=st.sampled_from(["utf-8", "utf-16", "utf-16-le"]),
)
def test_external_entities_never_read_a_file_or_the_network(
    which: int, where: str, encoding: str, secret_file: Path, listener: socket.socket, no_python_sockets: None
) -> None:
    dtd = external_dtds(secret_file, listener.getsockname()[1])[which]
    parsed = parse_request(with_dtd(dtd, where).decode().encode(encoding))
    assert_contained(parsed)
    assert isinstance(parsed, ParseError)
    assert_no_connection(listener)


def parsed_directly(raw: bytes) -> str:
    """The hardened parser's output for raw, or its error message: what could leak either way."""
    try:
        return etree.tostring(etree.fromstring(raw, duis.PARSER)).decode()
    except etree.XMLSyntaxError as exc:  # e.g. "Attempt to load network entity", amplification limit
        return str(exc)


def test_the_hardened_parser_itself_resolves_nothing(
    secret_file: Path, listener: socket.socket, no_python_sockets: None
) -> None:
    # Even without the DOCTYPE check in front, the parser neither reads the file nor connects.
    for dtd in external_dtds(secret_file, listener.getsockname()[1]):
        assert SECRET not in parsed_directly(with_dtd(dtd))
        assert_no_connection(listener)
    assert len(parsed_directly(billion_laughs())) < 2 * len(billion_laughs())


@HOSTILE
@given(raw=st.binary(max_size=4096))
def test_random_bytes_never_raise(raw: bytes, no_python_sockets: None) -> None:
    assert_contained(parse_request(raw))
    assert_contained(parse_device_message(raw))


@HOSTILE
@given(prefix=st.sampled_from([b"", b'<?xml version="1.0"?>', VALID[:200]]), tail=st.binary(max_size=512))
def test_xml_looking_prefixes_with_random_tails_never_raise(prefix: bytes, tail: bytes) -> None:
    assert_contained(parse_request(prefix + tail))
    assert_contained(parse_device_message(prefix + tail))


def tree_route(raw: bytes) -> ServiceRequest | ParseError | None:
    """The request as the tree route reads it, or None where the hardened tree parser refuses the bytes."""
    try:
        root = etree.fromstring(raw, duis.PARSER)
    except etree.XMLSyntaxError:
        return None
    return parse_request_tree(root, raw)


def assert_routes_agree(raw: bytes) -> None:
    """Whatever the bytes, the fast route answers as the tree route does, or refuses what it refuses."""
    parsed = parse_request(raw)
    assert_contained(parsed)
    expected = tree_route(raw)
    if expected is None or len(raw) > duis.DEFAULT_MAX_BYTES:
        assert isinstance(parsed, ParseError)
    else:
        assert parsed == expected


@HOSTILE
@given(raw=st.sampled_from(SAMPLE_BYTES), data=st.data())
def test_mutations_after_the_header_are_refused_exactly_when_a_tree_parse_refuses_them(
    raw: bytes, data: st.DataObject
) -> None:
    body = raw.index(b"</sr:Header>") + len(b"</sr:Header>")
    position = data.draw(st.integers(body, len(raw)))
    inserted = data.draw(
        st.sampled_from([b"<", b">", b"&", b"</x>", b"<x>", b"<!--", b"]]>", b"\xff", b"\x00", b""])
    )
    removed = data.draw(st.integers(0, 4))
    assert_routes_agree(raw[:position] + inserted + raw[position + removed :])


@HOSTILE
@given(raw=st.sampled_from(SAMPLE_BYTES), data=st.data())
def test_the_fast_and_tree_routes_agree_on_any_mutation(raw: bytes, data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(raw)))
    inserted = data.draw(st.binary(max_size=16) | st.sampled_from(HEADER_PIECES))
    removed = data.draw(st.integers(0, 8))
    assert_routes_agree(raw[:position] + inserted + raw[position + removed :])


HEADER_PIECES = [
    *(field.encode() for field in HEADER_FIELDS),
    b"<!-- c -->",
    b"<sr:FirstInSequence>true</sr:FirstInSequence>",
    b' xmlns:sr="urn:x"',
    b' xmlns:sr="http://www.dccinterface.co.uk/ServiceUserGateway"',
    b' a="&amp;"',
    b"&#x34;",
    b"\r\n",
    b"<![CDATA[x]]>",
]


@HOSTILE
@given(
    fields=st.permutations(HEADER_FIELDS).flatmap(
        lambda order: st.lists(st.sampled_from(order), min_size=1, max_size=6)
    ),
    gap=st.sampled_from(["", " ", "\n  ", "<!-- c -->", "<?pi?>"]),
    prefix=st.sampled_from(["sr", "dcc", ""]),
)
def test_any_header_arrangement_gets_the_same_answer_on_both_routes(
    fields: list[str], gap: str, prefix: str
) -> None:
    raw = request(gap.join(fields), "<sr:ReadX/>")
    if prefix != "sr":
        raw = (
            raw.replace(b"sr:", f"{prefix}:".encode() if prefix else b"")
            .replace(b"xmlns::", b"xmlns:")
            .replace(b"xmlns:=", b"xmlns=")
        )
    assert_routes_agree(raw)
