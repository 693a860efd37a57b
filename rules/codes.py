"""Every DUIS response code the gateway sends, with its meaning: the one place they are defined.

DUIS V5.4 codes are reused where their meaning fits. The codes MP169 needs and DUIS V5.4 lacks
(the consumer-choice refusal and the 8.15 flag Service Request outcomes) follow DUIS's own
numbering patterns: a generic code for a refusal that applies to any SRV, and E<SR><nn> codes
(E0815nn) for the outcomes of Service Reference 8.15, as DUIS does for E0802nn (8.2) and others.
Conditions DUIS has no code for get five-digit E169nn codes, a length DUIS never uses (E16910-E16919:
signature verification; E16920-E16929: the gateway itself, store and load). None is in the V5.4
schema's ResponseCode enumeration: the MP169 extension of the schema
(`rules/duis/schema/DUIS Schema V5.4 MP169.xsd`) enumerates every one, as a DUIS release implementing
MP169 would. The README's "DUIS response codes" table is generated from RESPONSE_CODE_MEANINGS.
"""

from __future__ import annotations

from enum import StrEnum


class ResponseCode(StrEnum):
    SUCCESS = "I0"
    ACKNOWLEDGED = "I99"
    USER_NOT_AUTHORISED = "E1"
    ROLE_NOT_ELIGIBLE = "E2"
    NOT_RESPONSIBLE_SUPPLIER = "E3"
    INVALID_REQUEST = "E4"
    DEVICE_STATUS_INVALID = "E5"
    DUPLICATE_REQUEST_ID = "E11"
    UNKNOWN_DEVICE = "E19"
    DEVICE_FAILURE = "E20"
    DEVICE_TIMEOUT = "E21"
    CONSUMER_CHOICE = "E169"
    FLAG_NOT_SMETS2 = "E081501"
    FLAG_DEVICE_NOT_COMMISSIONED = "E081502"
    FLAG_COMMS_HUB_NOT_COMMISSIONED = "E081503"
    FLAG_DECLARATION_MISSING = "E081504"
    FLAG_MULTI_RATE_TARIFF = "E081505"
    FLAG_RADIO_TELESWITCH = "E081506"
    FLAG_NO_WAN = "E081507"
    FLAG_DEVICE_TYPE = "E081508"
    SIGNATURE_MISSING = "E16910"
    SIGNATURE_INVALID = "E16911"
    CERTIFICATE_UNKNOWN = "E16912"
    SIGNER_NOT_ORIGINATOR = "E16913"
    CERTIFICATE_NOT_CURRENT = "E16914"
    STORE_FAILED = "E16920"
    GATEWAY_BUSY = "E16921"


RESPONSE_CODE_MEANINGS: dict[ResponseCode, str] = {
    ResponseCode.SUCCESS: "Success (DUIS I0); also the answer to an accepted or idempotent flag request.",
    ResponseCode.ACKNOWLEDGED: "Acknowledged (DUIS I99): forwarded to the device; its response follows.",
    ResponseCode.USER_NOT_AUTHORISED: (
        "The User ID is not a known user, or the RequestID originator is not the user whose topic "
        "the request arrived on (spoofing)."
    ),
    ResponseCode.ROLE_NOT_ELIGIBLE: "None of the user's roles is eligible for this SRV (SRV matrix).",
    ResponseCode.NOT_RESPONSIBLE_SUPPLIER: (
        "Flag request (8.15.x) from a user that is not the device's responsible supplier: only the "
        "import supplier (ESME) or gas supplier (GSME) may set or clear the flag."
    ),
    ResponseCode.INVALID_REQUEST: (
        "Malformed or inconsistent Service Request: not well-formed, wrong namespace, missing header "
        "field, bad EUI or counter, SRV not in the rules table, CommandVariant not valid for the SRV."
    ),
    ResponseCode.DEVICE_STATUS_INVALID: "The device's inventory status does not allow this request.",
    ResponseCode.DUPLICATE_REQUEST_ID: (
        "The RequestID counter is not above the highest already accepted from this originator."
    ),
    ResponseCode.UNKNOWN_DEVICE: "A device the request concerns is not in the Smart Metering Inventory.",
    ResponseCode.DEVICE_FAILURE: "The device answered with a failure.",
    ResponseCode.DEVICE_TIMEOUT: "The device did not answer within the target response time.",
    ResponseCode.CONSUMER_CHOICE: (
        "Refused: the device has communications reduced due to consumer choice (MP169) and the "
        "request relates to the consumer's energy consumption. Not delivered to the device."
    ),
    ResponseCode.FLAG_NOT_SMETS2: "Flag request refused: the device is not SMETS2.",
    ResponseCode.FLAG_DEVICE_NOT_COMMISSIONED: "Flag request refused: the device is not Commissioned.",
    ResponseCode.FLAG_COMMS_HUB_NOT_COMMISSIONED: (
        "Flag request refused: the comms hub the device is joined to is not Commissioned."
    ),
    ResponseCode.FLAG_DECLARATION_MISSING: (
        "Flag set refused: AllReasonableStepsTaken is not true (the supplier must declare that all "
        "reasonable steps to install a fully communicating meter were taken)."
    ),
    ResponseCode.FLAG_MULTI_RATE_TARIFF: (
        "Flag set refused: the site has a multi-rate tariff (such as Economy 7) that needs the meter "
        "to communicate."
    ),
    ResponseCode.FLAG_RADIO_TELESWITCH: (
        "Flag set refused: the site uses Radio Teleswitch, which needs the meter to communicate."
    ),
    ResponseCode.FLAG_NO_WAN: (
        "Flag set refused: network-managed site without WAN coverage, where the meter must communicate."
    ),
    ResponseCode.FLAG_DEVICE_TYPE: "Flag request refused: only an ESME or GSME carries the flag.",
    ResponseCode.SIGNATURE_MISSING: "The Service Request carries no XML signature (ds:Signature).",
    ResponseCode.SIGNATURE_INVALID: (
        "The Service Request's XML signature does not verify, or is not DUIS's form (enveloped, "
        'exclusive C14N, ECDSA P-256 with SHA-256, one Reference URI="", X509IssuerSerial).'
    ),
    ResponseCode.CERTIFICATE_UNKNOWN: (
        "The signing certificate named by X509IssuerSerial is not in the gateway's certificate library."
    ),
    ResponseCode.SIGNER_NOT_ORIGINATOR: (
        "The signing certificate belongs to another organisation: its EUI (x500UniqueIdentifier) is "
        "not the RequestID originator."
    ),
    ResponseCode.CERTIFICATE_NOT_CURRENT: "The signing certificate has expired or is not yet valid.",
    ResponseCode.STORE_FAILED: (
        "The gateway could not make the request durable (store failure): it was not acted on and left "
        "no trace; send it again."
    ),
    ResponseCode.GATEWAY_BUSY: (
        "Not forwarded: as many of this User's requests (gateway.max_forwards_per_user), or of all Users' "
        "(gateway.max_forwards), await their device's answer as the gateway allows; it left no trace, "
        "send it again later."
    ),
}
