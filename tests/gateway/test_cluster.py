"""ClusterMember with the shell, on the session's private PostgreSQL: fencing and catching up.

The member's monotonic clock is the test's: moving it past the lease is a lease that could not be
confirmed (a partition from the store), without waiting for one.
"""

from __future__ import annotations

import asyncio

from gateway.cluster import ClusterMember
from gateway.postgres import PostgresStore
from gateway.router import Router, RouterSettings
from gateway.shell import Shell
from gateway.store import CommitBatch
from gateway.transport import Message
from gateway.view import RoutingView
from rules.codes import ResponseCode
from rules.table import default_table
from tests.gateway.messages import CONSUMPTION_SRV, DCC, header, request
from tests.gateway.test_inventory import IMPORT_SUPPLIER, METER, USERS, premise
from tests.gateway.test_store import event

LEASE = 3.0


class Instance:
    def __init__(self, store: PostgresStore, view: RoutingView, name: str) -> None:
        self.seconds = [0.0]
        self.published: list[tuple[str, bytes]] = []
        self.member = ClusterMember(store, view, name, lease_seconds=LEASE, monotonic=lambda: self.seconds[0])
        router = Router(table=default_table(), view=view, settings=RouterSettings(dcc_eui=DCC))
        self.shell = Shell(router, store=store, publish=self.publish, member=self.member)

    async def publish(self, topic: str, payload: bytes) -> None:
        await asyncio.sleep(0)
        self.published.append((topic, payload))

    def answered(self) -> list[tuple[str | None, str | None]]:
        return [header(payload) for topic, payload in self.published if topic.startswith("dsp/out/")]


async def _instance(store: PostgresStore, name: str) -> Instance:
    epoch = await store.flag_epoch()
    instance = Instance(store, await RoutingView.load(store), name)
    instance.shell.start()
    await instance.member.start(epoch)
    return instance


async def test_an_unconfirmed_lease_holds_messages_undecided_in_arrival_order(postgres_url: str) -> None:
    async with PostgresStore(postgres_url) as store:
        await store.upsert_devices(premise())
        await store.upsert_users(USERS)
        instance = await _instance(store, "gw-1")
        assert instance.member.confirmed
        instance.seconds[0] = 100.0  # the lease went unconfirmed
        assert not instance.member.confirmed
        reads = [request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, counter) for counter in (1, 2, 3)]
        handlers = [
            asyncio.create_task(instance.shell.handle(Message(f"dsp/in/{IMPORT_SUPPLIER}", payload)))
            for payload in reads
        ]
        # Meanwhile another instance set the flag: nothing was decided with the old view.
        await store.commit(CommitBatch(flag_events=[event()]))
        for _ in range(20):
            await asyncio.sleep(0)
        assert instance.published == []
        await asyncio.wait_for(asyncio.gather(*handlers), 10)  # the heartbeat rejoins, caught up
        assert instance.member.confirmed
        assert instance.member.epoch == 1
        assert instance.answered() == [
            (f"{IMPORT_SUPPLIER}:{METER}:{counter}", ResponseCode.CONSUMER_CHOICE) for counter in (1, 2, 3)
        ]
        await instance.shell.stop()
        await instance.member.stop()
        assert await store.unapplied(1) == []


async def test_a_lease_lost_in_the_store_is_taken_again_after_catching_up(postgres_url: str) -> None:
    async with PostgresStore(postgres_url) as store:
        await store.upsert_devices(premise())
        instance = await _instance(store, "gw-1")
        await store.leave("gw-1")  # the database let the lease lapse
        await store.commit(CommitBatch(flag_events=[event()]))  # and a flag changed meanwhile
        async with asyncio.timeout(10):  # woken by the flag's NOTIFY: renewing fails, it rejoins
            while await store.unapplied(2) != ["gw-1"]:  # noqa: ASYNC110 - the lease row is polled
                await asyncio.sleep(0.05)
        assert await store.unapplied(1) == []  # it joined with the flag's epoch applied
        assert instance.member.view.is_flagged(METER)
        await instance.shell.stop()
        await instance.member.stop()
