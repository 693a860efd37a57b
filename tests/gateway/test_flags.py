"""evaluate_flag_request: who may set or clear the MP169 flag, and why a request is refused."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.flags import FlagVerdict, evaluate_flag_request
from rules.codes import ResponseCode
from rules.domain import DeviceStatus, DeviceType, Eui, FlagInstruction, Tariff
from tests.gateway.test_inventory import (
    AGENT,
    DISTRIBUTOR,
    EXPORT_SUPPLIER,
    GAS_METER,
    GAS_SUPPLIER,
    IMPORT_SUPPLIER,
    METER,
    NEW_SUPPLIER,
    OTHER_USER,
    TRANSPORTER,
    comms_hub,
    esme,
    gsme,
)

if TYPE_CHECKING:
    from rules.domain import DeviceRecord

SET = FlagInstruction(METER, set=True, all_reasonable_steps_taken=True, consumer_reference="CR-1")
CLEAR = FlagInstruction(METER, set=False, all_reasonable_steps_taken=False)


def verdict(
    instruction: FlagInstruction = SET,
    requester: Eui = IMPORT_SUPPLIER,
    device: DeviceRecord | None = None,
    hub: DeviceRecord | None = None,
    *,
    flagged: bool = False,
    no_hub: bool = False,
) -> FlagVerdict:
    return evaluate_flag_request(
        instruction,
        requester,
        device if device is not None else esme(),
        None if no_hub else (hub or comms_hub()),
        flagged,
    )


def test_the_responsible_supplier_sets_an_unflagged_meter() -> None:
    result = verdict()
    assert result == FlagVerdict(
        accepted=True,
        code=ResponseCode.SUCCESS,
        reason="flag-set",
        detail="Communications with the meter are now reduced at the consumer's choice.",
        changed=True,
    )


def test_the_responsible_supplier_clears_a_flagged_meter() -> None:
    result = verdict(CLEAR, flagged=True)
    assert (result.accepted, result.code, result.reason, result.changed) == (
        True,
        ResponseCode.SUCCESS,
        "flag-cleared",
        True,
    )


def test_the_gas_supplier_is_responsible_for_a_gas_meter() -> None:
    instruction = FlagInstruction(GAS_METER, set=True, all_reasonable_steps_taken=True)
    assert verdict(instruction, GAS_SUPPLIER, gsme()).changed
    refused = verdict(instruction, IMPORT_SUPPLIER, gsme())
    assert refused.code is ResponseCode.NOT_RESPONSIBLE_SUPPLIER


@pytest.mark.parametrize(
    ("instruction", "flagged", "reason"),
    [(SET, True, "flag-already-set"), (CLEAR, False, "flag-already-clear")],
)
def test_repeating_a_request_is_accepted_and_changes_nothing(
    instruction: FlagInstruction, flagged: bool, reason: str
) -> None:
    result = verdict(instruction, flagged=flagged)
    assert (result.accepted, result.code, result.reason, result.changed) == (
        True,
        ResponseCode.SUCCESS,
        reason,
        False,
    )


@pytest.mark.parametrize(
    "requester",
    [EXPORT_SUPPLIER, NEW_SUPPLIER, GAS_SUPPLIER, DISTRIBUTOR, TRANSPORTER, AGENT, OTHER_USER],
    ids=["export-supplier", "other-supplier", "gas-supplier", "ED", "GT", "RSA", "OU"],
)
@pytest.mark.parametrize("instruction", [SET, CLEAR], ids=["set", "clear"])
def test_anyone_but_the_responsible_supplier_is_refused_and_told_nothing(
    requester: Eui, instruction: FlagInstruction
) -> None:
    # Even on an SMETS1 meter behind an uncommissioned hub: the answer must not reveal that.
    result = verdict(
        instruction,
        requester,
        esme(smets=1, tariff=Tariff.RTS),
        comms_hub(status=DeviceStatus.PENDING),
    )
    assert result == FlagVerdict(
        accepted=False,
        code=ResponseCode.NOT_RESPONSIBLE_SUPPLIER,
        reason="not-responsible-supplier",
        detail="Only the meter's responsible supplier can set or remove reduced communications.",
        changed=False,
    )


def test_a_meter_without_a_responsible_supplier_cannot_be_flagged() -> None:
    result = verdict(device=esme(import_supplier=None))
    assert result.code is ResponseCode.NOT_RESPONSIBLE_SUPPLIER


def test_an_unknown_device_is_e19() -> None:
    result = evaluate_flag_request(SET, IMPORT_SUPPLIER, None, None, False)
    assert (result.accepted, result.code, result.reason) == (
        False,
        ResponseCode.UNKNOWN_DEVICE,
        "unknown-device",
    )
    assert METER in result.detail


@pytest.mark.parametrize("device_type", [DeviceType.CHF, DeviceType.GPF, DeviceType.PPMID, DeviceType.IHD])
def test_only_meters_carry_the_flag(device_type: DeviceType) -> None:
    result = verdict(device=esme(device_type=device_type))
    assert (result.code, result.reason) == (ResponseCode.FLAG_DEVICE_TYPE, "device-type")


@pytest.mark.parametrize("instruction", [SET, CLEAR], ids=["set", "clear"])
@pytest.mark.parametrize(
    ("device", "hub", "code", "reason"),
    [
        (esme(smets=1), comms_hub(), ResponseCode.FLAG_NOT_SMETS2, "not-smets2"),
        (
            esme(status=DeviceStatus.INSTALLED_NOT_COMMISSIONED),
            comms_hub(),
            ResponseCode.FLAG_DEVICE_NOT_COMMISSIONED,
            "device-not-commissioned",
        ),
        (
            esme(status=DeviceStatus.SUSPENDED),
            comms_hub(),
            ResponseCode.FLAG_DEVICE_NOT_COMMISSIONED,
            "device-not-commissioned",
        ),
        (
            esme(),
            comms_hub(status=DeviceStatus.INSTALLED_NOT_COMMISSIONED),
            ResponseCode.FLAG_COMMS_HUB_NOT_COMMISSIONED,
            "comms-hub-not-commissioned",
        ),
    ],
)
def test_device_and_comms_hub_preconditions_hold_for_set_and_clear(
    instruction: FlagInstruction, device: DeviceRecord, hub: DeviceRecord, code: ResponseCode, reason: str
) -> None:
    result = verdict(instruction, device=device, hub=hub, flagged=not instruction.set)
    assert (result.accepted, result.code, result.reason, result.changed) == (False, code, reason, False)


def test_a_meter_with_no_comms_hub_in_the_inventory_is_refused() -> None:
    result = verdict(device=esme(comms_hub_id=None), no_hub=True)
    assert result.code is ResponseCode.FLAG_COMMS_HUB_NOT_COMMISSIONED
    assert "status none" in result.detail


@pytest.mark.parametrize(
    ("device", "code", "reason"),
    [
        (esme(tariff=Tariff.MULTI_RATE), ResponseCode.FLAG_MULTI_RATE_TARIFF, "multi-rate-tariff"),
        (esme(tariff=Tariff.ECONOMY7), ResponseCode.FLAG_MULTI_RATE_TARIFF, "multi-rate-tariff"),
        (esme(tariff=Tariff.RTS), ResponseCode.FLAG_RADIO_TELESWITCH, "radio-teleswitch"),
        (esme(wan=False), ResponseCode.FLAG_NO_WAN, "no-wan"),
    ],
)
def test_site_exceptions_refuse_a_set_but_never_a_clear(
    device: DeviceRecord, code: ResponseCode, reason: str
) -> None:
    refused = verdict(device=device)
    assert (refused.accepted, refused.code, refused.reason) == (False, code, reason)
    # The supplier can always restore full communications.
    assert verdict(CLEAR, device=device, flagged=True).changed


def test_a_set_without_the_declaration_is_refused() -> None:
    instruction = FlagInstruction(METER, set=True, all_reasonable_steps_taken=False)
    result = verdict(instruction)
    assert (result.code, result.reason) == (ResponseCode.FLAG_DECLARATION_MISSING, "declaration-missing")


def test_checks_run_in_the_documented_order() -> None:
    # Everything wrong at once: the device type is reported first, then responsibility, and so on.
    everything_wrong = esme(smets=1, status=DeviceStatus.PENDING, tariff=Tariff.RTS, wan=False)
    undeclared = FlagInstruction(METER, set=True, all_reasonable_steps_taken=False)
    bad_hub = comms_hub(status=DeviceStatus.PENDING)
    codes = [
        verdict(undeclared, device=everything_wrong, hub=bad_hub).code,
        verdict(undeclared, device=esme(status=DeviceStatus.PENDING, tariff=Tariff.RTS), hub=bad_hub).code,
        verdict(undeclared, device=esme(tariff=Tariff.RTS, wan=False), hub=bad_hub).code,
        verdict(undeclared, device=esme(tariff=Tariff.RTS, wan=False)).code,
        verdict(device=esme(tariff=Tariff.ECONOMY7, wan=False)).code,
        verdict(device=esme(tariff=Tariff.RTS, wan=False)).code,
    ]
    assert codes == [
        ResponseCode.FLAG_NOT_SMETS2,
        ResponseCode.FLAG_DEVICE_NOT_COMMISSIONED,
        ResponseCode.FLAG_COMMS_HUB_NOT_COMMISSIONED,
        ResponseCode.FLAG_DECLARATION_MISSING,
        ResponseCode.FLAG_MULTI_RATE_TARIFF,
        ResponseCode.FLAG_RADIO_TELESWITCH,
    ]


def test_inconsistent_inventory_entries_are_a_caller_error() -> None:
    with pytest.raises(ValueError, match="given for device"):
        verdict(device=gsme())
    with pytest.raises(ValueError, match="is not the comms hub"):
        verdict(hub=comms_hub(device_id=Eui("00-DB-12-34-56-78-90-B2")))


_devices = st.builds(
    esme,
    smets=st.sampled_from([1, 2]),
    status=st.sampled_from(list(DeviceStatus)),
    import_supplier=st.sampled_from([IMPORT_SUPPLIER, NEW_SUPPLIER, None]),
    tariff=st.sampled_from(list(Tariff)),
    wan=st.booleans(),
)


@given(
    device=_devices,
    hub_status=st.sampled_from(list(DeviceStatus)),
    requester=st.sampled_from([IMPORT_SUPPLIER, NEW_SUPPLIER, OTHER_USER]),
    set_flag=st.booleans(),
    declared=st.booleans(),
    flagged=st.booleans(),
)
def test_verdicts_are_consistent(
    *,
    device: DeviceRecord,
    hub_status: DeviceStatus,
    requester: Eui,
    set_flag: bool,
    declared: bool,
    flagged: bool,
) -> None:
    instruction = FlagInstruction(METER, set=set_flag, all_reasonable_steps_taken=declared)
    result = verdict(instruction, requester, device, comms_hub(status=hub_status), flagged=flagged)
    assert result.reason == result.reason.lower()
    assert " " not in result.reason
    assert result.detail.endswith(".")
    assert result.accepted == (result.code is ResponseCode.SUCCESS)
    assert result.changed == (result.accepted and set_flag != flagged)
    if result.accepted:
        assert requester == device.import_supplier
        assert device.smets == 2
        assert DeviceStatus.COMMISSIONED == device.status == hub_status
    if result.accepted and set_flag:
        assert declared
        assert device.wan
        assert device.tariff is Tariff.SINGLE
