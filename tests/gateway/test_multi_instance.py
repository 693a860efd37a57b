"""Two gateway instances on one shared subscription, over one Mosquitto and one PostgreSQL.

Every publish of both instances goes, in call order, into one log (one process, one event loop:
a total order). The MP169 guarantee across instances is checked on it: once an instance has
published the supplier's I0 to the flag-set, no instance publishes a command to the meter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from gateway.config import Settings
from gateway.mqtt import MqttTransport
from gateway.postgres import PostgresStore
from gateway.report.compute import Period
from gateway.report.load import load_report
from gateway.service import GatewayService
from rules.codes import ResponseCode
from rules.domain import utc_now
from tests.gateway.messages import CONSUMPTION_SRV, flag_request, header, request
from tests.gateway.test_daemon import Estate, estate, rid, signing_settings
from tests.gateway.test_inventory import IMPORT_SUPPLIER, METER, USERS, premise

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from gateway.pki import PkiLayout
    from gateway.transport import Handler

pytestmark = pytest.mark.broker
__all__ = ["estate"]  # the fixture, imported to be used here


@dataclass(frozen=True, slots=True)
class Published:
    instance: str
    topic: str
    payload: bytes


class Recorded:
    """An instance's MQTT transport whose publishes are logged, at the call, in one shared list."""

    def __init__(self, inner: MqttTransport, instance: str, log: list[Published]) -> None:
        self.inner = inner
        self.instance = instance
        self.log = log

    async def start(self, subscriptions: Sequence[str], handler: Handler) -> None:
        await self.inner.start(subscriptions, handler)

    async def publish(self, topic: str, payload: bytes) -> None:
        self.log.append(Published(self.instance, topic, payload))
        await self.inner.publish(topic, payload)

    async def stop(self) -> None:
        await self.inner.stop()


def instance_settings(broker_url: str, store_url: str, name: str, pki: PkiLayout) -> Settings:
    return Settings.model_validate(
        {
            "broker": {"url": broker_url, "reconnect_min_seconds": 0.05, "reconnect_max_seconds": 0.5},
            "store": {"url": store_url, "lease_seconds": 5},
            "topics": {"shared_group": "gw"},
            "gateway": {"metrics_port": 0, "client_id": name},
            "signing": signing_settings(pki),
        }
    )


@pytest.fixture
async def group(
    estate: Estate, postgres_url: str
) -> AsyncIterator[tuple[list[GatewayService], list[Published]]]:
    async with PostgresStore(postgres_url) as store:
        await store.upsert_devices(premise())
        await store.upsert_users(USERS)
    log: list[Published] = []
    services = []
    for name in ("gw-1", "gw-2"):
        settings = instance_settings(estate.url, postgres_url, name, estate.pki)
        transport = Recorded(MqttTransport(settings.broker, name), name, log)
        services.append(await GatewayService.start(settings, transport))
    yield services, log
    for service in services:
        await service.stop()


async def test_no_instance_forwards_consumption_after_the_flag_set_is_answered(
    estate: Estate, group: tuple[list[GatewayService], list[Published]]
) -> None:
    services, log = group
    dcc = services[0].dcc_eui
    # Reads before, during and after the flag request (counter 41), all from one supplier.
    counters = [*range(1, 41), *range(42, 122)]
    reads = [request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, counter) for counter in counters]
    for payload in reads[:40]:
        await estate.send(IMPORT_SUPPLIER, payload)
    await estate.send(IMPORT_SUPPLIER, flag_request(IMPORT_SUPPLIER, 41, METER, set_flag=True))
    for payload in reads[40:80]:
        await estate.send(IMPORT_SUPPLIER, payload)
    flag_rid = rid(IMPORT_SUPPLIER, dcc, 41)
    assert await estate.answers.until_answered(flag_rid) == [ResponseCode.SUCCESS]
    for payload in reads[80:]:
        await estate.send(IMPORT_SUPPLIER, payload)
    for counter in counters:
        await estate.answers.until_answered(rid(IMPORT_SUPPLIER, METER, counter))

    answered_at = next(
        index
        for index, published in enumerate(log)
        if published.topic == f"dsp/out/{IMPORT_SUPPLIER}" and header(published.payload)[0] == flag_rid
    )
    command_topic = f"dsp/device/{METER}/cmd"
    forwards = [index for index, published in enumerate(log) if published.topic == command_topic]
    assert forwards  # the reads before the flag reached the meter
    assert max(forwards) < answered_at
    # After the I0 both instances decided reads, and refused every one (consumer choice).
    after = [
        (published.instance, header(published.payload)[1])
        for published in log[answered_at + 1 :]
        if published.topic == f"dsp/out/{IMPORT_SUPPLIER}"
    ]
    late_reads = {rid(IMPORT_SUPPLIER, METER, counter) for counter in counters[80:]}
    for counter in late_reads:
        assert estate.answers.codes(counter) == [ResponseCode.CONSUMER_CHOICE]
    assert {instance for instance, code in after if code == ResponseCode.CONSUMER_CHOICE} == {"gw-1", "gw-2"}
    for service in services:
        assert service.view.is_flagged(METER)


async def test_a_request_id_sent_to_both_instances_is_acted_on_once(
    estate: Estate, group: tuple[list[GatewayService], list[Published]]
) -> None:
    _, log = group
    payload = request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 7)
    await estate.send(IMPORT_SUPPLIER, payload)
    await estate.send(IMPORT_SUPPLIER, payload)  # round-robin: the other instance gets the repeat
    codes = await estate.answers.until_answered(rid(IMPORT_SUPPLIER, METER, 7), 3)
    assert sorted(codes) == sorted(
        [ResponseCode.ACKNOWLEDGED, ResponseCode.SUCCESS, ResponseCode.DUPLICATE_REQUEST_ID]
    )
    forwards = [published for published in log if published.topic == f"dsp/device/{METER}/cmd"]
    refusals = [
        published
        for published in log
        if header(published.payload) == (rid(IMPORT_SUPPLIER, METER, 7), ResponseCode.DUPLICATE_REQUEST_ID)
    ]
    assert len(forwards) == 1
    assert len(refusals) == 1
    assert forwards[0].instance != refusals[0].instance  # decided apart, settled by the store


async def test_both_instances_record_outcomes_into_the_one_database_and_one_report_covers_them(
    estate: Estate, group: tuple[list[GatewayService], list[Published]], postgres_url: str
) -> None:
    services, log = group
    started = utc_now()
    for counter in range(1, 21):
        await estate.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, counter))
    for counter in range(1, 21):
        await estate.answers.until_answered(rid(IMPORT_SUPPLIER, METER, counter))
    for service in services:
        await service.recorder.flush()
    deciders = {p.instance for p in log if p.topic == f"dsp/out/{IMPORT_SUPPLIER}"}
    assert deciders == {"gw-1", "gw-2"}  # the group shared the work
    now = utc_now()
    report = await load_report(
        postgres_url, Period(started, now), target_response_seconds=30, generated_at=now
    )
    assert (report.totals.requests, report.totals.forwarded) == (20, 20)
    assert sum(row.installed for row in report.installation) == 2  # the premises' ESME and GSME
