"""Every DUIS response code the gateway sends, with its meaning: the one place they are defined.

DUIS V5.4 codes are used only with the meaning DUIS gives them (E1 user / role, E2 role and SRV, E4 user
not authorised for the device, E5 device status, E11 SRV and device type, E12 CommandVariant, E19 unknown
device, E20 and E21 device communication). The codes MP169 needs and DUIS V5.4 lacks follow DUIS's own
numbering patterns: a generic code for the consumer-choice refusal (E169), and E<SR><nn> codes (E0815nn)
for the outcomes of Service Reference 8.15, as DUIS does for E0802nn (8.2) and others. Conditions DUIS
has no code for (a repeated RequestID, unparseable input, an unknown SRV...) get five-digit E169nn codes,
a length DUIS never uses, so a DCC user's error handling can never mistake them for a DUIS code:
E16901-E16909 request and access checks, E16910-E16919 signatures, E16920-E16929 the gateway's own
failures. None of these are in the V5.4 schema's ResponseCode enumeration; a DUIS release implementing
MP169 would add them. The README's "DUIS response codes" table is generated from RESPONSE_CODE_MEANINGS.
"""

from __future__ import annotations

from enum import StrEnum


class ResponseCode(StrEnum):
    SUCCESS = "I0"
    ACKNOWLEDGED = "I99"
    USER_NOT_AUTHORISED = "E1"
    ROLE_NOT_ELIGIBLE = "E2"
    DEVICE_NOT_AUTHORISED = "E4"
    DEVICE_STATUS_INVALID = "E5"
    DEVICE_TYPE_INCOMPATIBLE = "E11"
    COMMAND_VARIANT_NOT_APPLICABLE = "E12"
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
    NOT_RESPONSIBLE_SUPPLIER = "E081509"
    DUPLICATE_REQUEST_ID = "E16901"
    INVALID_REQUEST = "E16902"
    UNKNOWN_SRV = "E16903"
    ORIGINATOR_MISMATCH = "E16904"
    NON_DEVICE_TARGET = "E16905"
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
        "DUIS E1: the User ID is not a registered DCC user holding a User Role (invalid User / User "
        "Role combination)."
    ),
    ResponseCode.ROLE_NOT_ELIGIBLE: (
        "DUIS E2: none of the user's User Roles may send this Service Reference Variant (SRV matrix)."
    ),
    ResponseCode.DEVICE_NOT_AUTHORISED: (
        "DUIS E4: the user is not authorised for the device: in none of its roles eligible for the SRV "
        "is it the device's registered import, export or gas supplier, electricity distributor or gas "
        "transporter, and none of those roles is one that needs no such relationship (Other User, "
        "Registered Supplier Agent)."
    ),
    ResponseCode.DEVICE_STATUS_INVALID: (
        "DUIS E5: the device's Smart Metering Inventory status (Decommissioned, Withdrawn) is "
        "incompatible with the Service Request."
    ),
    ResponseCode.DEVICE_TYPE_INCOMPATIBLE: (
        "DUIS E11: the Service Reference Variant cannot address a device of this type (rules table "
        "device_types)."
    ),
    ResponseCode.COMMAND_VARIANT_NOT_APPLICABLE: (
        "DUIS E12: the CommandVariant does not apply to this Service Request (non-device requests take "
        "8, critical ones 4 to 7, non-critical ones 1 to 3)."
    ),
    ResponseCode.UNKNOWN_DEVICE: (
        "DUIS E19: a device the request concerns is not in the Smart Metering Inventory."
    ),
    ResponseCode.DEVICE_FAILURE: (
        "DUIS E20: the DCC could not establish communications with the device (sent by the "
        "simulator's devices for a failed command; the gateway relays it)."
    ),
    ResponseCode.DEVICE_TIMEOUT: "DUIS E21: no response from the device within the target response time.",
    ResponseCode.CONSUMER_CHOICE: (
        "Refused: the meter whose data the request returns (the addressed ESME or GSME, or the GSME "
        "whose data a GPF holds) has communications reduced due to consumer choice (MP169), and the "
        "request relates to the consumer's energy consumption. Not delivered to the device. Also the "
        "final answer of a forwarded request whose consumption response was withheld."
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
    ResponseCode.NOT_RESPONSIBLE_SUPPLIER: (
        "Flag request refused: the user may address the meter but is not its responsible supplier "
        "(the import supplier of an ESME, the gas supplier of a GSME), the only user that may set or "
        "clear the flag."
    ),
    ResponseCode.DUPLICATE_REQUEST_ID: (
        "Repeated RequestID: the counter is not above the highest already accepted from this "
        "originator; the request is not forwarded again."
    ),
    ResponseCode.INVALID_REQUEST: (
        "Unparseable Service Request: not well-formed, wrong namespace or root, a DOCTYPE, too large, "
        "a missing or malformed header field, EUI or counter."
    ),
    ResponseCode.UNKNOWN_SRV: (
        "Unknown Service Reference Variant: not in the rules table, a ServiceReference that is not the "
        "SRV's, or a 5.1 Create Schedule naming no known SRV."
    ),
    ResponseCode.ORIGINATOR_MISMATCH: (
        "The RequestID originator is not the user whose topic the request arrived on (spoofing); "
        "answered to the topic's owner only."
    ),
    ResponseCode.NON_DEVICE_TARGET: (
        "A non-device request (CommandVariant 8) whose RequestID target is not the DCC's EUI."
    ),
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
