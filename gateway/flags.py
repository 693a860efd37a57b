"""MP169 flag Service Requests (8.15.1 set, 8.15.2 remove): may this supplier change this device's flag?

Pure: `evaluate_flag_request` looks only at its arguments. The checks run in a fixed order and the
first that fails gives the answer, each with its own response code (rules/codes.py) so the supplier
can tell the customer why. A requester that is not the device's responsible supplier learns
nothing about the device beyond that.

A clear is checked like a set except for the site exceptions and the declaration: those stop a
flag being set, never a supplier restoring full communications.
"""

from __future__ import annotations

from dataclasses import dataclass

from rules.codes import ResponseCode
from rules.domain import (
    DeviceRecord,
    DeviceStatus,
    DeviceType,
    Eui,
    FlagInstruction,
    Tariff,
    responsible_supplier,
)

FLAGGABLE_DEVICE_TYPES = frozenset({DeviceType.ESME, DeviceType.GSME})


@dataclass(frozen=True, slots=True)
class FlagVerdict:
    accepted: bool
    code: ResponseCode
    reason: str
    """Machine-readable, kebab-case."""
    detail: str
    """A sentence the supplier can pass on to the customer."""
    changed: bool
    """An accepted request that changes the flag (False for a refusal or an idempotent repeat)."""


def _refuse(code: ResponseCode, reason: str, detail: str) -> FlagVerdict:
    return FlagVerdict(accepted=False, code=code, reason=reason, detail=detail, changed=False)


def evaluate_flag_request(
    instruction: FlagInstruction,
    requester: Eui,
    device: DeviceRecord | None,
    comms_hub: DeviceRecord | None,
    currently_flagged: bool,
) -> FlagVerdict:
    """Decide a flag set or clear from the inventory entries of the device and of its comms hub.

    `comms_hub` is the inventory entry named by `device.comms_hub_id` (None if there is none).
    """
    if device is None:
        return _refuse(
            ResponseCode.UNKNOWN_DEVICE,
            "unknown-device",
            f"Device {instruction.device_id} is not in the Smart Metering Inventory.",
        )
    if device.device_id != instruction.device_id:
        raise ValueError(f"inventory entry {device.device_id} given for device {instruction.device_id}")
    if comms_hub is not None and comms_hub.device_id != device.comms_hub_id:
        raise ValueError(f"inventory entry {comms_hub.device_id} is not the comms hub of {device.device_id}")
    refusal = _device_refusal(requester, device, comms_hub)
    if refusal is None and instruction.set:
        refusal = _set_refusal(instruction, device)
    if refusal is not None:
        return refusal
    return _accepted(instruction.set, changed=instruction.set != currently_flagged)


def _device_refusal(
    requester: Eui, device: DeviceRecord, comms_hub: DeviceRecord | None
) -> FlagVerdict | None:
    """The checks a set and a clear must both pass, in order."""
    if device.device_type not in FLAGGABLE_DEVICE_TYPES:
        return _refuse(
            ResponseCode.FLAG_DEVICE_TYPE,
            "device-type",
            "Only an electricity meter (ESME) or a gas meter (GSME) can have reduced communications.",
        )
    if requester != responsible_supplier(device):
        return _refuse(
            ResponseCode.NOT_RESPONSIBLE_SUPPLIER,
            "not-responsible-supplier",
            "Only the meter's responsible supplier can set or remove reduced communications.",
        )
    if device.smets != 2:
        return _refuse(
            ResponseCode.FLAG_NOT_SMETS2,
            "not-smets2",
            "Reduced communications applies to SMETS2 meters only; this meter is not SMETS2.",
        )
    if device.status is not DeviceStatus.COMMISSIONED:
        return _refuse(
            ResponseCode.FLAG_DEVICE_NOT_COMMISSIONED,
            "device-not-commissioned",
            f"The meter is not commissioned (status {device.status}); try again once it is.",
        )
    if comms_hub is None or comms_hub.status is not DeviceStatus.COMMISSIONED:
        status = "none" if comms_hub is None else comms_hub.status
        return _refuse(
            ResponseCode.FLAG_COMMS_HUB_NOT_COMMISSIONED,
            "comms-hub-not-commissioned",
            f"The communications hub the meter is joined to is not commissioned (status {status}).",
        )
    return None


def _accepted(set_flag: bool, *, changed: bool) -> FlagVerdict:
    if set_flag:
        reason = "flag-set" if changed else "flag-already-set"
        detail = (
            "Communications with the meter are now reduced at the consumer's choice."
            if changed
            else "Communications with the meter were already reduced at the consumer's choice."
        )
    else:
        reason = "flag-cleared" if changed else "flag-already-clear"
        detail = (
            "Full communications with the meter are restored."
            if changed
            else "Communications with the meter were not reduced; nothing changed."
        )
    return FlagVerdict(
        accepted=True, code=ResponseCode.SUCCESS, reason=reason, detail=detail, changed=changed
    )


def _set_refusal(instruction: FlagInstruction, device: DeviceRecord) -> FlagVerdict | None:
    """The checks only a set must pass: the supplier's declaration and the site exceptions."""
    if not instruction.all_reasonable_steps_taken:
        return _refuse(
            ResponseCode.FLAG_DECLARATION_MISSING,
            "declaration-missing",
            "The supplier must declare that all reasonable steps to install a fully communicating "
            "meter were taken (AllReasonableStepsTaken true).",
        )
    if device.tariff in {Tariff.MULTI_RATE, Tariff.ECONOMY7}:
        return _refuse(
            ResponseCode.FLAG_MULTI_RATE_TARIFF,
            "multi-rate-tariff",
            "The site's multi-rate tariff (such as Economy 7) needs the meter to communicate.",
        )
    if device.tariff is Tariff.RTS:
        return _refuse(
            ResponseCode.FLAG_RADIO_TELESWITCH,
            "radio-teleswitch",
            "The site uses Radio Teleswitch, which needs the meter to communicate.",
        )
    if not device.wan:
        return _refuse(
            ResponseCode.FLAG_NO_WAN,
            "no-wan",
            "The site is network-managed without WAN coverage, where the meter must communicate.",
        )
    return None
