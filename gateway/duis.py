"""Parse DUIS XML from untrusted senders: Service Requests (sr:Request) and device messages (sr:Response).

Both parsers are pure and total: any input gives a model value or a `ParseError`, never an exception.
Hardening, in the order it is applied:

1. size: anything over `max_bytes` is refused before parsing (`too-large`);
2. markup: more than `max_markup` tags, comments, PIs and CDATA sections (each opens with "<", so one
   count over the bytes; an element is one or two) is refused before parsing (`too-much-markup`), so
   parse cost is bounded by elements as well as bytes;
3. DTDs: DUIS never carries a DOCTYPE, so one in the prolog (the only place one can stand) is refused
   on the bytes, before parsing, and a parsed tree is checked again (`doctype-forbidden`): no entity
   declaration, internal or external, reaches the parser's entity handling;
4. libxml2, never resolving entities, loading DTDs or touching the network, keeping its depth and size
   limits (no huge_tree), reading every document as UTF-8 (`invalid-encoding`, `not-well-formed`);
5. depth: libxml2's limit of 256 levels (`MAX_DEPTH`, `not-well-formed`);
6. the Header must be exactly what the DUIS V5.4 schema allows (`bad-header`, `missing-field`).

Service Requests take one of two routes to the same answer. Most (CommandVariant 1-7, not a flag SRV)
need nothing from the Body but its element name: when the document opens in the plain form every DUIS
client writes (`PLAIN_REQUEST`: the Header's fields with blanks and comments between, no entity or
attribute in the Header, the prefix bound to the DUIS namespace on the root), the Header is read off
the bytes and libxml2 checks the whole document for well-formedness without building a tree
(`SCANNER`). Everything else, and every request whose Body names devices (`needs_body`), is parsed
into a tree (`PARSER`) and read from it; so is a root handed over already parsed (`parse_request_tree`,
for XMLDSig verification). Tests hold the two routes equal on every input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, cast

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
    from collections.abc import Mapping

NAMESPACE: Final = "http://www.dccinterface.co.uk/ServiceUserGateway"
DEFAULT_MAX_BYTES: Final = 1_048_576
MAX_MARKUP: Final = 50_000
"""Markup items ("<": start and end tags, comments, PIs, CDATA sections) a document may hold, so at most
50,000 elements, 25,000 with content. The largest DUIS requests (tariff matrices, 6.14 key updates)
hold under a thousand; 200,000 empty elements fit in 1 MiB and take a tree parse 45 ms."""
MAX_DEPTH: Final = 256
"""Nesting a document may have: libxml2's own limit without huge_tree, which lxml does not let a caller
lower; the scan is held to the same limit (see `_scan`). DUIS documents nest about 8 deep."""
CONSUMER_REFERENCE_MAX_CHARS: Final = 64


class _NoEvents:
    """A parser target with no start, end or data method: libxml2 then calls back nothing per element."""

    def close(self) -> None:
        return None


def _hardened_parser(*, remove_blank_text: bool = False, target: _NoEvents | None = None) -> etree.XMLParser:
    return etree.XMLParser(
        encoding="utf-8",  # DUIS is UTF-8: a declared other encoding is not honoured
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
        collect_ids=False,
        remove_blank_text=remove_blank_text,
        # The stubs' ParserTarget has every method; lxml only calls those the target has.
        target=cast("etree.ParserTarget", target),
    )


# Not hardening: whitespace-only text between elements is never read, and not building those nodes
# saves an eighth of every parse. The text of a leaf element is kept, blanks or not.
PARSER: Final = _hardened_parser(remove_blank_text=True)
"""The one hardened tree parser. Parsing is synchronous and a parser serves one thread at a time: fine
for the single-threaded asyncio gateway."""
SCANNER: Final = _hardened_parser(target=_NoEvents())
"""The same hardening, building nothing: a well-formedness check at the speed of libxml2's tokenizer.
Unlike a tree parse it reports namespace errors (an undeclared prefix) only in its error log, and it
allows one level more than a tree (257): `_scan` reads the log and adds the level."""

PARSE_ERROR_REASONS: Final[dict[str, str]] = {
    "too-large": "The document is larger than the configured limit (checked before parsing).",
    "too-much-markup": "More tags, comments, PIs and CDATA sections than the configured limit (counted "
    "on the bytes before parsing).",
    "doctype-forbidden": "The document has a DOCTYPE (DTD, entity declarations): DUIS never does.",
    "invalid-encoding": "The bytes are not valid UTF-8.",
    "not-well-formed": "Not well-formed XML (includes truncated input, undeclared namespace prefixes "
    "and libxml2's nesting limit).",
    "wrong-namespace": "An sr element (root or Body content) is not in the DUIS namespace.",
    "wrong-root": "The root element is not sr:Request (requests) or sr:Response (device messages).",
    "bad-header": "The Header is not what the DUIS schema allows: an element repeated, out of order, "
    "unknown or in another namespace; an attribute; text between its elements; an element or comment "
    "inside a field; a FirstInSequence or PrecedingServiceRequestID of the wrong type.",
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
    """Why a document was not accepted; `request_id` and `srv` are set when the Header's were readable."""

    reason: str
    detail: str
    request_id: RequestId | None = None
    srv: str | None = None


_NS: Final = "{" + NAMESPACE + "}"
_NS_LENGTH: Final = len(_NS)
_REQUEST: Final = _NS + "Request"
_RESPONSE: Final = _NS + "Response"
_HEADER: Final = _NS + "Header"
_BODY: Final = _NS + "Body"
_REQUEST_ID: Final = _NS + "RequestID"
_FIRST_IN_SEQUENCE: Final = _NS + "FirstInSequence"
_PRECEDING_REQUEST_ID: Final = _NS + "PrecedingServiceRequestID"
_COMMAND_VARIANT: Final = _NS + "CommandVariant"
_SERVICE_REFERENCE: Final = _NS + "ServiceReference"
_SRV: Final = _NS + "ServiceReferenceVariant"
_DEVICE_ID: Final = _NS + "DeviceID"
_DEVICE_ID_LIST: Final = _NS + "DeviceIDList"
_SCHEDULED_SRV: Final = _NS + "DSPScheduledServiceReferenceVariant"
_ALL_REASONABLE_STEPS_TAKEN: Final = _NS + "AllReasonableStepsTaken"
_CONSUMER_REFERENCE: Final = _NS + "ConsumerReference"
_RESPONSE_ID: Final = _NS + "ResponseID"
_RESPONSE_CODE: Final = _NS + "ResponseCode"
_RESPONSE_DATE_TIME: Final = _NS + "ResponseDateTime"
_RESPONSE_MESSAGE: Final = _NS + "ResponseMessage"
_DSP_SCHEDULED_MESSAGE: Final = _NS + "DSPScheduledMessage"
_FUTURE_DATED_ALERT: Final = _NS + "FutureDatedDeviceAlertMessage"
_FUTURE_DATED_ALERT_CODE: Final = _NS + "FutureDatedAlertCode"
_DEVICE_ALERT: Final = _NS + "DeviceAlertMessage"
_ALERT_CODE: Final = _NS + "AlertCode"
_DCC_ALERT: Final = _NS + "DCCAlertMessage"
_DCC_ALERT_CODE: Final = _NS + "DCCAlertCode"

REQUEST_HEADER: Final = (
    _REQUEST_ID,
    _FIRST_IN_SEQUENCE,
    _PRECEDING_REQUEST_ID,
    _COMMAND_VARIANT,
    _SERVICE_REFERENCE,
    _SRV,
)
"""The sr:Request Header's sequence in the DUIS V5.4 schema: each at most once, in this order (the
schema makes FirstInSequence and PrecedingServiceRequestID optional, the rest required)."""
RESPONSE_HEADER: Final = (_REQUEST_ID, _RESPONSE_ID, _RESPONSE_CODE, _RESPONSE_DATE_TIME)
"""The sr:Response Header's sequence (RequestID and ResponseID optional)."""
_REQUEST_FIELDS: Final = {tag: index for index, tag in enumerate(REQUEST_HEADER)}
_RESPONSE_FIELDS: Final = {tag: index for index, tag in enumerate(RESPONSE_HEADER)}

_FLAG_BODIES: Final = {
    FLAG_SET_SRV: "SetReducedCommunications",
    FLAG_CLEAR_SRV: "RemoveReducedCommunications",
}
_COMMAND_VARIANTS: Final = {str(value): value for value in range(1, NON_DEVICE_COMMAND_VARIANT + 1)}
_XS_TRUE: Final = frozenset({"true", "1"})
_XS_BOOLEAN: Final = _XS_TRUE | {"false", "0"}
# Schema type RequestIDType; the counter's digit-by-digit range 0..2**64-1 is checked as an integer.
# Matched after upper-casing; written out pair by pair, which sre matches a third faster than a
# repeated group (this runs once per request).
_EUI_PATTERN: Final = "-".join(["[0-9A-F][0-9A-F]"] * 8)
_REQUEST_ID_RE: Final = re.compile(f"({_EUI_PATTERN}):({_EUI_PATTERN}):(0|[1-9][0-9]{{0,19}})")
_RESPONSE_CODE_RE: Final = re.compile(r"[A-Z][0-9]{1,6}")
_ALERT_CODE_RE: Final = re.compile(r"[0-9A-Fa-f]{4}")  # GBCS alert codes are two bytes
_DCC_ALERT_CODE_RE: Final = re.compile(r"[A-Z]{1,3}[0-9]{1,4}")  # AD1, N1 ... N999
_XML_BLANKS: Final = " \t\r\n"  # what xs:token collapses; str.strip() alone would take any Unicode space
_XML_BLANK_BYTES: Final = _XML_BLANKS.encode()
_MAX_DETAIL: Final = 200
_PROLOG_ITEMS: Final = 8
# The usual prolog: an optional BOM and XML declaration, blanks, then the root's start tag. A PI ends at
# its first "?>", and [^>]* cannot pass one, so a match leaves no room for a DOCTYPE.
_PROLOG: Final = rb"(?:\xef\xbb\xbf)?(?:<\?[^>]*\?>)?[ \t\r\n]*"
_PLAIN_PROLOG: Final = re.compile(_PROLOG + rb"<[A-Za-z_]")

# The plain Request: what the fast route reads off the bytes. Every piece has one XML reading: names
# are ASCII; the root's attributes are matched one by one from its tag's start (so a declaration
# matched is an attribute, not text inside another's value) and must bind the prefix (group p, colon
# included, or empty for the default namespace) to the DUIS namespace, which only one attribute can do
# (a second would be a duplicate, not well-formed); attribute values hold no reference, no "<" and no
# blank a parser would normalise; Header fields hold text without "<", "&" or CR (no markup, no
# reference, no line-end normalisation), with only XML blanks and comments between them; the Header
# and Body tags carry no attribute, and the Body's element no namespace declaration (checked after the
# match). Anything else takes the tree.
_NAME: Final = rb"[A-Za-z_][A-Za-z0-9._-]*"
_BLANKS: Final = rb"[ \t\r\n]*"
# Between elements: blanks and comments ("--" cannot stand in a comment). Possessive, and each piece
# starts differently, so a failing match cannot backtrack.
_GAP: Final = rb"[ \t\r\n]*+(?:<!--(?:[^-]++|-[^-])*+-->[ \t\r\n]*+)*+"
_ATTRIBUTE: Final = (
    rb"[ \t\r\n]+" + _NAME + rb"(?::" + _NAME + rb")?" + _BLANKS + rb"=" + _BLANKS
    + rb"(?:\"[^\"<&\t\r\n]*\"|'[^'<&\t\r\n]*')"
)  # fmt: skip
_ATTRIBUTES: Final = rb"(?:" + _ATTRIBUTE + rb")*"
_NAMESPACE_VALUE: Final = re.escape(NAMESPACE.encode())
_DUIS_DECLARATION: Final = (
    rb"[ \t\r\n]+xmlns(?(prefix):(?P=prefix))" + _BLANKS + rb"=" + _BLANKS
    + rb"(?:\"" + _NAMESPACE_VALUE + rb"\"|'" + _NAMESPACE_VALUE + rb"')"
)  # fmt: skip


def _plain_field(name: bytes, group: str) -> bytes:
    return rb"<(?P=p)" + name + rb">(?P<" + group.encode() + rb">[^<&\r]*)</(?P=p)" + name + rb">" + _GAP


PLAIN_REQUEST: Final = re.compile(
    _PROLOG
    + rb"<(?P<p>(?:(?P<prefix>" + _NAME + rb"):)?)Request"
    + rb"(?:" + _ATTRIBUTE + rb")*?" + _DUIS_DECLARATION + _ATTRIBUTES  # lazy: no backtracking
    + _BLANKS + rb">(?P<content>)"
    + _GAP + rb"<(?P=p)Header>" + _GAP
    + _plain_field(b"RequestID", "request_id")
    + rb"(?:" + _plain_field(b"FirstInSequence", "first") + rb")?"
    + rb"(?:" + _plain_field(b"PrecedingServiceRequestID", "preceding") + rb")?"
    + _plain_field(b"CommandVariant", "command_variant")
    + _plain_field(b"ServiceReference", "service_reference")
    + _plain_field(b"ServiceReferenceVariant", "srv")
    + rb"</(?P=p)Header>" + _GAP + rb"<(?P=p)Body>" + _GAP
    + rb"<(?P=p)(?P<body>" + _NAME + rb")(?P<body_attributes>" + _ATTRIBUTES + rb")" + _BLANKS + rb"/?>"
)  # fmt: skip
"""A Service Request in the plain form (see above), matched at the start of the bytes."""
_SHORTEST_MARKUP: Final = len(b"<a>")
_TOO_DEEP_BYTES: Final = len(b"<a></a>") * (MAX_DEPTH + 1)
_COUNT_BELOW_BYTES: Final = 16_384


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


def needs_body(command_variant: str, srv: str) -> bool:
    """Does routing need the Body of a request with this CommandVariant and SRV (Header text, stripped)?

    The one place that says which requests are parsed into a tree: every non-device request
    (CommandVariant 8: 5.1 Create Schedule, 8.2 Read Inventory, 8.3, 8.14.x, 11.1 Update Firmware, ...
    name their devices in the Body, and an SRV this code does not know is read too), and the MP169
    flag requests 8.15.1 / 8.15.2 whatever their CommandVariant. A device request (1-7) concerns its
    RequestID target, so only its Body's element name is read.
    """
    return command_variant == str(NON_DEVICE_COMMAND_VARIANT) or srv in _FLAG_BODIES


def parse_request(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_markup: int = MAX_MARKUP
) -> ServiceRequest | ParseError:
    """Parse a DUIS Service Request: the Header, and what routing needs from the Body."""
    try:
        refused = _refused(data, max_bytes, max_markup)
        if refused is not None:
            return refused
        plain = PLAIN_REQUEST.match(data)
        if plain is not None and (parsed := _plain_request(plain, data)) is not None:
            return parsed
        return _tree_request(data)
    except Exception as exc:  # noqa: BLE001 - untrusted input: the contract is to never raise
        return _internal_failure(exc)


def parse_request_tree(
    root: etree._Element, data: bytes, *, max_markup: int = MAX_MARKUP
) -> ServiceRequest | ParseError:
    """The same as `parse_request` for a document already parsed, e.g. to verify its XML signature.

    `root` must come from `data` through a parser with `PARSER`'s hardening (comments and blank text may
    have been kept). `data`'s size was checked by whoever parsed it; the element limit and the DOCTYPE
    checks apply here, so a verified request is parsed once.
    """
    try:
        refused = _refused(data, len(data), max_markup)
        if refused is None and has_doctype(root):
            refused = ParseError("doctype-forbidden", "the parsed document declares a DOCTYPE")
        return refused or _request(root, data)
    except Exception as exc:  # noqa: BLE001 - untrusted input: the contract is to never raise
        return _internal_failure(exc)


def parse_device_message(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_markup: int = MAX_MARKUP
) -> DeviceMessage | ParseError:
    """Parse a DUIS sr:Response from a device or the DCC: a response, a device alert or a DCC alert."""
    try:
        root = _refused(data, max_bytes, max_markup) or _parse_document(data)
        return root if isinstance(root, ParseError) else _device_message(root, data)
    except Exception as exc:  # noqa: BLE001 - untrusted input: the contract is to never raise
        return _internal_failure(exc)


def _internal_failure(exc: Exception) -> ParseError:
    return ParseError("parser-failure", _clip(f"{type(exc).__name__}: {exc}"))


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"


def _refused(data: bytes, max_bytes: int, max_markup: int) -> ParseError | None:
    """The checks on the bytes, before any parsing: size, markup, DOCTYPE.

    "<" cannot stand in text or attribute values, so every one opens markup, and none is shorter
    than `<a>`: only a document of more than three bytes per allowed item needs counting.
    """
    if len(data) > max_bytes:
        return ParseError("too-large", f"{len(data)} bytes, over the limit of {max_bytes}")
    if len(data) > _SHORTEST_MARKUP * max_markup and (markup := data.count(b"<")) > max_markup:
        return ParseError(
            "too-much-markup", f"{markup} tags and other markup, over the limit of {max_markup}"
        )
    if declares_doctype(data):
        return ParseError("doctype-forbidden", "DUIS documents have no DOCTYPE (DTDs and entities refused)")
    return None


def _parse_document(data: bytes) -> etree._Element | ParseError:
    try:
        root = etree.fromstring(data, PARSER)
    except etree.XMLSyntaxError as exc:
        return _syntax_error(data, exc)
    if has_doctype(root):
        return ParseError("doctype-forbidden", "the parsed document declares a DOCTYPE")
    return root


def _scan(data: bytes, content: int, end: int) -> ParseError | None:
    """Is the whole document well-formed, as a tree parse would find it? Builds nothing.

    `content` is where the root's content starts, `end` where the root's end tag (the document's last
    markup) starts. A document that could nest deeper than a tree allows (it takes two "<" a level)
    is scanned with one element wrapped around that content. That element cannot close anything but
    itself, so the wrapped document is well-formed exactly when the document is, and it nests one
    level deeper: the scanner's limit of 257 levels then stops every document a tree would.
    """
    scanned = data
    if _may_nest_too_deep(data):
        view = memoryview(data)
        scanned = b"".join((view[:content], b"<x>", view[content:end], b"</x>", view[end:]))
    try:
        etree.fromstring(scanned, SCANNER)
    except etree.XMLSyntaxError as exc:
        return _syntax_error(data, exc)
    # Namespace errors are fatal to a tree parse but only logged by a target parser; warnings (a
    # relative namespace URI) are neither.
    log = SCANNER.error_log
    if log and (errors := log.filter_from_errors()):
        return ParseError("not-well-formed", _clip(" ".join(str(errors[0].message).split())))
    return None


def _may_nest_too_deep(data: bytes) -> bool:
    """Could the document nest deeper than MAX_DEPTH? Each level takes seven bytes and two "<".

    Past `_COUNT_BELOW_BYTES` the answer is yes without counting: copying the document for the
    scan's wrapper then costs less than counting its "<" (measured).
    """
    if len(data) < _TOO_DEEP_BYTES:
        return False
    return len(data) > _COUNT_BELOW_BYTES or data.count(b"<") > 2 * MAX_DEPTH


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


def _elements(parent: etree._Element) -> list[etree._Element]:
    """The element children, without the comments and PIs a caller's tree may have kept."""
    return [child for child in parent if isinstance(child.tag, str)]


def _header_and_body(root: etree._Element) -> tuple[etree._Element, etree._Element] | ParseError:
    """Header and Body by position, as the schema orders them (a Signature may follow)."""
    children = _elements(root)
    if len(children) < 2:
        return ParseError("missing-field", "Header and Body (the root's first two elements)")
    header, body = children[0], children[1]
    if header.tag != _HEADER:
        return ParseError("missing-field", "Header (the root's first element)")
    if body.tag != _BODY:
        return ParseError("missing-field", "Body (the root's second element)")
    return header, body


def _blank(text: str | None) -> bool:
    return text is None or not text.strip(_XML_BLANKS)


def _bad_header(detail: str) -> ParseError:
    return ParseError("bad-header", _clip(detail))


def _local(tag: str) -> str:
    return tag[_NS_LENGTH:] if tag.startswith(_NS) else tag


def header_fields(header: etree._Element, sequence: Mapping[str, int]) -> list[str | None] | ParseError:
    """The text of each field of `sequence` (tag: position) as written (None: absent), or why not.

    The schema's Header is an element-only sequence of simple-typed fields: no attribute, no text
    between fields, nothing inside a field, each field at most once and in order, nothing else. A
    comment or PI between fields is allowed (the schema does not see them).
    """
    if header.attrib:
        return _bad_header("the Header element has attributes")
    if not _blank(header.text):
        return _bad_header("text in the Header outside its fields")
    values: list[str | None] = [None] * len(sequence)
    position = 0
    for child in header:
        if not _blank(child.tail):
            return _bad_header("text in the Header outside its fields")
        tag = child.tag
        if not isinstance(tag, str):
            continue
        index = sequence.get(tag, -1)
        if index < position:
            where = "not a Header field" if index == -1 else "repeated or out of schema order"
            return _bad_header(f"Header element {_local(tag)!r} is {where}")
        if child.attrib or len(child):
            return _bad_header(f"Header field {_local(tag)} has attributes or content other than text")
        values[index] = child.text or ""
        position = index + 1
    return values


def _bad_request_id(text: str) -> ParseError:
    return ParseError("bad-request-id", _clip(f"RequestID is not EUI:EUI:counter: {text.strip()!r}"))


def _text(element: etree._Element) -> str:
    text = element.text
    return "" if text is None else text.strip(_XML_BLANKS)


# -- Service Requests ---------------------------------------------------------------------------


def _plain_request(plain: re.Match[bytes], data: bytes) -> ServiceRequest | ParseError | None:
    """The fast route: the Header from the bytes, the document scanned whole; None: take the tree.

    Only for a Body element that declares no namespace, a document that ends with the root's end tag,
    and never for a request that `needs_body`.
    """
    prefix, _, _, *fields, body, body_attributes = plain.groups()
    if b"xmlns" in body_attributes:
        return None
    command_variant, srv = fields[3].strip(_XML_BLANK_BYTES), fields[5].strip(_XML_BLANK_BYTES)
    if needs_body(command_variant.decode("latin-1"), srv.decode("latin-1")):
        return None
    end_tag = b"</" + prefix + b"Request>"
    end = data.rfind(end_tag)
    if end == -1 or data[end + len(end_tag) :].strip(_XML_BLANK_BYTES):
        return None
    refused = _scan(data, plain.start("content"), end)
    if refused is not None:
        return refused
    texts = [None if field is None else field.decode() for field in fields]  # the scan proved UTF-8
    return _service_request(texts, body.decode(), None, data)


def _tree_request(data: bytes) -> ServiceRequest | ParseError:
    root = _parse_document(data)
    return root if isinstance(root, ParseError) else _request(root, data)


def _request(root: etree._Element, data: bytes) -> ServiceRequest | ParseError:
    if root.tag != _REQUEST:
        return _root_error(root, "Request")
    parts = _header_and_body(root)
    if isinstance(parts, ParseError):
        return parts
    header, body = parts
    fields = header_fields(header, _REQUEST_FIELDS)
    if isinstance(fields, ParseError):
        return fields
    content = _elements(body)
    if not content:
        return _service_request(fields, None, None, data)
    element = content[0]
    tag = element.tag
    if not tag.startswith(_NS):
        return _service_request(fields, "", None, data)
    return _service_request(fields, tag[_NS_LENGTH:], element, data)


def _service_request(  # noqa: C901, PLR0911, PLR0912 - one check per Header field, in the order they are read
    fields: list[str | None], body_element: str | None, element: etree._Element | None, data: bytes
) -> ServiceRequest | ParseError:
    """Check the Header's fields (REQUEST_HEADER order) and read what the request needs from its Body.

    `body_element` is the Body element's local name: None if the Body is empty, "" if it is not in the
    DUIS namespace. `element` is that element, when the Body was parsed (`needs_body`).
    """
    request_id_text, first_in_sequence, preceding, command_variant_text, service_reference, srv = fields
    if request_id_text is None:
        return ParseError("missing-field", "Header/RequestID")
    request_id = parse_request_id(request_id_text)
    if request_id is None:
        return _bad_request_id(request_id_text)
    srv = (srv or "").strip(_XML_BLANKS)  # read now: every later error names the SRV it is for
    if command_variant_text is None:
        return ParseError("missing-field", "Header/CommandVariant", request_id, srv or None)
    command_variant_text = command_variant_text.strip(_XML_BLANKS)
    command_variant = _COMMAND_VARIANTS.get(command_variant_text)
    if command_variant is None:
        return ParseError(
            "bad-command-variant", _clip(f"{command_variant_text!r} is not 1 to 8"), request_id, srv or None
        )
    service_reference = (service_reference or "").strip(_XML_BLANKS)
    if not service_reference:
        return ParseError("missing-field", "Header/ServiceReference", request_id, srv or None)
    if not srv:
        return ParseError("missing-field", "Header/ServiceReferenceVariant", request_id)
    if first_in_sequence is not None and first_in_sequence.strip(_XML_BLANKS) not in _XS_BOOLEAN:
        return _bad_header(f"FirstInSequence {first_in_sequence.strip()!r} is not an xs:boolean")
    if preceding is not None and parse_request_id(preceding) is None:
        return _bad_header(f"PrecedingServiceRequestID {preceding.strip()!r} is not a RequestID")
    if body_element is None:
        return ParseError("missing-field", "Body content", request_id, srv)
    if not body_element:
        return ParseError("wrong-namespace", "the Body element is not in the DUIS namespace", request_id, srv)
    scheduled_srv: str | None = None
    flag = None
    concerned: tuple[Eui, ...] = (request_id.target,)
    if element is not None:
        if command_variant == NON_DEVICE_COMMAND_VARIANT:
            named = _named_devices(element)
            if isinstance(named, ParseError):
                return ParseError(named.reason, named.detail, request_id, srv)
            concerned, scheduled_srv = named
        if srv in _FLAG_BODIES:
            parsed_flag = _flag(element, body_element, srv)
            if isinstance(parsed_flag, ParseError):
                return ParseError(parsed_flag.reason, parsed_flag.detail, request_id, srv)
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
    elements = _elements(body)
    if not elements:
        return ParseError("missing-field", "Body content", request_id)
    content = _body_content(elements[0])
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
    fields = header_fields(header, _RESPONSE_FIELDS)
    if isinstance(fields, ParseError):
        return fields
    request_id_text, _, response_code, _ = fields
    request_id = None
    if request_id_text is not None:
        request_id = parse_request_id(request_id_text)
        if request_id is None:
            return _bad_request_id(request_id_text)
    response_code = (response_code or "").strip(_XML_BLANKS)
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
