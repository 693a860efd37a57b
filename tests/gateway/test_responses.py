"""gateway.responses: the documents validate against the DUIS V5.4 schema wherever DUIS has the words for
them; the MP169 additions (codes, 8.15, the inventory flag) are the only differences."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from gateway.duis import NAMESPACE, ParseError, parse_device_message
from gateway.responses import (
    InventoryEntry,
    answerable,
    flag_status_payload,
    inventory_response_xml,
    response_xml,
    service_reference_of,
    unreadable_request_answer,
)
from gateway.schema import SCHEMA_DIR, DuisSchema, Validity, load_schema, validate
from rules.codes import ResponseCode
from rules.domain import DeviceMessage, DeviceMessageKind, Eui, RequestId

if TYPE_CHECKING:
    from collections.abc import Iterable

SR = "{" + NAMESPACE + "}"
REQUEST_ID = RequestId(Eui("90-B3-D5-1F-30-01-00-00"), Eui("00-DB-12-34-56-78-90-A0"), 1234)
AT = datetime(2026, 3, 1, 12, 30, 5, 250_000, tzinfo=UTC)
MP169_CODES = {
    "E169",
    "E081509",
    "E16901",
    "E16902",
    "E16903",
    "E16904",
    "E16905",
    "E081501",
    "E081502",
    "E081503",
    "E081504",
    "E081505",
    "E081506",
    "E081507",
    "E081508",
    "E16910",
    "E16911",
    "E16912",
    "E16913",
    "E16914",
    "E16920",
    "E16921",
}
READER = etree.XMLParser(remove_comments=False, resolve_entities=False, no_network=True)


@pytest.fixture(scope="module")
def schema() -> etree.XMLSchema:
    """Plain DUIS V5.4."""
    return load_schema(DuisSchema.V54)


def schema_errors(schema: etree.XMLSchema, document: bytes) -> list[str]:
    """Schema violations, as "Element 'Name'" without namespaces or the long enumeration listings."""
    schema.validate(etree.fromstring(document, READER))
    entries = cast("Iterable[etree._LogEntry]", schema.error_log)  # the lxml stubs miss __iter__
    return [re.sub(r"\{[^}]*\}", "", entry.message).split(":")[0] for entry in entries]


def v54_response_codes() -> set[str]:
    tree = etree.parse(str(SCHEMA_DIR / "DUIS Schema V5.4.xsd"))
    values = tree.xpath(
        "//xs:simpleType[@name='ResponseCode']//xs:enumeration/@value",
        namespaces={"xs": "http://www.w3.org/2001/XMLSchema"},
    )
    return {str(value) for value in cast("list[str]", values)}


STANDARD_CODES = [code for code in ResponseCode if code.value in v54_response_codes()]
EXTENSION_CODES = [code for code in ResponseCode if code.value not in v54_response_codes()]


@pytest.mark.parametrize("code", STANDARD_CODES)
def test_responses_with_duis_codes_validate(schema: etree.XMLSchema, code: ResponseCode) -> None:
    document = response_xml(
        request_id=REQUEST_ID,
        code=code,
        service_reference="4.8",
        srv="4.8.1",
        at=AT,
        reason="why -- <&> \x01",
    )
    assert schema_errors(schema, document) == []


@pytest.mark.parametrize("code", EXTENSION_CODES)
def test_responses_with_mp169_codes_differ_only_in_the_code(
    schema: etree.XMLSchema, code: ResponseCode
) -> None:
    document = response_xml(
        request_id=REQUEST_ID, code=code, service_reference=None, srv="4.8.1", at=AT, reason="consumer-choice"
    )
    assert schema_errors(schema, document) == ["Element 'ResponseCode'"]
    standard = document.replace(f">{code.value}<".encode(), b">E4<")
    assert schema_errors(schema, standard) == []
    assert validate(document) == Validity(valid=True, schema=DuisSchema.MP169)


def test_flag_request_answers_add_only_the_8_15_numbers(schema: etree.XMLSchema) -> None:
    document = response_xml(
        request_id=REQUEST_ID, code=ResponseCode.FLAG_NO_WAN, service_reference=None, srv="8.15.1", at=AT
    )
    assert schema_errors(schema, document) == [
        "Element 'ResponseCode'",
        "Element 'ServiceReference'",
        "Element 'ServiceReferenceVariant'",
    ]
    assert validate(document).valid


def test_an_accepted_flag_answer_carries_the_flag_after_the_request() -> None:
    document = response_xml(
        request_id=REQUEST_ID,
        code="I0",
        service_reference=None,
        srv="8.15.1",
        at=AT,
        payload=flag_status_payload(Eui("00-DB-12-34-56-78-90-A0"), flagged=True),
    )
    assert validate(document) == Validity(valid=True, schema=DuisSchema.MP169)
    status = etree.fromstring(document, READER).find(
        f"{SR}Body/{SR}ResponseMessage/{SR}ReducedCommunicationsStatus"
    )
    assert status is not None
    assert [child.text for child in status] == ["00-DB-12-34-56-78-90-A0", "true"]


def test_the_response_shape(schema: etree.XMLSchema) -> None:
    document = response_xml(
        request_id=REQUEST_ID,
        code=ResponseCode.CONSUMER_CHOICE,
        service_reference=None,
        srv="6.2.10",
        at=datetime(2026, 3, 1, 13, 30, 5, 250_000, tzinfo=timezone(timedelta(hours=1))),
        reason="consumer-choice: refused",
    )
    root = etree.fromstring(document, READER)
    assert root.tag == f"{SR}Response"
    assert root.get("schemaVersion") == "5.4"
    header, body = root
    assert [child.tag for child in header] == [
        f"{SR}RequestID",
        f"{SR}ResponseCode",
        f"{SR}ResponseDateTime",
        etree.Comment,
    ]
    assert [child.text for child in header] == [
        str(REQUEST_ID),
        "E169",
        "2026-03-01T12:30:05.250Z",
        " consumer-choice: refused ",
    ]
    message = body[0]
    assert [(child.tag, child.text) for child in message] == [
        (f"{SR}ServiceReference", "6.2"),
        (f"{SR}ServiceReferenceVariant", "6.2.10"),
    ]


def test_a_response_reads_back_as_the_device_message_it_describes() -> None:
    document = response_xml(request_id=REQUEST_ID, code="I0", service_reference="4.8", srv="4.8.1", at=AT)
    assert parse_device_message(document) == DeviceMessage(
        DeviceMessageKind.RESPONSE, "I0", REQUEST_ID, "4.8.1", None
    )


def test_without_request_id(schema: etree.XMLSchema) -> None:
    no_request_id = response_xml(request_id=None, code="E4", service_reference="4.8", srv="4.8.1", at=AT)
    assert schema_errors(schema, no_request_id) == []
    assert b"RequestID" not in no_request_id


USER = REQUEST_ID.originator


@pytest.mark.parametrize("srv", ["4.8.1", "8.15.1"])
def test_an_unreadable_request_with_a_request_id_and_a_duis_srv_gets_a_valid_answer(srv: str) -> None:
    error = ParseError("missing-field", "Body content", REQUEST_ID, srv)
    answer = unreadable_request_answer(error, USER, AT)
    assert answer is not None
    assert validate(answer).valid
    root = etree.fromstring(answer, READER)
    assert [root[0][0].text, root[0][1].text] == [str(REQUEST_ID), ResponseCode.INVALID_REQUEST.value]
    assert root[1][0][1].text == srv
    assert root[1][0][0].text == service_reference_of(srv)


@pytest.mark.parametrize(
    "error",
    [
        ParseError("not-well-formed", "truncated"),
        ParseError("missing-field", "Header/ServiceReferenceVariant", REQUEST_ID),
        ParseError("unknown-srv", "SRV '99.9.9'", REQUEST_ID, "99.9.9"),
        ParseError(
            "missing-field",
            "Body content",
            RequestId(Eui("90-B3-D5-1F-30-01-00-09"), REQUEST_ID.target, 7),
            "4.8.1",
        ),
    ],
    ids=["nothing-readable", "no-srv", "srv-not-duis", "someone-elses-request-id"],
)
def test_no_answer_where_no_valid_one_can_be_made(error: ParseError) -> None:
    assert unreadable_request_answer(error, USER, AT) is None


def test_answerable_srvs_are_the_schemas() -> None:
    assert answerable("4.8.1")
    assert answerable("8.15.2")
    assert not answerable("99.9.9")
    assert not answerable(None)


def test_payload_sits_after_the_srv() -> None:
    payload = b"<sr:DSPScheduleID>42</sr:DSPScheduleID>"
    document = response_xml(
        request_id=REQUEST_ID, code="I0", service_reference="5.1", srv="5.1", at=AT, payload=payload
    )
    message = etree.fromstring(document, READER)[1][0]
    assert [child.tag for child in message][-1] == f"{SR}DSPScheduleID"
    assert message[-1].text == "42"


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        response_xml(request_id=None, code="E4", service_reference=None, srv="4.8.1", at=datetime(2026, 1, 1))  # noqa: DTZ001


@pytest.mark.parametrize(
    ("srv", "reference"),
    [("4.8.1", "4.8"), ("6.2.10", "6.2"), ("4.10", "4.10"), ("8.15.2", "8.15"), ("5.1", "5.1")],
)
def test_service_reference_of(srv: str, reference: str) -> None:
    assert service_reference_of(srv) == reference


@given(reason=st.text(max_size=1200))
def test_any_reason_is_a_well_formed_comment(reason: str) -> None:
    document = response_xml(
        request_id=REQUEST_ID, code="E4", service_reference="4.8", srv="4.8.1", at=AT, reason=reason
    )
    comments = list(etree.fromstring(document, READER).iter(etree.Comment))
    if not reason:
        assert comments == []
        return
    (comment,) = comments
    assert "--" not in comment.text
    assert len(comment.text) <= 1002
    if (
        "-" not in reason
        and len(reason) <= 1000
        and re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]", reason) is None
    ):
        assert comment.text == f" {reason.replace(chr(13) + chr(10), chr(10)).replace(chr(13), chr(10))} "


XML_TEXT = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\ufffe\uffff"), min_size=1
)


@given(code=XML_TEXT, srv=XML_TEXT, reference=XML_TEXT)
def test_every_value_is_escaped(code: str, srv: str, reference: str) -> None:
    document = response_xml(request_id=None, code=code, service_reference=reference, srv=srv, at=AT)
    root = etree.fromstring(document, READER)
    expected = [re.sub("[\x00-\x08\x0b\x0c\x0e-\x1f]", "\ufffd", text) for text in (code, reference, srv)]
    assert [root[0][0].text, root[1][0][0].text, root[1][0][1].text] == expected


# -- 8.2 Read Inventory ----------------------------------------------------------------------------

ENTRIES = [
    InventoryEntry(Eui("00-DB-12-34-56-78-90-A0"), "ESME", "Commissioned", 2, True, "2026-02-01T09:00:00Z"),
    InventoryEntry(Eui("00-DB-12-34-56-78-90-A1"), "GSME", "InstalledNotCommissioned", 2, False, None),
    InventoryEntry(Eui("00-DB-12-34-56-78-90-A2"), "CHF", "Commissioned", 2, False, None),
]
EXTENSION = re.compile(rb"<sr:ReducedCommunications(\w+)>[^<]*</sr:ReducedCommunications\1>")


def test_inventory_follows_dsp_inventory_plus_the_mp169_flag(schema: etree.XMLSchema) -> None:
    document = inventory_response_xml(request_id=REQUEST_ID, at=AT, devices=ENTRIES)
    assert schema_errors(schema, EXTENSION.sub(b"", document)) == []
    assert validate(document) == Validity(valid=True, schema=DuisSchema.MP169)
    root = etree.fromstring(document, READER)
    assert root[0][1].text == "I0"
    inventory = root.find(f"{SR}Body/{SR}ResponseMessage/{SR}DSPInventory")
    assert inventory is not None
    rows = [
        (
            device.findtext(f"{SR}DeviceID"),
            device.findtext(f"{SR}DeviceType"),
            device.findtext(f"{SR}DeviceStatus"),
            device.findtext(f"{SR}SMETSCHTSVersion"),
            device.findtext(f"{SR}ReducedCommunicationsConsumerChoice"),
            device.findtext(f"{SR}ReducedCommunicationsSetDateTime"),
        )
        for device in inventory
    ]
    assert rows == [
        ("00-DB-12-34-56-78-90-A0", "ESME", "Commissioned", "SMETS2", "true", "2026-02-01T09:00:00Z"),
        ("00-DB-12-34-56-78-90-A1", "GSME", "InstalledNotCommissioned", "SMETS2", "false", None),
        ("00-DB-12-34-56-78-90-A2", "CHF", "Commissioned", "SMETS2", "false", None),
    ]


def test_inventory_extension_is_the_only_schema_difference(schema: etree.XMLSchema) -> None:
    document = inventory_response_xml(request_id=REQUEST_ID, at=AT, devices=ENTRIES[:1])
    assert schema_errors(schema, document) == ["Element 'ReducedCommunicationsConsumerChoice'"]


def test_inventory_without_devices_has_no_dsp_inventory(schema: etree.XMLSchema) -> None:
    document = inventory_response_xml(request_id=REQUEST_ID, at=AT, devices=[])
    assert b"DSPInventory" not in document
    assert schema_errors(schema, document) == []


def test_inventory_values_are_escaped() -> None:
    odd = InventoryEntry(Eui("00-DB-12-34-56-78-90-A0"), "<ESME&>", "Commissioned", 1, False, "</x>")
    root = etree.fromstring(inventory_response_xml(request_id=REQUEST_ID, at=AT, devices=[odd]), READER)
    device = root.find(f"{SR}Body/{SR}ResponseMessage/{SR}DSPInventory/{SR}Device")
    assert device is not None
    assert device.findtext(f"{SR}DeviceType") == "<ESME&>"
    assert device.findtext(f"{SR}SMETSCHTSVersion") == "SMETS1"
    assert device.findtext(f"{SR}ReducedCommunicationsSetDateTime") == "</x>"
