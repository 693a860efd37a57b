"""A Critical alert from a flagged meter, with its consumption payload removed (MP169).

MP169 lets Critical alerts flow whatever the consumer's choice; some carry consumption values (8F0A
Billing Data Log Updated carries the billing data log: a snapshot of the registers). The gateway
delivers such an alert (rules table `redacted_when_flagged`) with exactly this removed:

- the content of every `sr:GBCSPayload` of the `sr:DeviceAlertMessage` (the GBCS alert, whose
  payload holds the register values), left empty: the element is required by the DUIS schema and an
  empty base64Binary is valid, so the document stays DUIS-shaped, and AlertCode, the throttling
  fields and the Header (RequestID, ResponseCode, ResponseDateTime) are kept;
- the document's `ds:Signature`, which no longer matches the changed content.

An XML comment in the Header says that the payload was removed and why. Pure: bytes in, bytes out.
"""

from __future__ import annotations

from typing import Final

from lxml import etree

from gateway.duis import NAMESPACE, PARSER

_PAYLOAD: Final = f"{{{NAMESPACE}}}DeviceAlertMessage/{{{NAMESPACE}}}GBCSPayload"
_HEADER: Final = f"{{{NAMESPACE}}}Header"
_SIGNATURE: Final = "{http://www.w3.org/2000/09/xmldsig#}Signature"
NOTE: Final = "MP169: consumption payload removed (communications reduced due to consumer choice)"


def without_consumption_payload(document: bytes) -> bytes:
    """`document` (a parsed, valid DUIS alert) with its GBCS payload emptied and its signature removed.

    ValueError if it holds no DeviceAlertMessage payload to remove, or is not XML.
    """
    try:
        root = etree.fromstring(document, PARSER)
    except etree.XMLSyntaxError as exc:
        raise ValueError(f"not an XML document: {exc}") from exc
    payloads = root.findall(f"{{{NAMESPACE}}}Body/{_PAYLOAD}")
    if not payloads:
        raise ValueError("no DeviceAlertMessage/GBCSPayload to remove")
    for payload in payloads:
        payload.text = None
    for signature in root.findall(_SIGNATURE):
        root.remove(signature)
    header = root.find(_HEADER)
    if header is not None:
        header.append(etree.Comment(f" {NOTE} "))
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))
