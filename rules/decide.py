"""The routing decision: pure functions from a parsed message, the facts about it and the rules table.

No I/O, no clock, no logging: the same inputs always give an equal decision. The caller (the pipeline,
`mp169 check`) gathers the facts (user roles, inventory status, flags) and acts on the decision. Every
MP169 choice comes from rules/table.toml; this module only applies it, in DUIS's order of access
control, then MP169: known SRV (E16903), user (E1), role (E2), CommandVariant (E12, E16905), then per
device: known (E19), user authorised for it (E4), status (E5), device type (E11); then the locally
handled requests, consumer choice (E169), forward. A user that may not address a device learns nothing
more about it (its status, type or flag) than that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from rules.codes import ResponseCode
from rules.domain import (
    FLAG_SRVS,
    NON_DEVICE_COMMAND_VARIANT,
    READ_INVENTORY_SRV,
    DeviceMessageKind,
    DeviceStatus,
    DeviceType,
    Eui,
    Role,
)
from rules.domain import ROLES_WITHOUT_DEVICE_RELATIONSHIP as _FREE_ROLES

if TYPE_CHECKING:
    from collections.abc import Mapping

    from rules.domain import DeviceMessage, DeviceParties, ServiceRequest
    from rules.table import Category, RulesTable, SrvRule

CREATE_SCHEDULE = "5.1"
NON_CRITICAL_COMMAND_VARIANTS = frozenset({1, 2, 3})
"""Non-critical Service Requests: via WAN, for local delivery, or both."""
CRITICAL_COMMAND_VARIANTS = frozenset({4, 5, 6, 7})
"""Critical Service Requests: to be transformed (4), or signed pre-commands (5 WAN, 6 local, 7 both)."""
INACTIVE_STATUSES = frozenset({DeviceStatus.DECOMMISSIONED, DeviceStatus.WITHDRAWN})

_GBCS_ALERT_CODE = re.compile(r"[0-9A-F]{4}")


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    device_id: Eui
    device_type: DeviceType
    smets: int
    status: DeviceStatus
    parties: DeviceParties
    """Who is registered for the device's MPxN (the E4 relationships)."""
    flagged_meter: Eui | None = None
    """The flagged meter whose consumption data this device returns: the device itself (ESME, GSME),
    the GSME joined to the same comms hub (GPF), else None."""

    @property
    def flagged(self) -> bool:
        """Consumption data read from this device belongs to a meter with the MP169 flag set."""
        return self.flagged_meter is not None


@dataclass(frozen=True, slots=True)
class RequestFacts:
    requester_roles: frozenset[Role] | None
    """None: roles not checked (offline `mp169 check`); empty: unknown user."""
    devices: Mapping[Eui, DeviceFacts]
    """Facts for request.concerned_devices (5.1: the schedule's device); absent = unknown device."""
    dcc_eui: Eui


class Action(StrEnum):
    FORWARD = "forward"
    REFUSE = "refuse"
    REJECT = "reject"
    LOCAL = "handle-locally"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    response_code: ResponseCode
    reason: str
    """Machine-readable, kebab-case (consumer-choice, unknown-srv, role-not-eligible...)."""
    detail: str
    """A sentence a supplier can pass on."""
    rule: SrvRule | None


class Delivery(StrEnum):
    DELIVER = "deliver"
    REDACT = "redact"
    """Deliver with the consumption payload removed (a Critical alert from a flagged meter)."""
    WITHHOLD = "withhold"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class MessageDecision:
    delivery: Delivery
    reason: str
    detail: str
    category: Category | None
    notify_network_operator: bool


def decide(request: ServiceRequest, facts: RequestFacts, table: RulesTable) -> Decision:  # noqa: C901, PLR0911, PLR0912 - one flat list of checks in the documented order
    """What the gateway does with a Service Request, and which DUIS response code says so."""
    srv = request.srv
    rule = table.srvs.get(srv)
    if rule is None:
        return _reject(ResponseCode.UNKNOWN_SRV, "unknown-srv", f"SRV {srv} is not in the rules table.")
    if request.service_reference != rule.service_reference:
        return _reject(
            ResponseCode.UNKNOWN_SRV,
            "service-reference",
            f"ServiceReference {request.service_reference} does not belong to SRV {srv} "
            f"(expected {rule.service_reference}).",
            rule,
        )

    roles = facts.requester_roles
    if roles is not None:
        if not roles:
            return _reject(
                ResponseCode.USER_NOT_AUTHORISED,
                "unknown-user",
                f"User {request.request_id.originator} is not a known DCC user.",
                rule,
            )
        roles &= rule.eligible_roles
        if not roles:
            return _reject(
                ResponseCode.ROLE_NOT_ELIGIBLE,
                "role-not-eligible",
                f"None of the user's roles ({_roles(facts.requester_roles or roles)}) may send "
                f"{rule.name} ({srv}); eligible: {_roles(rule.eligible_roles) or 'none'}.",
                rule,
            )

    variant_refusal = _command_variant(request, rule, facts.dcc_eui)
    if variant_refusal is not None:
        return variant_refusal

    scheduled: SrvRule | None = None
    if srv == CREATE_SCHEDULE:
        scheduled_srv = request.scheduled_srv
        scheduled = table.srvs.get(scheduled_srv) if scheduled_srv is not None else None
        if scheduled is None:
            return _reject(
                ResponseCode.UNKNOWN_SRV,
                "unknown-srv",
                _unknown_srv("Create Schedule", scheduled_srv),
                rule,
            )
    # A schedule addresses its device as the scheduled SRV would.
    addressing = scheduled or rule
    flagged: Eui | None = None
    devices = facts.devices
    for eui in request.concerned_devices:
        device = devices.get(eui)
        if device is None:
            return _reject(
                ResponseCode.UNKNOWN_DEVICE,
                "unknown-device",
                f"Device {eui} is not in the Smart Metering Inventory.",
                rule,
            )
        if (
            roles is not None
            and addressing.device_relationship
            and not _authorised(request.request_id.originator, roles, device.parties)
        ):
            return _reject(
                ResponseCode.DEVICE_NOT_AUTHORISED,
                "device-not-authorised",
                f"User {request.request_id.originator} is not registered for device {eui} in any role "
                f"eligible for {rule.name} ({srv}): {_roles(roles)}.",
                rule,
            )
        if device.status in INACTIVE_STATUSES:
            return _reject(
                ResponseCode.DEVICE_STATUS_INVALID,
                "device-status",
                f"Device {eui} is {device.status}: it takes no more Service Requests.",
                rule,
            )
        if device.device_type not in addressing.device_types:
            return _reject(
                ResponseCode.DEVICE_TYPE_INCOMPATIBLE,
                "device-type",
                f"{addressing.name} ({addressing.srv}) cannot address a {device.device_type} "
                f"(device {eui}); it addresses {_types(addressing.device_types)}.",
                rule,
            )
        if flagged is None:
            flagged = device.flagged_meter

    if srv in FLAG_SRVS:
        # Placeholder code: the flag handler decides the outcome (responsible supplier, exceptions).
        return Decision(Action.LOCAL, ResponseCode.SUCCESS, "flag-request", _FLAG_REQUEST, rule)
    if srv == READ_INVENTORY_SRV:
        return Decision(Action.LOCAL, ResponseCode.SUCCESS, "read-inventory", _READ_INVENTORY, rule)

    if flagged is not None and rule.refused_when_flagged:
        return _refuse(rule, f"{rule.name} ({srv}) returns consumption data", flagged)
    if flagged is not None and scheduled is not None and scheduled.refused_when_flagged:
        return _refuse(
            rule,
            f"a schedule of {scheduled.name} ({scheduled.srv}) would return consumption data",
            flagged,
        )
    return _forward(rule)


def _command_variant(request: ServiceRequest, rule: SrvRule, dcc_eui: Eui) -> Decision | None:
    """E12 for a CommandVariant that does not apply to the SRV; E16905 for a non-device request whose
    RequestID target is not the DCC."""
    variant = request.command_variant
    srv = rule.srv
    if rule.non_device:
        if variant != NON_DEVICE_COMMAND_VARIANT:
            return _reject(
                ResponseCode.COMMAND_VARIANT_NOT_APPLICABLE,
                "command-variant",
                f"{rule.name} ({srv}) is a non-device request: it needs CommandVariant 8, not {variant}.",
                rule,
            )
        if request.request_id.target != dcc_eui:
            return _reject(
                ResponseCode.NON_DEVICE_TARGET,
                "non-device-target",
                f"{rule.name} ({srv}) is a non-device request: its RequestID target must be the DCC "
                f"({dcc_eui}), not {request.request_id.target}.",
                rule,
            )
        return None
    if variant not in (CRITICAL_COMMAND_VARIANTS if rule.critical else NON_CRITICAL_COMMAND_VARIANTS):
        allowed = "4 to 7" if rule.critical else "1 to 3"
        kind = "critical" if rule.critical else "non-critical"
        return _reject(
            ResponseCode.COMMAND_VARIANT_NOT_APPLICABLE,
            "command-variant",
            f"{rule.name} ({srv}) is a {kind} device request: CommandVariant must be {allowed}, "
            f"not {variant}.",
            rule,
        )
    return None


def _authorised(user: Eui, roles: frozenset[Role], parties: DeviceParties) -> bool:
    """DUIS E4: in one of its eligible roles the user needs no device relationship or is registered
    for the device."""
    return any(role in _FREE_ROLES or parties.registered(user, role) for role in roles)


def decide_device_message(  # noqa: PLR0911 - one flat list of outcomes
    message: DeviceMessage, device: DeviceFacts | None, table: RulesTable
) -> MessageDecision:
    """Whether a device's response or alert reaches users; device None: not in the inventory."""
    flagged = device is not None and device.flagged
    if message.kind is DeviceMessageKind.RESPONSE:
        srv = message.srv
        rule = table.srvs.get(srv) if srv is not None else None
        if rule is None:
            return MessageDecision(
                Delivery.REJECT,
                "unknown-srv",
                _unknown_srv("The response", srv),
                None,
                notify_network_operator=False,
            )
        if flagged and rule.refused_when_flagged:
            return MessageDecision(
                Delivery.WITHHOLD,
                "consumer-choice",
                f"The consumer has chosen reduced communications for this device (MP169): the "
                f"{rule.name} ({rule.srv}) data it sent was not passed on.",
                rule.category,
                notify_network_operator=False,
            )
        return MessageDecision(
            Delivery.DELIVER, "delivered", _DELIVERED, rule.category, notify_network_operator=False
        )

    code = message.alert_code
    alert = table.alert(code) if code is not None else None
    # A GBCS code must come in a device alert and a DCC code (AD1, N1...) in a DCC alert.
    if alert is None or (message.kind is DeviceMessageKind.DEVICE_ALERT) != bool(
        _GBCS_ALERT_CODE.fullmatch(alert.code)
    ):
        return MessageDecision(
            Delivery.REJECT,
            "unknown-alert-code",
            f"Alert code {code} is not a known {message.kind} code in the rules table."
            if code is not None
            else "The alert carries no alert code.",
            None,
            notify_network_operator=False,
        )
    if flagged and alert.withheld_when_flagged:
        return MessageDecision(
            Delivery.WITHHOLD,
            "consumer-choice",
            f"The consumer has chosen reduced communications for this device (MP169): alert {alert.code} "
            f"{alert.name} carries consumption data and was not passed on.",
            alert.category,
            notify_network_operator=False,
        )
    if flagged and alert.redacted_when_flagged:
        return MessageDecision(
            Delivery.REDACT,
            "consumer-choice-redacted",
            f"The consumer has chosen reduced communications for this meter (MP169): alert {alert.code} "
            f"{alert.name} is Critical, so it is delivered, with its consumption payload removed.",
            alert.category,
            alert.notify_network_operator,
        )
    return MessageDecision(
        Delivery.DELIVER, "delivered", _DELIVERED, alert.category, alert.notify_network_operator
    )


_FORWARDED = "Forwarded for delivery; the response follows."
_DELIVERED = "Delivered to the users it concerns."
_FLAG_REQUEST = "MP169 flag request: decided by the gateway's flag handler."
_READ_INVENTORY = "Read Inventory: answered by the gateway, with each device's MP169 flag."


_FORWARD_DECISIONS: dict[str, Decision] = {}
"""The forward decision of each SRV, made once: it depends on the rule alone, and building a frozen
Decision costs half of deciding. Bounded by the SRVs of the rules tables in use."""


def _forward(rule: SrvRule) -> Decision:
    decision = _FORWARD_DECISIONS.get(rule.srv)
    if decision is None or decision.rule is not rule:  # first use, or another table's rule
        decision = Decision(Action.FORWARD, ResponseCode.ACKNOWLEDGED, "forwarded", _FORWARDED, rule)
        _FORWARD_DECISIONS[rule.srv] = decision
    return decision


def _reject(code: ResponseCode, reason: str, detail: str, rule: SrvRule | None = None) -> Decision:
    return Decision(Action.REJECT, code, reason, detail, rule)


def _refuse(rule: SrvRule, what: str, device: Eui) -> Decision:
    return Decision(
        Action.REFUSE,
        ResponseCode.CONSUMER_CHOICE,
        "consumer-choice",
        f"The consumer has chosen reduced communications for device {device} (MP169): {what}, "
        "so it was not sent.",
        rule,
    )


def _unknown_srv(what: str, srv: str | None) -> str:
    if srv is None:
        return f"{what} names no SRV."
    return f"{what} names SRV {srv}, which is not in the rules table."


def _roles(roles: frozenset[Role]) -> str:
    return " ".join(sorted(role.value for role in roles))


def _types(types: frozenset[DeviceType]) -> str:
    return ", ".join(sorted(device_type.value for device_type in types))
