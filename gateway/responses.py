"""DUIS response documents (sr:Response) that the gateway itself sends: pure builders returning bytes.

Shape (DUIS V5.4 complexType Response): Header with RequestID (absent when the request had no readable
one), ResponseCode and ResponseDateTime, then Body/ResponseMessage with ServiceReference,
ServiceReferenceVariant and optional content. The human-readable reason travels as an XML comment at the
end of the Header, so the document keeps the schema's shape. Every document is valid against DUIS V5.4,
or against its MP169 extension where it carries an MP169 code, 8.15 or the inventory flag
(gateway/schema.py): so an answer needs an SRV the schema defines, and a request whose SRV is not one
gets no answer (`answerable`), only the dead letter, as DCC sends no DUIS answer to a request that is
not valid DUIS.

Built from string templates, not a tree: one response is built per request on the hot path. Every value
is escaped, and characters XML cannot carry are replaced by U+FFFD.

The 8.2 Read Inventory answer carries the MP169 flag per device as `ReducedCommunicationsConsumerChoice`
(and `ReducedCommunicationsSetDateTime` when set): an MP169 extension in the DUIS namespace, appended to
the schema's Device element, as a DUIS release implementing MP169 would add it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from gateway.schema import SERVICE_REFERENCE_VARIANTS
from rules.codes import ResponseCode
from rules.domain import READ_INVENTORY_SRV

if TYPE_CHECKING:
    from collections.abc import Sequence

    from gateway.duis import ParseError
    from rules.domain import Eui, RequestId

SCHEMA_VERSION: Final = "5.4"
MAX_REASON_CHARS: Final = 1000

_PROLOG: Final = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<sr:Response xmlns:sr="http://www.dccinterface.co.uk/ServiceUserGateway" '
    f'schemaVersion="{SCHEMA_VERSION}"><sr:Header>'
)
# Characters outside XML 1.0's Char production (C0 controls but tab/newline/return, surrogates, FFFE/FFFF).
_NOT_XML_CHAR: Final = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True, slots=True)
class InventoryEntry:
    """One device in an 8.2 Read Inventory answer, with its MP169 flag."""

    device_id: Eui
    device_type: str
    status: str
    smets: int
    reduced_communications: bool | None
    """The MP169 flag; None: not shown to this requester (the element is left out)."""
    flag_set_at: str | None
    """ISO-8601 UTC time the flag was set, if it is set and shown."""


def response_xml(  # noqa: PLR0913 - keyword-only: the fields of one DUIS response
    *,
    request_id: RequestId | None,
    code: ResponseCode | str,
    service_reference: str | None,
    srv: str,
    at: datetime,
    reason: str | None = None,
    payload: bytes | None = None,
) -> bytes:
    """An sr:Response answering `request_id` with `code` for `srv`.

    `service_reference` defaults to the SRV's first two components (4.8.1 -> 4.8). `payload` is an XML
    fragment in the sr namespace (prefix `sr`) placed after ServiceReferenceVariant.
    """
    head, tail = _frame(
        request_id=request_id, code=code, service_reference=service_reference, srv=srv, at=at, reason=reason
    )
    if payload is None:
        return (head + tail).encode()
    return head.encode() + payload + tail.encode()


def answerable(srv: str | None) -> bool:
    """Can an answer for this SRV be valid DUIS? Only if the schema (with MP169) defines the SRV."""
    return srv in SERVICE_REFERENCE_VARIANTS


def unreadable_request_answer(error: ParseError, user: Eui, at: datetime) -> bytes | None:
    """The E4 answer to a request that did not parse, or None where no valid answer can be made.

    Valid needs the RequestID (and it must be the topic user's own: a user is never told about a
    request in another's name) and an SRV the schema defines, both read from the Header before parsing
    stopped. The ServiceReference is the SRV's own, not the request's (which may be what was wrong).
    """
    if error.request_id is None or error.request_id.originator != user or not answerable(error.srv):
        return None
    assert error.srv is not None  # answerable() is False for None
    return response_xml(
        request_id=error.request_id,
        code=ResponseCode.INVALID_REQUEST,
        service_reference=None,
        srv=error.srv,
        at=at,
        reason=f"{error.reason}: {error.detail}",
    )


def flag_status_payload(device_id: Eui, *, flagged: bool) -> bytes:
    """The content of an accepted 8.15.1 / 8.15.2 answer: the device's flag after the request."""
    return (
        f"<sr:ReducedCommunicationsStatus><sr:DeviceID>{_escape(device_id)}</sr:DeviceID>"
        "<sr:ReducedCommunicationsConsumerChoice>"
        f"{'true' if flagged else 'false'}</sr:ReducedCommunicationsConsumerChoice>"
        "</sr:ReducedCommunicationsStatus>"
    ).encode()


def inventory_response_xml(
    *, request_id: RequestId, at: datetime, devices: Sequence[InventoryEntry]
) -> bytes:
    """The 8.2 Read Inventory answer (I0): DSPInventory with one Device per entry and its MP169 flag.

    DeviceManufacturer and DeviceModel are required by the schema but not held by the gateway's
    inventory: they are sent empty. With no device there is no DSPInventory (it needs at least one).
    """
    head, tail = _frame(
        request_id=request_id,
        code=ResponseCode.SUCCESS,
        service_reference=READ_INVENTORY_SRV,
        srv=READ_INVENTORY_SRV,
        at=at,
        reason=None,
    )
    if not devices:
        return (head + tail).encode()
    body = "".join(_device(entry) for entry in devices)
    return f"{head}<sr:DSPInventory>{body}</sr:DSPInventory>{tail}".encode()


def _device(entry: InventoryEntry) -> str:
    set_at = (
        ""
        if entry.flag_set_at is None
        else f"<sr:ReducedCommunicationsSetDateTime>{_escape(entry.flag_set_at)}"
        "</sr:ReducedCommunicationsSetDateTime>"
    )
    flag = (
        ""
        if entry.reduced_communications is None
        else "<sr:ReducedCommunicationsConsumerChoice>"
        f"{'true' if entry.reduced_communications else 'false'}"
        f"</sr:ReducedCommunicationsConsumerChoice>{set_at}"
    )
    return (
        f"<sr:Device><sr:DeviceID>{_escape(entry.device_id)}</sr:DeviceID>"
        f"<sr:DeviceType>{_escape(entry.device_type)}</sr:DeviceType>"
        f"<sr:DeviceStatus>{_escape(entry.status)}</sr:DeviceStatus>"
        "<sr:DeviceManufacturer></sr:DeviceManufacturer><sr:DeviceModel></sr:DeviceModel>"
        f"<sr:SMETSCHTSVersion>SMETS{entry.smets:d}</sr:SMETSCHTSVersion>{flag}</sr:Device>"
    )


def _frame(  # noqa: PLR0913 - the fields of one DUIS response
    *,
    request_id: RequestId | None,
    code: ResponseCode | str,
    service_reference: str | None,
    srv: str,
    at: datetime,
    reason: str | None,
) -> tuple[str, str]:
    """The document around the ResponseMessage content: (up to ServiceReferenceVariant, the rest)."""
    request_id_element = (
        "" if request_id is None else f"<sr:RequestID>{_escape(str(request_id))}</sr:RequestID>"
    )
    comment = "" if not reason else f"<!-- {_comment(reason)} -->"
    head = (
        f"{_PROLOG}{request_id_element}<sr:ResponseCode>{_escape(str(code))}</sr:ResponseCode>"
        f"<sr:ResponseDateTime>{_date_time(at)}</sr:ResponseDateTime>{comment}</sr:Header><sr:Body>"
    )
    reference = service_reference or service_reference_of(srv)
    head += (
        f"<sr:ResponseMessage><sr:ServiceReference>{_escape(reference)}</sr:ServiceReference>"
        f"<sr:ServiceReferenceVariant>{_escape(srv)}</sr:ServiceReferenceVariant>"
    )
    return head, "</sr:ResponseMessage></sr:Body></sr:Response>"


def service_reference_of(srv: str) -> str:
    """The Service Reference an SRV belongs to: its first two components (6.2.10 -> 6.2, 4.10 -> 4.10)."""
    return ".".join(srv.split(".")[:2])


def _date_time(at: datetime) -> str:
    if at.utcoffset() is None:
        raise ValueError("ResponseDateTime needs a timezone-aware datetime")
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _escape(text: str) -> str:
    # A raw carriage return would be read back as a newline (XML end-of-line handling).
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")
    return _NOT_XML_CHAR.sub("\ufffd", escaped)


def _comment(text: str) -> str:
    """Text safe inside <!-- -->: no "--" (XML forbids it there), bounded length."""
    if len(text) > MAX_REASON_CHARS:
        text = text[: MAX_REASON_CHARS - 1] + "…"
    text = _NOT_XML_CHAR.sub("\ufffd", text)
    while "--" in text:
        text = text.replace("--", "- -")
    return text
