"""Inbound sessions (gateway.inbound_sessions > 1) against a real Mosquitto.

Waiting is event-driven; GUARD_SECONDS only turns a hang into a failure. "The burst is still queued"
is proved by state, not time: the burst's handlers are held until the quiet User's answer arrived.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from gateway.daemon import DEVICE_SESSION_SUFFIX
from gateway.inbound import InboundSessions, shard_of
from gateway.mqtt import MqttTransport
from gateway.service import DeviceSession, GatewayService
from gateway.store import SqliteStore
from rules.codes import ResponseCode
from tests.gateway.messages import CONSUMPTION_SRV, request
from tests.gateway.test_daemon import Estate, estate, gateway_settings, rid
from tests.gateway.test_inventory import GAS_SUPPLIER, IMPORT_SUPPLIER, METER, NEW_SUPPLIER, USERS, premise
from tests.gateway.test_mqtt import GUARD_SECONDS, Inbox, settings_for

if TYPE_CHECKING:
    from pathlib import Path

    from gateway.transport import Message
    from rules.domain import Eui
    from simulator.mosquitto import Mosquitto

pytestmark = pytest.mark.broker
__all__ = ["estate"]  # the broker-backed users and devices fixture, shared with test_daemon

LOUD = IMPORT_SUPPLIER
QUIET = GAS_SUPPLIER
# The smallest number of sessions that puts LOUD and QUIET in different ones.
SHARDS = next(n for n in range(2, 9) if shard_of(LOUD, n) != shard_of(QUIET, n))
BURST = 200
WINDOW = 2


async def test_a_burst_does_not_stop_another_users_request_while_it_is_queued(mosquitto: Mosquitto) -> None:
    settings = settings_for(mosquitto.url)
    answers = Inbox()
    users = MqttTransport(settings, "test-users")
    await users.start(["dsp/out/+"], answers)
    main = MqttTransport(settings, "gw")
    sessions = [MqttTransport(settings, f"gw-in-{k}", receive_maximum=WINDOW) for k in range(SHARDS)]
    inbound = InboundSessions(main, sessions, inbound="dsp/in", limit=WINDOW * SHARDS)
    loud_started: list[bytes] = []
    let_loud_go = asyncio.Event()

    async def answer(message: Message) -> None:
        user = message.topic.rsplit("/", 1)[1]
        if user == LOUD:
            loud_started.append(message.payload)
            await let_loud_go.wait()
        await main.publish(f"dsp/out/{user}", message.payload)

    await main.start([], inbound.attach(answer))
    await inbound.start([LOUD, QUIET])
    try:
        for n in range(BURST):
            await users.publish(f"dsp/in/{LOUD}", b"loud %d" % n)
        await users.publish(f"dsp/in/{QUIET}", b"quiet")
        await answers.until_payload(b"quiet")
        # Answered while the burst is held: at most its session's window taken, the rest still queued.
        assert 1 <= len(loud_started) <= WINDOW
        assert answers.payloads == [b"quiet"]
        let_loud_go.set()
        await answers.until(lambda messages: len(messages) == BURST + 1)
        # The burst in its User's order.
        assert answers.payloads[1:] == [b"loud %d" % n for n in range(BURST)]
    finally:
        let_loud_go.set()
        await inbound.stop()
        await main.stop()
        await users.abort()


async def seed(path: Path, users: list[Eui]) -> None:
    async with SqliteStore(path) as store:
        await store.upsert_devices(premise())
        await store.upsert_users([user for user in USERS if user.user_id in users])


async def start_gateway(estate: Estate, store: Path, sessions: int) -> GatewayService:
    """As `mp169 run` starts it: a request session, a device session, `sessions` inbound ones."""
    settings = gateway_settings(estate.url, store, estate.pki, inbound_sessions=sessions)
    main = MqttTransport(settings.broker, settings.gateway.client_id)
    devices = MqttTransport(settings.broker, f"{settings.gateway.client_id}{DEVICE_SESSION_SUFFIX}")
    inbound = InboundSessions.from_settings(settings, main) if sessions > 1 else None
    return await GatewayService.start(
        settings, main, devices=DeviceSession(devices, main.flushed), inbound=inbound
    )


@pytest.fixture
async def store(tmp_path: Path) -> Path:
    path = tmp_path / "gw.sqlite3"
    await seed(path, [LOUD, QUIET])
    return path


async def until_subscribed(service: GatewayService, user: Eui) -> None:
    assert service.inbound is not None
    async with asyncio.timeout(GUARD_SECONDS):
        while user not in service.inbound.subscribed:  # noqa: ASYNC110 - housekeeping subscribes it
            await asyncio.sleep(0.05)


async def test_requests_are_answered_and_a_new_user_is_subscribed(estate: Estate, store: Path) -> None:
    service = await start_gateway(estate, store, SHARDS)
    try:
        for counter, user in enumerate((LOUD, QUIET), start=1):
            await estate.send(user, request(CONSUMPTION_SRV, user, METER, counter))
        assert await estate.answers.until_answered(rid(LOUD, METER, 1), 2) == [
            ResponseCode.ACKNOWLEDGED,
            ResponseCode.SUCCESS,
        ]
        assert await estate.answers.until_answered(rid(QUIET, METER, 2)) != []
        # Registered while the gateway runs: subscribed at the next inventory refresh.
        async with SqliteStore(store) as writer:
            await writer.upsert_users([user for user in USERS if user.user_id == NEW_SUPPLIER])
        await until_subscribed(service, NEW_SUPPLIER)
        await estate.send(NEW_SUPPLIER, request(CONSUMPTION_SRV, NEW_SUPPLIER, METER, 1))
        assert await estate.answers.until_answered(rid(NEW_SUPPLIER, METER, 1)) != []
    finally:
        await service.stop()


async def test_what_one_session_left_queued_is_answered_once_by_several(estate: Estate, store: Path) -> None:
    single = await start_gateway(estate, store, 1)
    await single.stop()
    # Queued for the request session's dsp/in/+ while no gateway runs.
    await estate.send(LOUD, request(CONSUMPTION_SRV, LOUD, METER, 1))
    several = await start_gateway(estate, store, SHARDS)
    try:
        await estate.send(LOUD, request(CONSUMPTION_SRV, LOUD, METER, 2))
        await estate.send(LOUD, request(CONSUMPTION_SRV, LOUD, METER, 3))
        for counter in (1, 2, 3):
            await estate.answers.until_answered(rid(LOUD, METER, counter), 2)
        # A later request answered after them: a copy through dsp/in/+ would have come by now.
        await estate.send(LOUD, request(CONSUMPTION_SRV, LOUD, METER, 4))
        await estate.answers.until_answered(rid(LOUD, METER, 4), 2)
        for counter in (1, 2, 3):
            assert estate.answers.codes(rid(LOUD, METER, counter)) == [
                ResponseCode.ACKNOWLEDGED,
                ResponseCode.SUCCESS,
            ]
    finally:
        await several.stop()


async def test_instances_in_a_shared_group_share_each_users_topic(mosquitto: Mosquitto) -> None:
    settings = settings_for(mosquitto.url)
    handled: dict[str, list[bytes]] = {"a": [], "b": []}
    changed = asyncio.Event()
    instances: list[tuple[MqttTransport, InboundSessions]] = []
    for name, into in handled.items():
        main = MqttTransport(settings, f"gw-{name}")
        sessions = [MqttTransport(settings, f"gw-{name}-in-{k}") for k in range(SHARDS)]
        inbound = InboundSessions(main, sessions, inbound="dsp/in", shared_group="gw")

        async def record(message: Message, payloads: list[bytes] = into) -> None:
            payloads.append(message.payload)
            changed.set()

        await main.start([], inbound.attach(record))
        await inbound.start([LOUD, QUIET])
        instances.append((main, inbound))
    users = MqttTransport(settings, "test-users")
    await users.start([], Inbox())
    try:
        sent = [(user, b"%s %d" % (user.encode(), n)) for n in range(50) for user in (LOUD, QUIET)]
        for user, payload in sent:
            await users.publish(f"dsp/in/{user}", payload)
        async with asyncio.timeout(GUARD_SECONDS):
            while sum(len(payloads) for payloads in handled.values()) < len(sent):
                changed.clear()
                await changed.wait()
        # A later message through both instances' sessions proves nothing more was on its way.
        await users.publish(f"dsp/in/{QUIET}", b"last")
        async with asyncio.timeout(GUARD_SECONDS):
            while not any(b"last" in payloads for payloads in handled.values()):
                changed.clear()
                await changed.wait()
        everything = handled["a"] + handled["b"]
        # Each message handled once, by one of the instances; both took a share.
        assert sorted(everything) == sorted([payload for _, payload in sent] + [b"last"])
        assert handled["a"]
        assert handled["b"]
    finally:
        for main, inbound in instances:
            await inbound.stop()
            await main.stop()
        await users.abort()
