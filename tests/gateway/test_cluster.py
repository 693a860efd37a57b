"""ClusterMember with the shell, on the session's private PostgreSQL: fencing and catching up.

The member's monotonic clock is the test's: moving it past the lease is a lease that could not be
confirmed (a partition from the store), without waiting for one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING, Any

from gateway.cluster import ClusterMember
from gateway.postgres import PostgresStore
from gateway.router import Router, RouterSettings
from gateway.shell import Shell
from gateway.signing import VERIFIED, Verification
from gateway.store import CommitBatch
from gateway.transport import Message
from gateway.view import RoutingView
from rules.codes import ResponseCode
from rules.table import default_table
from tests.gateway.messages import CONSUMPTION_SRV, DCC, flag_request, header, request
from tests.gateway.test_inventory import IMPORT_SUPPLIER, METER, USERS, premise
from tests.gateway.test_store import event

if TYPE_CHECKING:
    from collections.abc import Callable

LEASE = 3.0


class Instance:
    def __init__(
        self,
        store: PostgresStore,
        view: RoutingView,
        name: str,
        *,
        monotonic: Callable[[], float] | None = None,
        verify: Callable[[bytes], Verification] | None = None,
    ) -> None:
        self.seconds = [0.0]
        self.published: list[tuple[str, bytes]] = []
        self.member = ClusterMember(
            store, view, name, lease_seconds=LEASE, monotonic=monotonic or (lambda: self.seconds[0])
        )
        router = Router(table=default_table(), view=view, settings=RouterSettings(dcc_eui=DCC))
        self.shell = Shell(router, store=store, publish=self.publish, member=self.member, verify=verify)

    async def publish(self, topic: str, payload: bytes) -> None:
        await asyncio.sleep(0)
        self.published.append((topic, payload))

    def answered(self) -> list[tuple[str | None, str | None]]:
        return [header(payload) for topic, payload in self.published if topic.startswith("dsp/out/")]


async def _instance(store: PostgresStore, name: str, **options: Any) -> Instance:
    epoch = await store.flag_epoch()
    instance = Instance(store, await RoutingView.load(store), name, **options)
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


class HeldVerification:
    """Signature checks that pass, each held in its executor thread until `release`: a message whose
    check runs is received and not yet decided."""

    def __init__(self) -> None:
        self._released = threading.Event()

    def __call__(self, payload: bytes) -> Verification:
        self._released.wait(30)
        return Verification(VERIFIED, "held by the test", IMPORT_SUPPLIER, 1)

    def release(self) -> None:
        self._released.set()


async def test_two_instances_answer_their_flag_requests_while_others_are_still_being_verified(
    postgres_url: str,
) -> None:
    # Each instance acknowledges a flag epoch once what it decided before applying it is out; a message
    # still in its signature check then is decided later, against the new view, and must not be waited
    # for: if it is a flag request, its answer waits for the other instance's acknowledgement, which
    # waits the same way for this one (both answered only when a lease lapsed, E16920).
    async with PostgresStore(postgres_url) as store:
        await store.upsert_devices(premise())
        await store.upsert_users(USERS)
        checks = HeldVerification()
        instances = [
            await _instance(store, name, monotonic=time.monotonic, verify=checks) for name in ("gw-1", "gw-2")
        ]
        flag_sets = [flag_request(IMPORT_SUPPLIER, counter, METER, set_flag=True) for counter in (5, 6)]
        handlers = [
            asyncio.create_task(instance.shell.handle(Message(f"dsp/in/{IMPORT_SUPPLIER}", payload)))
            for instance, payload in zip(instances, flag_sets, strict=True)
        ]
        await asyncio.sleep(0.1)  # both are in their signature check
        await store.commit(CommitBatch(flag_events=[event(n=1)]))  # another instance's flag change
        async with asyncio.timeout(10):  # both heartbeats caught up and acknowledged it
            while await store.unapplied(1):  # noqa: ASYNC110 - the lease rows are polled
                await asyncio.sleep(0.05)
        checks.release()
        await asyncio.wait_for(asyncio.gather(*handlers), 30)
        for instance, counter in zip(instances, (5, 6), strict=True):
            assert instance.answered() == [(f"{IMPORT_SUPPLIER}:{DCC}:{counter}", ResponseCode.SUCCESS)]
        for instance in instances:
            await instance.shell.stop()
            await instance.member.stop()
