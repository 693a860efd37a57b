"""What several instances share in PostgreSQL: flag epochs and their NOTIFY, leases (the claims on
pending forwards are store semantics, tested on both stores in test_store.py).

Each test has a new database on the session's private server; two `PostgresStore`s on one database
stand for two gateway instances. Lease and deadline lengths of zero make "lapsed" and "expired"
immediate, so nothing here waits on a clock.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from gateway.postgres import FLAGS_CHANNEL, FlagChanges, PostgresStore
from gateway.store import CommitBatch
from tests.gateway.test_inventory import GAS_METER, IMPORT_SUPPLIER, METER, USERS, premise
from tests.gateway.test_store import event

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from simulator.postgres import Postgres

LEASE = 30.0


@pytest.fixture
async def stores(postgres_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    async with PostgresStore(postgres_url) as first, PostgresStore(postgres_url) as second:
        await first.upsert_devices(premise())
        await first.upsert_users(USERS)
        yield first, second


# -- flag epochs ---------------------------------------------------------------------------------


async def test_a_flag_change_takes_the_next_epoch_and_notifies_it(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = stores
    heard: asyncio.Queue[str] = asyncio.Queue()
    await second.listen(FLAGS_CHANNEL, heard.put_nowait)
    assert await first.flag_epoch() == 0
    # Refused and unchanged requests change no flag: no epoch, no notification.
    refused = await first.commit(
        CommitBatch(flag_events=[event(outcome="E081509"), event(outcome="unchanged")])
    )
    assert refused.flag_epoch is None
    result = await first.commit(CommitBatch(flag_events=[event(n=2)], counters={IMPORT_SUPPLIER: 2}))
    assert result.flag_epoch == 1
    assert await asyncio.wait_for(heard.get(), 10) == "1"
    assert await second.flag_epoch() == 1
    assert heard.empty()


async def test_flag_changes_since_give_each_devices_latest_state(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = stores
    await first.commit(CommitBatch(flag_events=[event(n=1)]))
    await first.commit(CommitBatch(flag_events=[event(GAS_METER, n=2), event(set_flag=False, n=3)]))
    assert await second.flag_changes_since(0) == FlagChanges(epoch=2, flagged={METER: False, GAS_METER: True})
    assert await second.flag_changes_since(1) == FlagChanges(epoch=2, flagged={METER: False, GAS_METER: True})
    assert await second.flag_changes_since(2) == FlagChanges(epoch=2, flagged={})


async def test_concurrent_flag_commits_take_distinct_epochs_in_commit_order(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = stores
    results = await asyncio.gather(
        *(
            store.commit(CommitBatch(flag_events=[event(device, set_flag=n % 2 == 0, n=n)]))
            for n in range(10)
            for store, device in ((first, METER), (second, GAS_METER))
        )
    )
    assert sorted(result.flag_epoch for result in results) == list(range(1, 21))
    # The last epoch holds each device's last change, as the flags table does.
    history = await first.flag_history()
    last = {e.device_id: e.set for e in history}
    assert (await second.flag_changes_since(0)).flagged == last
    assert set(await second.load_flags()) == {device for device, flagged in last.items() if flagged}


# -- leases ----------------------------------------------------------------------------------------


async def test_an_epoch_is_applied_once_every_live_instance_acknowledged_it(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = stores
    assert await first.join("a", 0, LEASE)
    assert await second.join("b", 0, LEASE)
    epoch = (await first.commit(CommitBatch(flag_events=[event()]))).flag_epoch
    assert epoch == 1
    assert await first.unapplied(epoch) == ["a", "b"]
    assert await first.renew("a", epoch, LEASE)
    waiting = asyncio.create_task(first.wait_applied(epoch, poll_seconds=60))
    await asyncio.sleep(0)
    assert not waiting.done()
    assert await first.unapplied(epoch) == ["b"]
    assert await second.renew("b", epoch, LEASE)  # its NOTIFY wakes the wait, long before the poll
    await asyncio.wait_for(waiting, 10)
    assert await first.unapplied(epoch) == []
    # An acknowledgement never goes back.
    assert await second.renew("b", 0, LEASE)
    assert await first.unapplied(epoch) == []


async def test_a_lapsed_lease_is_not_waited_for_and_cannot_be_renewed(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = stores
    assert await first.join("a", 0, LEASE)
    assert await second.join("b", 0, 0)  # lapses at once: a partitioned instance
    epoch = (await first.commit(CommitBatch(flag_events=[event()]))).flag_epoch
    assert epoch is not None
    assert await first.renew("a", epoch, LEASE)
    assert await first.unapplied(epoch) == []
    await asyncio.wait_for(first.wait_applied(epoch), 10)
    # The lapsed instance must catch up and join again: renewing is refused.
    assert not await second.renew("b", epoch, LEASE)


async def test_joining_needs_the_current_epoch_applied(stores: tuple[PostgresStore, PostgresStore]) -> None:
    first, second = stores
    await first.commit(CommitBatch(flag_events=[event()]))
    assert not await second.join("b", 0, LEASE)
    changes = await second.flag_changes_since(0)
    assert await second.join("b", changes.epoch, LEASE)
    assert await first.unapplied(changes.epoch) == []
    assert await first.unapplied(changes.epoch + 1) == ["b"]


async def test_leaving_gives_the_lease_up(stores: tuple[PostgresStore, PostgresStore]) -> None:
    first, second = stores
    assert await second.join("b", 0, LEASE)
    await second.leave("b")
    assert await first.unapplied(1) == []
    assert not await second.renew("b", 0, LEASE)


async def test_the_listener_comes_back_after_a_restart_of_the_database(
    stores: tuple[PostgresStore, PostgresStore], postgres_server: Postgres, postgres_url: str
) -> None:
    first, _ = stores
    heard: asyncio.Queue[str] = asyncio.Queue()
    await first.listen(FLAGS_CHANNEL, heard.put_nowait)
    postgres_server.restart()
    await first.keep_listening()
    async with PostgresStore(postgres_url) as other:  # a connection made after the restart
        result = await other.commit(CommitBatch(flag_events=[event()]))
    assert await asyncio.wait_for(heard.get(), 10) == str(result.flag_epoch)
    await first.keep_listening()  # an open listener is left as it is
    assert heard.empty()
