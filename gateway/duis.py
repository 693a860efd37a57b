"""Parse DUIS XML from untrusted senders: Service Requests (sr:Request) and device messages (sr:Response).

Both parsers are pure and total: any input gives a model value or a `ParseError`, never an exception.
Hardening, in the order it is applied:

1. size: anything over `max_bytes` is refused before parsing (`too-large`);
2. DTDs: DUIS never carries a DOCTYPE, so one in the prolog (the only place one can stand) is refused
   on the bytes, before parsing, and the parsed document is checked again (`doctype-forbidden`): no
   entity declaration, internal or external, reaches the parser's entity handling;
3. one module-level parser that never resolves entities, loads DTDs or touches the network, keeps
   libxml2's depth and size limits (no huge_tree), drops comments and processing instructions, and
   reads every document as UTF-8 (`invalid-encoding`, `not-well-formed`).

The hot path reads the Header (by position when it is the usual four fields, else by tag) and, for
device requests (CommandVariant 1-7), only the Body's first element name: never the body content.
Non-device requests (CommandVariant 8) also read the direct children of the Body element that name
devices (DeviceID, DeviceIDList) or a scheduled SRV.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

from lxml import etree

from rules.domain import (
    FLAG_CLEAR_SRV,
    FLAG_SET_SRV,
    MAX_COUNTER,
    NON_DEVICE_COMMAND_VARIANT,
    DeviceMessage,
    DeviceMessageKind,
    Eui,
    FlagInstruction,
    RequestId,
    ServiceRequest,
    parse_eui,
)

if TYPE_CHECKING:
    from collections.abc import Callable

NAMESPACE: Final = "http://www.dccinterface.co.uk/ServiceUserGateway"
DEFAULT_MAX_BYTES: Final = 1_048_576
CONSUMER_REFERENCE_MAX_CHARS: Final = 64

PARSER: Final = etree.XMLParser(
    encoding="utf-8",  # DUIS is UTF-8: a declared other encoding is not honoured
    resolve_entities=False,
    no_network=True,
    load_dtd=False,
    dtd_validation=False,
    huge_tree=False,
    remove_comments=True,
    remove_pis=True,
    collect_ids=False,
    # Not hardening: whitespace-only text between elements is never read, and not building those
    # nodes saves an eighth of every parse. The text of a leaf element is kept, blanks or not.
    remove_blank_text=True,
)
"""The one hardened parser. Parsing is synchronous and a parser serves one thread at a time: fine for
the single-threaded asyncio gateway."""

PARSE_ERROR_REASONS: Final[dict[str, str]] = {
    "too-large": "The document is larger than the configured limit (checked before parsing).",
    "doctype-forbidden": "The document has a DOCTYPE (DTD, entity declarations): DUIS never does.",
    "invalid-encoding": "The bytes are not valid UTF-8.",
    "not-well-formed": "Not well-formed XML (includes truncated input and libxml2's nesting limit).",
    "wrong-namespace": "An sr element (root or Body content) is not in the DUIS namespace.",
    "wrong-root": "The root element is not sr:Request (requests) or sr:Response (device messages).",
    "missing-field": "A required element (Header, RequestID, CommandVariant, ServiceReference, "
    "ServiceReferenceVariant, Body content, ResponseCode, a flag body's DeviceID...) is absent or empty.",
    "bad-request-id": "RequestID is not 'EUI:EUI:counter' with a decimal counter 0..2**64-1, no "
    "leading zeros.",
    "bad-command-variant": "CommandVariant is not 1 to 8.",
    "bad-device-id": "A DeviceID or DeviceIDList entry in the Body is not an EUI-64.",
    "wrong-body": "The Body element does not fit the message: an 8.15.1 / 8.15.2 request without its "
    "SetReducedCommunications / RemoveReducedCommunications body, or a device message whose Body is "
    "not ResponseMessage, DeviceAlertMessage or DCCAlertMessage.",
    "invalid-field": "A field has an impossible value: ConsumerReference over 64 characters, a "
    "ResponseCode, AlertCode or DCCAlertCode of the wrong shape.",
    "parser-failure": "An unexpected failure inside the parser (a bug): reported, never raised.",
}
"""Every ParseError reason with its meaning (docs/duis.md lists them)."""


@dataclass(frozen=True, slots=True)
class ParseError:
    """Why a document was not accepted; `request_id` is set when the Header's RequestID was readable."""

    reason: str
    detail: str
    request_id: RequestId | None = None


_NS: Final = "{" + NAMESPACE + "}"
_NS_LENGTH: Final = len(_NS)
_REQUEST: Final = _NS + "Request"
_RESPONSE: Final = _NS + "Response"
_HEADER: Final = _NS + "Header"
_BODY: Final = _NS + "Body"
_REQUEST_ID: Final = _NS + "RequestID"
_COMMAND_VARIANT: Final = _NS + "CommandVariant"
_SERVICE_REFERENCE: Final = _NS + "ServiceReference"
_SRV: Final = _NS + "ServiceReferenceVariant"
_DEVICE_ID: Final = _NS + "DeviceID"
_DEVICE_ID_LIST: Final = _NS + "DeviceIDList"
_SCHEDULED_SRV: Final = _NS + "DSPScheduledServiceReferenceVariant"
_ALL_REASONABLE_STEPS_TAKEN: Final = _NS + "AllReasonableStepsTaken"
_CONSUMER_REFERENCE: Final = _NS + "ConsumerReference"
_RESPONSE_CODE: Final = _NS + "ResponseCode"
_RESPONSE_MESSAGE: Final = _NS + "ResponseMessage"
_DSP_SCHEDULED_MESSAGE: Final = _NS + "DSPScheduledMessage"
_FUTURE_DATED_ALERT: Final = _NS + "FutureDatedDeviceAlertMessage"
_FUTURE_DATED_ALERT_CODE: Final = _NS + "FutureDatedAlertCode"
_DEVICE_ALERT: Final = _NS + "DeviceAlertMessage"
_ALERT_CODE: Final = _NS + "AlertCode"
_DCC_ALERT: Final = _NS + "DCCAlertMessage"
_DCC_ALERT_CODE: Final = _NS + "DCCAlertCode"

_FLAG_BODIES: Final = {
    FLAG_SET_SRV: "SetReducedCommunications",
    FLAG_CLEAR_SRV: "RemoveReducedCommunications",
}
_COMMAND_VARIANTS: Final = {str(value): value for value in range(1, NON_DEVICE_COMMAND_VARIANT + 1)}
_XS_TRUE: Final = frozenset({"true", "1"})
# Schema type RequestIDType; the counter's digit-by-digit range 0..2**64-1 is checked as an integer.
# Matched after upper-casing; written out pair by pair, which sre matches a third faster than a
# repeated group (this runs once per request).
_EUI_PATTERN: Final = "-".join(["[0-9A-F][0-9A-F]"] * 8)
_REQUEST_ID_RE: Final = re.compile(f"({_EUI_PATTERN}):({_EUI_PATTERN}):(0|[1-9][0-9]{{0,19}})")
_RESPONSE_CODE_RE: Final = re.compile(r"[A-Z][0-9]{1,6}")
_ALERT_CODE_RE: Final = re.compile(r"[0-9A-Fa-f]{4}")  # GBCS alert codes are two bytes
_DCC_ALERT_CODE_RE: Final = re.compile(r"[A-Z]{1,3}[0-9]{1,4}")  # AD1, N1 ... N999
_XML_BLANKS: Final = " \t\r\n"  # what xs:token collapses; str.strip() alone would take any Unicode space
_MAX_DETAIL: Final = 200
_PROLOG_ITEMS: Final = 8
_HEADER_FIELDS: Final = 4  # RequestID, CommandVariant, ServiceReference, ServiceReferenceVariant
# The usual prolog: an optional BOM and XML declaration, blanks, then the root's start tag. A PI ends at
# its first "?>", and [^>]* cannot pass one, so a match leaves no room for a DOCTYPE.
_PLAIN_PROLOG: Final = re.compile(rb"(?:\xef\xbb\xbf)?(?:<\?[^>]*\?>)?[ \t\r\n]*<[A-Za-z_]")


def parse_request_id(text: str) -> RequestId | None:
    """A DUIS RequestID 'originator EUI:target EUI:counter' (xs:token: outer blanks go); None if not one.

    EUIs come back in DUIS upper-case form, as `parse_eui` gives them.
    """
    text = text.strip(_XML_BLANKS)
    # ASCII first: upper() maps some other characters onto ASCII letters (U+FB00 -> "FF").
    match = _REQUEST_ID_RE.fullmatch(text.upper()) if text.isascii() else None
    if match is None:
        return None
    originator, target, counter = match.groups()
    value = int(counter)
    if value > MAX_COUNTER:
        return None
    return RequestId(Eui(originator), Eui(target), value)


_Parsed = TypeVar("_Parsed", ServiceRequest, DeviceMessage)


def parse_request(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> ServiceRequest | ParseError:
    """Parse a DUIS Service Request: the Header, and what routing needs from the Body."""
    return _parse(data, max_bytes, _request)


def parse_device_message(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> DeviceMessage | ParseError:
    """Parse a DUIS sr:Response from a device or the DCC: a response, a device alert or a DCC alert."""
    return _parse(data, max_bytes, _device_message)


def _parse(
    data: bytes, max_bytes: int, build: Callable[[etree._Element, bytes], _Parsed | ParseError]
) -> _Parsed | ParseError:
    try:
        root = _parse_document(data, max_bytes)
        if isinstance(root, ParseError):
            return root
        return build(root, data)
    except Exception as exc:  # noqa: BLE001 - untrusted input: the contract is to never raise
        return _internal_failure(exc)


def _internal_failure(exc: Exception) -> ParseError:
    return ParseError("parser-failure", _clip(f"{type(exc).__name__}: {exc}"))


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"


def _parse_document(data: bytes, max_bytes: int) -> etree._Element | ParseError:
    if len(data) > max_bytes:
        return ParseError("too-large", f"{len(data)} bytes, over the limit of {max_bytes}")
    if declares_doctype(data):
        return ParseError("doctype-forbidden", "DUIS documents have no DOCTYPE (DTDs and entities refused)")
    try:
        root = etree.fromstring(data, PARSER)
    except etree.XMLSyntaxError as exc:
        return _syntax_error(data, exc)
    if has_doctype(root):
        return ParseError("doctype-forbidden", "the parsed document declares a DOCTYPE")
    return root


def declares_doctype(data: bytes) -> bool:
    """Does the prolog of this UTF-8 document hold a DOCTYPE? Checked on the bytes, before any parsing.

    A DOCTYPE may only stand in the prolog, before the root element (anywhere later the parser stops at
    it as not well-formed), and cannot be spelled other than `<!DOCTYPE` in UTF-8. So skipping the XML
    declaration, processing instructions and comments up to the first other markup is exact, and costs
    the same for a 1 MiB firmware image as for a 2 KiB read. A prolog of more than a few such items
    (a DUIS document has one) is searched whole, so a crafted prolog cannot make this loop long.
    """
    if _PLAIN_PROLOG.match(data) is not None:
        return False  # the common case in one C call; the loop below gives the same answer
    position = data.find(b"<")
    for _ in range(_PROLOG_ITEMS):
        if position == -1:
            return False
        if data.startswith(b"<?", position):
            end = data.find(b"?>", position + 2)
        elif data.startswith(b"<!--", position):
            end = data.find(b"-->", position + 4)
        else:
            return data.startswith(b"<!DOCTYPE", position)
        if end == -1:
            return False  # unterminated: not well-formed, the parser stops there
        position = data.find(b"<", end)
    return b"<!DOCTYPE" in data


def has_doctype(root: etree._Element) -> bool:
    """Second line of defence behind the byte check: does the parsed document carry a DTD?"""
    return root.getroottree().docinfo.internalDTD is not None


def _syntax_error(data: bytes, exc: etree.XMLSyntaxError) -> ParseError:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as bad:
        offending = data[bad.start : bad.start + 1]
        return ParseError("invalid-encoding", f"not UTF-8: byte {bad.start} ({offending!r})")
    return ParseError("not-well-formed", _clip(" ".join(str(exc.msg).split())))


def _root_error(root: etree._Element, expected: str) -> ParseError:
    qname = etree.QName(root)
    if qname.localname == expected:
        return ParseError(
            "wrong-namespace",
            _clip(f"{expected} in namespace {qname.namespace or '(none)'!r}, not {NAMESPACE}"),
        )
    return ParseError("wrong-root", _clip(f"root element is {qname.localname!r}, not sr:{expected}"))


def _header_and_body(root: etree._Element) -> tuple[etree._Element, etree._Element] | ParseError:
    """Header and Body by position, as the schema orders them (a Signature may follow)."""
    if len(root) < 2:
        return ParseError("missing-field", "Header and Body (the root's first two elements)")
    header, body = root[0], root[1]
    if header.tag != _HEADER:
        return ParseError("missing-field", "Header (the root's first element)")
    if body.tag != _BODY:
        return ParseError("missing-field", "Body (the root's second element)")
    return header, body


def _bad_request_id(text: str) -> ParseError:
    return ParseError("bad-request-id", _clip(f"RequestID is not EUI:EUI:counter: {text.strip()!r}"))


def _text(element: etree._Element) -> str:
    text = element.text
    return "" if text is None else text.strip(_XML_BLANKS)


# -- Service Requests ---------------------------------------------------------------------------


def _request(root: etree._Element, data: bytes) -> ServiceRequest | ParseError:  # noqa: C901, PLR0911, PLR0912
    # The hot path: every Service Request passes here, so text reads are inline and the Body content
    # of a device request is never touched.
    if root.tag != _REQUEST:
        return _root_error(root, "Request")
    parts = _header_and_body(root)
    if isinstance(parts, ParseError):
        return parts
    header, body = parts
    request_id_text: str | None
    command_variant_text: str | None
    service_reference: str | None
    srv: str | None
    # The usual Header is exactly the four fields in schema order: four indexed reads cost half an
    # iteration over the children, and find what the walk by tag would. Anything else (the optional
    # FirstInSequence, PrecedingServiceRequestID, a missing or repeated field) is read by tag.
    if (
        len(header) == _HEADER_FIELDS
        and (request_id_element := header[0]).tag == _REQUEST_ID
        and (command_variant_element := header[1]).tag == _COMMAND_VARIANT
        and (service_reference_element := header[2]).tag == _SERVICE_REFERENCE
        and (srv_element := header[3]).tag == _SRV
    ):
        request_id_text = request_id_element.text or ""
        command_variant_text = (command_variant_element.text or "").strip(_XML_BLANKS)
        service_reference = (service_reference_element.text or "").strip(_XML_BLANKS)
        srv = (srv_element.text or "").strip(_XML_BLANKS)
    else:
        request_id_text, command_variant_text, service_reference, srv = _header_by_tag(header)
    if request_id_text is None:
        return ParseError("missing-field", "Header/RequestID")
    request_id = parse_request_id(request_id_text)
    if request_id is None:
        return _bad_request_id(request_id_text)
    if command_variant_text is None:
        return ParseError("missing-field", "Header/CommandVariant", request_id)
    command_variant = _COMMAND_VARIANTS.get(command_variant_text)
    if command_variant is None:
        return ParseError("bad-command-variant", _clip(f"{command_variant_text!r} is not 1 to 8"), request_id)
    if not service_reference:
        return ParseError("missing-field", "Header/ServiceReference", request_id)
    if not srv:
        return ParseError("missing-field", "Header/ServiceReferenceVariant", request_id)
    if len(body) == 0:
        return ParseError("missing-field", "Body content", request_id)
    element = body[0]
    tag = element.tag
    if not isinstance(tag, str) or not tag.startswith(_NS):
        return ParseError("wrong-namespace", "the Body element is not in the DUIS namespace", request_id)
    body_element = tag[_NS_LENGTH:]

    scheduled_srv: str | None = None
    flag = None
    if command_variant == NON_DEVICE_COMMAND_VARIANT:
        named = _named_devices(element)
        if isinstance(named, ParseError):
            return ParseError(named.reason, named.detail, request_id)
        concerned, scheduled_srv = named
    else:
        concerned = (request_id.target,)
    if srv in _FLAG_BODIES:
        parsed_flag = _flag(element, body_element, srv)
        if isinstance(parsed_flag, ParseError):
            return ParseError(parsed_flag.reason, parsed_flag.detail, request_id)
        flag = parsed_flag
    # Positional: keyword arguments cost a third more on this path (field order is ServiceRequest's).
    return ServiceRequest(
        request_id,
        command_variant,
        service_reference,
        srv,
        body_element,
        concerned,
        scheduled_srv,
        flag,
        data,
    )


def _header_by_tag(header: etree._Element) -> tuple[str | None, str | None, str | None, str | None]:
    """RequestID (as written), CommandVariant, ServiceReference, SRV (blanks stripped; None: absent).

    The last of a repeated field counts.
    """
    request_id_text = command_variant_text = service_reference_text = srv_text = None
    for child in header:
        tag = child.tag
        if tag == _REQUEST_ID:
            request_id_text = child.text or ""
        elif tag == _COMMAND_VARIANT:
            command_variant_text = _text(child)
        elif tag == _SERVICE_REFERENCE:
            service_reference_text = _text(child)
        elif tag == _SRV:
            srv_text = _text(child)
    return request_id_text, command_variant_text, service_reference_text, srv_text


def _named_devices(element: etree._Element) -> tuple[tuple[Eui, ...], str | None] | ParseError:
    """Devices a non-device request names (direct DeviceID / DeviceIDList children), and a 5.1 schedule's SRV.

    DeviceIDList is comma-separated (schema type DeviceIDList). Other EUIs in bodies (8.14.3
    OtherDeviceID, 8.13 OriginalRequestID) are context, not the devices the request acts on.
    """
    devices: list[Eui] = []
    scheduled_srv = None
    try:
        for child in element:
            tag = child.tag
            if tag == _DEVICE_ID:
                devices.append(parse_eui(_text(child)))
            elif tag == _DEVICE_ID_LIST:
                devices.extend(parse_eui(item.strip(_XML_BLANKS)) for item in _text(child).split(","))
            elif tag == _SCHEDULED_SRV:
                scheduled_srv = _text(child) or None
    except ValueError as exc:
        return ParseError("bad-device-id", _clip(str(exc)))
    return tuple(dict.fromkeys(devices)), scheduled_srv


def _flag(element: etree._Element, body_element: str, srv: str) -> FlagInstruction | ParseError:
    expected = _FLAG_BODIES[srv]
    if body_element != expected:
        return ParseError("wrong-body", f"SRV {srv} needs an sr:{expected} body, not {body_element!r}")
    device_text = declaration = consumer_reference = None
    for child in element:
        tag = child.tag
        if tag == _DEVICE_ID:
            device_text = _text(child)
        elif tag == _ALL_REASONABLE_STEPS_TAKEN:
            declaration = _text(child)
        elif tag == _CONSUMER_REFERENCE:
            consumer_reference = _text(child) or None
    if not device_text:
        return ParseError("missing-field", f"{expected}/DeviceID")
    try:
        device_id = parse_eui(device_text)
    except ValueError as exc:
        return ParseError("bad-device-id", _clip(str(exc)))
    if consumer_reference is not None and len(consumer_reference) > CONSUMER_REFERENCE_MAX_CHARS:
        return ParseError(
            "invalid-field", f"ConsumerReference is {len(consumer_reference)} characters, over 64"
        )
    # Anything but an xs:boolean true (absent included) is "not declared": the flag handler refuses
    # that with its own response code rather than the parser rejecting the request.
    return FlagInstruction(
        device_id=device_id,
        set=srv == FLAG_SET_SRV,
        all_reasonable_steps_taken=declaration in _XS_TRUE,
        consumer_reference=consumer_reference,
    )


# -- device responses and alerts ----------------------------------------------------------------


def _device_message(root: etree._Element, data: bytes) -> DeviceMessage | ParseError:
    if root.tag != _RESPONSE:
        return _root_error(root, "Response")
    parts = _header_and_body(root)
    if isinstance(parts, ParseError):
        return parts
    header, body = parts
    fields = _response_header(header)
    if isinstance(fields, ParseError):
        return fields
    request_id, response_code = fields
    if len(body) == 0:
        return ParseError("missing-field", "Body content", request_id)
    content = _body_content(body[0])
    if isinstance(content, ParseError):
        return ParseError(content.reason, content.detail, request_id)
    kind, srv, alert_code, scheduled = content
    return DeviceMessage(
        kind=kind,
        response_code=response_code,
        request_id=request_id,
        srv=srv,
        alert_code=alert_code,
        scheduled=scheduled,
        raw=data,
    )


def _response_header(header: etree._Element) -> tuple[RequestId | None, str] | ParseError:
    """The RequestID answered (optional: alerts have none) and the ResponseCode."""
    request_id_text = response_code = None
    for child in header:
        tag = child.tag
        if tag == _REQUEST_ID:
            request_id_text = child.text or ""
        elif tag == _RESPONSE_CODE:
            response_code = _text(child)
    request_id = None
    if request_id_text is not None:
        request_id = parse_request_id(request_id_text)
        if request_id is None:
            return _bad_request_id(request_id_text)
    if not response_code:
        return ParseError("missing-field", "Header/ResponseCode", request_id)
    if _RESPONSE_CODE_RE.fullmatch(response_code) is None:
        return ParseError("invalid-field", _clip(f"ResponseCode {response_code!r}"), request_id)
    return request_id, response_code


_Content = tuple[DeviceMessageKind, str | None, str | None, bool]
"""What the Body says: kind, SRV, alert code, DCC-scheduled."""


def _body_content(message: etree._Element) -> _Content | ParseError:
    tag = message.tag
    if tag == _RESPONSE_MESSAGE:
        return _response_message(message)
    if tag == _DEVICE_ALERT:
        kind, code = DeviceMessageKind.DEVICE_ALERT, _alert_code(message, _ALERT_CODE, _ALERT_CODE_RE)
    elif tag == _DCC_ALERT:
        kind, code = DeviceMessageKind.DCC_ALERT, _alert_code(message, _DCC_ALERT_CODE, _DCC_ALERT_CODE_RE)
    else:
        name = etree.QName(message).localname if isinstance(tag, str) else "?"
        return ParseError(
            "wrong-body",
            _clip(f"Body holds {name!r}, not ResponseMessage, DeviceAlertMessage or DCCAlertMessage"),
        )
    return code if isinstance(code, ParseError) else (kind, None, code, False)


def _response_message(message: etree._Element) -> _Content | ParseError:
    """ResponseMessage: the SRV answered; a DCC-scheduled execution; or a future-dated alert (8F66/8F67)."""
    kind = DeviceMessageKind.RESPONSE
    srv = alert_code = None
    scheduled = False
    for child in message:
        tag = child.tag
        if tag == _SRV:
            srv = _text(child) or None
        elif tag == _DSP_SCHEDULED_MESSAGE:
            scheduled = True
        elif tag == _FUTURE_DATED_ALERT:
            code = _alert_code(child, _FUTURE_DATED_ALERT_CODE, _ALERT_CODE_RE)
            if isinstance(code, ParseError):
                return code
            kind, alert_code = DeviceMessageKind.DEVICE_ALERT, code
    return kind, srv, alert_code, scheduled


def _alert_code(message: etree._Element, tag: str, shape: re.Pattern[str]) -> str | ParseError:
    for child in message:
        if child.tag == tag:
            code = _text(child)
            if shape.fullmatch(code) is None:
                return ParseError("invalid-field", _clip(f"{tag[_NS_LENGTH:]} {code!r}"))
            return code.upper()
    return ParseError("missing-field", f"{etree.QName(message).localname}/{tag[_NS_LENGTH:]}")
