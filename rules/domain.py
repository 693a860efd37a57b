"""Domain types shared by every part of the project: the rules, the gateway and the simulator.

Plain, frozen, typed values: the parser produces them, the routing decision consumes them, the
adapters (transport, store, CLI) carry them. Nothing here does I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import NewType

from rules.codes import ResponseCode

Eui = NewType("Eui", str)
"""An EUI-64 as written in DUIS: eight upper-case hex pairs joined by '-', e.g. 00-DB-12-34-56-78-90-A0."""

_EUI_RE = re.compile(r"[0-9A-Fa-f]{2}(?:-[0-9A-Fa-f]{2}){7}")
MAX_COUNTER = 2**64 - 1

DCC_EUI = Eui("90-B3-D5-1F-30-00-00-02")
"""The DCC's EUI-64 in DCC's test data: the RequestID target of non-device Service Requests
(CommandVariant 8). Deployments set theirs in `gateway.dcc_eui`."""

FLAG_SET_SRV = "8.15.1"
FLAG_CLEAR_SRV = "8.15.2"
FLAG_SRVS = frozenset({FLAG_SET_SRV, FLAG_CLEAR_SRV})
"""The MP169 flag Service Requests (project numbering, Service Reference 8.15)."""
READ_INVENTORY_SRV = "8.2"


def utc_now() -> datetime:
    return datetime.now(UTC)


def parse_eui(text: str) -> Eui:
    """Normalise an EUI-64 to DUIS upper-case form; ValueError if it is not one."""
    if _EUI_RE.fullmatch(text) is None:
        raise ValueError(f"not an EUI-64 (expected 8 hex pairs joined by '-'): {text!r}")
    return Eui(text.upper())


def eui_to_int(eui: Eui) -> int:
    """The EUI as a 64-bit integer: the compact key used by in-memory views."""
    return int(eui.replace("-", ""), 16)


def int_to_eui(value: int) -> Eui:
    raw = f"{value:016X}"
    return Eui("-".join(raw[i : i + 2] for i in range(0, 16, 2)))


class Role(StrEnum):
    """DUIS User Roles."""

    IMPORT_SUPPLIER = "IS"
    EXPORT_SUPPLIER = "ES"
    GAS_SUPPLIER = "GS"
    ELECTRICITY_DISTRIBUTOR = "ED"
    GAS_TRANSPORTER = "GT"
    REGISTERED_SUPPLIER_AGENT = "RSA"
    OTHER_USER = "OU"


class DeviceType(StrEnum):
    ESME = "ESME"
    GSME = "GSME"
    CHF = "CHF"
    GPF = "GPF"
    PPMID = "PPMID"
    HCALCS = "HCALCS"
    IHD = "IHD"


class DeviceStatus(StrEnum):
    """Smart Metering Inventory status."""

    PENDING = "Pending"
    WHITELISTED = "Whitelisted"
    INSTALLED_NOT_COMMISSIONED = "InstalledNotCommissioned"
    COMMISSIONED = "Commissioned"
    DECOMMISSIONED = "Decommissioned"
    WITHDRAWN = "Withdrawn"
    SUSPENDED = "Suspended"
    RECOVERED = "Recovered"


class Tariff(StrEnum):
    """Tariff regime of the metering point; multi-rate, Economy 7 and RTS need a communicating meter."""

    SINGLE = "single"
    MULTI_RATE = "multi-rate"
    ECONOMY7 = "economy7"
    RTS = "rts"


# CommandVariant values (DUIS): 1-3 non-critical, 4 critical to be transformed, 5-7 signed
# pre-commands, 8 non-device requests handled by the DCC itself.
NON_DEVICE_COMMAND_VARIANT = 8
COMMAND_VARIANTS = range(1, 9)


@dataclass(frozen=True, slots=True)
class RequestId:
    """DUIS RequestID: originator EUI : target EUI : counter (counters rise per originator)."""

    originator: Eui
    target: Eui
    counter: int

    def __str__(self) -> str:
        return f"{self.originator}:{self.target}:{self.counter}"


@dataclass(frozen=True, slots=True)
class FlagInstruction:
    """Body of the MP169 flag Service Requests 8.15.1 (set) and 8.15.2 (remove)."""

    device_id: Eui
    set: bool
    all_reasonable_steps_taken: bool
    consumer_reference: str | None = None


@dataclass(frozen=True, slots=True)
class ServiceRequest:
    """A parsed DUIS sr:Request: the header, plus what routing needs from the body."""

    request_id: RequestId
    command_variant: int
    service_reference: str
    srv: str
    body_element: str
    """Local name of the Body's child, e.g. ReadActiveImportProfileData."""
    concerned_devices: tuple[Eui, ...]
    """Devices the request is about: the RequestID target for device requests (CV 1-7); for
    non-device requests (CV 8) the devices named in the body (11.1 DeviceIDList, 5.1 DeviceID,
    8.15.x DeviceID, ...), possibly empty."""
    scheduled_srv: str | None = None
    """5.1 Create Schedule: the SRV the DCC will execute on the schedule."""
    flag: FlagInstruction | None = None
    """8.15.1 / 8.15.2: the flag instruction."""
    raw: bytes = field(default=b"", repr=False, compare=False)


class DeviceMessageKind(StrEnum):
    RESPONSE = "response"
    DEVICE_ALERT = "device-alert"
    DCC_ALERT = "dcc-alert"


@dataclass(frozen=True, slots=True)
class DeviceMessage:
    """A parsed DUIS sr:Response that a device (or the DCC) publishes on dsp/device/<eui>/up."""

    kind: DeviceMessageKind
    response_code: str
    request_id: RequestId | None
    """The request this answers (responses), from Header/RequestID."""
    srv: str | None
    """ResponseMessage/ServiceReferenceVariant for responses, if present."""
    alert_code: str | None
    """Upper-case hex GBCS alert code (DeviceAlertMessage/AlertCode) or a DCC alert code (AD1, N1...)."""
    scheduled: bool = False
    """True for a DCC-scheduled execution (ResponseMessage carries DSPScheduledMessage)."""
    raw: bytes = field(default=b"", repr=False, compare=False)


NOT_A_DEVICE = "00-00-00-00-00-00-00-00"

ELECTRICITY_DEVICES = frozenset({DeviceType.ESME})
GAS_DEVICES = frozenset({DeviceType.GSME, DeviceType.GPF})


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """One Smart Metering Inventory entry."""

    device_id: Eui
    device_type: DeviceType
    smets: int
    status: DeviceStatus
    comms_hub_id: Eui | None
    mpxn: str | None
    import_supplier: Eui | None
    export_supplier: Eui | None
    gas_supplier: Eui | None
    tariff: Tariff
    wan: bool
    network_operator: Eui | None = None
    """The electricity distributor of the premises' MPAN: its power-outage alerts, and its E4
    relationship to the ESME and the premises' comms hub and in-home devices."""
    gas_transporter: Eui | None = None
    """The gas transporter of the premises' MPRN: its E4 relationship to the GSME, the GPF and the
    premises' comms hub and in-home devices."""


@dataclass(frozen=True, slots=True)
class DeviceParties:
    """Who is registered for a device's MPxN, per User Role: the relationships DUIS E4 checks."""

    import_supplier: Eui | None = None
    export_supplier: Eui | None = None
    gas_supplier: Eui | None = None
    electricity_distributor: Eui | None = None
    gas_transporter: Eui | None = None

    def registered(self, user: Eui, role: Role) -> bool:
        """Whether `user` is registered for the device in `role` (False for roles without one)."""
        party = {
            Role.IMPORT_SUPPLIER: self.import_supplier,
            Role.EXPORT_SUPPLIER: self.export_supplier,
            Role.GAS_SUPPLIER: self.gas_supplier,
            Role.ELECTRICITY_DISTRIBUTOR: self.electricity_distributor,
            Role.GAS_TRANSPORTER: self.gas_transporter,
        }.get(role)
        return party is not None and party == user


NO_PARTIES = DeviceParties()

ROLES_WITHOUT_DEVICE_RELATIONSHIP = frozenset({Role.OTHER_USER, Role.REGISTERED_SUPPLIER_AGENT})
"""Roles the inventory records no device relationship for: DUIS lets them send what the SRV matrix
allows them about any device (an Other User's consent obligations are its own, under the SEC)."""


def device_parties(record: DeviceRecord) -> DeviceParties:
    """The registered parties of a device, by fuel: an ESME's are the electricity ones (import and
    export supplier, distributor), a GSME's or GPF's the gas ones (gas supplier, transporter); a comms
    hub or in-home device serves the whole premises, so it has every party its inventory row names."""
    electricity = record.device_type not in GAS_DEVICES
    gas = record.device_type not in ELECTRICITY_DEVICES
    return DeviceParties(
        import_supplier=record.import_supplier if electricity else None,
        export_supplier=record.export_supplier if electricity else None,
        gas_supplier=record.gas_supplier if gas else None,
        electricity_distributor=record.network_operator if electricity else None,
        gas_transporter=record.gas_transporter if gas else None,
    )


@dataclass(frozen=True, slots=True)
class UserRecord:
    """One registered user: its User ID and DUIS User Roles."""

    user_id: Eui
    roles: frozenset[Role]


def responsible_supplier(device: DeviceRecord) -> Eui | None:
    """Who may set or clear the flag: the import supplier of an ESME, the gas supplier of a GSME or GPF."""
    if device.device_type in ELECTRICITY_DEVICES:
        return device.import_supplier
    if device.device_type in GAS_DEVICES:
        return device.gas_supplier
    return None


OUTCOME_ACCEPTED = "accepted"
"""The flag request was accepted and changed the flag."""
OUTCOME_UNCHANGED = "unchanged"
"""The flag request was accepted and the flag already had the asked-for value."""
_OUTCOMES = frozenset(
    {
        OUTCOME_ACCEPTED,
        OUTCOME_UNCHANGED,
        *(code.value for code in ResponseCode if code.value.startswith("E")),
    }
)


@dataclass(frozen=True, slots=True)
class ForwardedRequest:
    """A Service Request forwarded to its device and waiting for the device's answer: durable, so a
    restarted gateway still delivers the answer, or answers E21 at the deadline, exactly once."""

    request_id: RequestId
    srv: str
    service_reference: str
    deadline: datetime
    """When the target response time runs out (timezone-aware)."""


ANSWER_RESPONSE = "response"
"""A forward's final answer was its device's response (relayed, or withheld as E169)."""
ANSWER_TIMEOUT = "timeout"
"""A forward's final answer was E21: no device response within the target response time."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A commit took the right to give a forward its one final answer (of every gateway instance
    sharing the store, exactly one commit claims each forward)."""

    answer: str
    """ANSWER_RESPONSE or ANSWER_TIMEOUT."""
    forward: ForwardedRequest


@dataclass(frozen=True, slots=True)
class FlagEvent:
    """One flag Service Request and its outcome: a flag_history row."""

    device_id: Eui
    set: bool
    requester: Eui
    request_id: str
    declaration: bool | None
    """AllReasonableStepsTaken of a set; None for a clear."""
    consumer_reference: str | None
    outcome: str
    """'accepted' (the flag changed), 'unchanged' (accepted, already so) or the refusal response code."""
    at: datetime

    def __post_init__(self) -> None:
        if self.outcome not in _OUTCOMES:
            raise ValueError(
                f"flag event outcome {self.outcome!r}: not accepted, unchanged or a refusal code"
            )
        if self.at.tzinfo is None:
            raise ValueError("flag event time must be timezone-aware")
