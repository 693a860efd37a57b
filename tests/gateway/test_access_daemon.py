"""MP169 coverage and DCC access control end to end over a real Mosquitto: the gas meter flagged, gas
reads through its GPF refused, firmware and security to the same devices still forwarded."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from gateway.mqtt import MqttTransport
from gateway.service import GatewayService
from gateway.store import SqliteStore
from rules.codes import ResponseCode
from rules.domain import DeviceType
from tests.gateway.messages import flag_request, request
from tests.gateway.test_daemon import Estate, estate, gateway_settings, rid
from tests.gateway.test_inventory import (
    GAS_METER,
    GAS_PROXY,
    GAS_SUPPLIER,
    IMPORT_SUPPLIER,
    USERS,
    gsme,
    premise,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

pytestmark = pytest.mark.broker
__all__ = ["estate"]  # the broker-backed users and devices fixture, shared with test_daemon

ACKNOWLEDGED_THEN_ANSWERED = [ResponseCode.ACKNOWLEDGED, ResponseCode.SUCCESS]


@pytest.fixture
async def service(tmp_path: Path, estate: Estate) -> AsyncIterator[GatewayService]:
    path = tmp_path / "gw.sqlite3"
    async with SqliteStore(path) as store:
        # The premise's GPF, on the same comms hub as its GSME.
        await store.upsert_devices(
            [*premise(), gsme(device_id=GAS_PROXY, device_type=DeviceType.GPF, mpxn=None)]
        )
        await store.upsert_users(USERS)
    settings = gateway_settings(estate.url, path, estate.pki)
    running = await GatewayService.start(settings, MqttTransport(settings.broker, settings.gateway.client_id))
    yield running
    await running.stop()


async def test_gas_reads_through_the_gpf_are_refused_while_firmware_and_security_flow(
    estate: Estate, service: GatewayService
) -> None:
    counter = iter(range(1, 100))

    async def ask(srv: str, device: str, count: int = 1, user: str = GAS_SUPPLIER) -> list[str]:
        number = next(counter)
        await estate.send(user, request(srv, user, device, number))
        return await estate.answers.until_answered(rid(user, device, number), count)

    # Before the flag: a gas read through the GPF is forwarded and answered.
    assert await ask("4.1.1", GAS_PROXY, 2) == ACKNOWLEDGED_THEN_ANSWERED
    flag = next(counter)
    await estate.send(GAS_SUPPLIER, flag_request(GAS_SUPPLIER, flag, GAS_METER, set_flag=True))
    assert await estate.answers.until_answered(rid(GAS_SUPPLIER, service.dcc_eui, flag)) == [
        ResponseCode.SUCCESS
    ]

    # The GSME's registers, profiles, prepayment values and logs, read where DCC reads them: refused.
    for srv in ("4.1.1", "4.1.4", "4.8.1", "4.18", "4.3", "4.17"):
        assert await ask(srv, GAS_PROXY) == [ResponseCode.CONSUMER_CHOICE], srv
    # Firmware and security to the same devices flow.
    assert await ask("11.2", GAS_PROXY, 2) == ACKNOWLEDGED_THEN_ANSWERED  # Read Firmware Version
    assert await ask("11.2", GAS_METER, 2) == ACKNOWLEDGED_THEN_ANSWERED
    assert await ask("6.21", GAS_PROXY, 2) == ACKNOWLEDGED_THEN_ANSWERED  # handover of DCC-controlled device
    assert await ask("6.15.1", GAS_METER, 2) == ACKNOWLEDGED_THEN_ANSWERED  # Update Security Credentials
    # DCC access control on the same devices: a register read addressed to the GSME itself is not what
    # DUIS allows (E11); the import supplier is not registered for the gas devices (E4).
    assert await ask("4.1.1", GAS_METER) == [ResponseCode.DEVICE_TYPE_INCOMPATIBLE]
    assert await ask("11.2", GAS_PROXY, user=IMPORT_SUPPLIER) == [ResponseCode.DEVICE_NOT_AUTHORISED]
