"""The FlagStore implementations and their migrations: every store test runs against SQLite (a file in
tmp_path) and PostgreSQL (a new database on the session's private server, simulator/postgres.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import aiosqlite
import asyncpg
import pytest

from gateway import postgres
from gateway.config import StoreSettings
from gateway.storage import open_store
from gateway.store import (
    CORE,
    MIGRATIONS,
    NO_COUNTER,
    CommitBatch,
    CommitResult,
    FlagEvent,
    FlagState,
    FlagStore,
    SqliteStore,
    StoreCorruptError,
    UpsertCounts,
    connect,
    migrate,
    retryable,
)
from rules.domain import (
    ANSWER_RESPONSE,
    ANSWER_TIMEOUT,
    MAX_COUNTER,
    Claim,
    DeviceStatus,
    Eui,
    ForwardedRequest,
    RequestId,
    Role,
    Tariff,
    UserRecord,
)
from tests.gateway.test_inventory import (
    GAS_METER,
    HUB,
    IMPORT_SUPPLIER,
    METER,
    NEW_SUPPLIER,
    USERS,
    comms_hub,
    esme,
    gsme,
    premise,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

AT = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
INTEGRITY = (sqlite3.IntegrityError, asyncpg.IntegrityConstraintViolationError)


def event(device: Eui = METER, *, set_flag: bool = True, outcome: str = "accepted", n: int = 1) -> FlagEvent:
    return FlagEvent(
        device_id=device,
        set=set_flag,
        requester=IMPORT_SUPPLIER,
        request_id=f"{IMPORT_SUPPLIER}:90-B3-D5-1F-30-00-00-02:{n}",
        declaration=True if set_flag else None,
        consumer_reference="CR-7" if set_flag else None,
        outcome=outcome,
        at=AT + timedelta(minutes=n),
    )


@pytest.fixture
async def store(store_settings: StoreSettings) -> AsyncIterator[FlagStore]:
    async with open_store(store_settings) as opened:
        await opened.upsert_devices(premise())
        await opened.upsert_users(USERS)
        yield opened


async def _query(settings: StoreSettings, sql: str) -> list[tuple[object, ...]]:
    """Run one statement on the store's database behind its back; its rows."""
    if settings.postgres:
        db = await asyncpg.connect(settings.url)
        try:
            return [tuple(row) for row in await db.fetch(sql)]
        finally:
            await db.close()
    async with aiosqlite.connect(settings.path) as db, db.execute(sql) as cursor:
        rows = [tuple(row) for row in await cursor.fetchall()]
        await db.commit()
        return rows


def _core_versions(settings: StoreSettings) -> list[tuple[str, int]]:
    """What a fully migrated store of this kind has in schema_migrations."""
    versions = [(CORE, version) for version in range(1, len(MIGRATIONS) + 1)]
    if settings.postgres:
        cluster = postgres.CLUSTER_MIGRATIONS
        versions += [(postgres.CLUSTER, version) for version in range(1, len(cluster) + 1)]
    return sorted(versions)


# -- migrations -------------------------------------------------------------------------------------


async def _versions(path: Path) -> list[tuple[str, int]]:
    return [
        (str(row[0]), int(str(row[1])))
        for row in await _query(
            StoreSettings(path=str(path)), "SELECT * FROM schema_migrations ORDER BY 1, 2"
        )
    ]


async def test_open_creates_the_store_and_migrates_once(store_settings: StoreSettings) -> None:
    for _ in range(2):
        async with open_store(store_settings):
            pass
    rows = await _query(store_settings, "SELECT component, version FROM schema_migrations ORDER BY 1, 2")
    assert rows == _core_versions(store_settings)


def test_both_stores_have_the_same_core_schema_versions() -> None:
    assert len(postgres.MIGRATIONS) == len(MIGRATIONS)


async def test_another_component_registers_its_own_migrations(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    first = ["CREATE TABLE a (x INTEGER); -- a comment; with a semicolon\nINSERT INTO a VALUES (1)"]
    db = await connect(path)
    try:
        assert await migrate(db, "outcomes", first) == 1
        assert await migrate(db, "outcomes", [*first, "ALTER TABLE a ADD COLUMN y TEXT DEFAULT 'x;y'"]) == 2
        async with db.execute("SELECT x, y FROM a") as cursor:
            assert list(await cursor.fetchall()) == [(1, "x;y")]
    finally:
        await db.close()
    async with SqliteStore(path):
        pass
    assert await _versions(path) == [*_core_versions(StoreSettings()), ("outcomes", 1), ("outcomes", 2)]


async def test_a_failing_migration_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    db = await connect(path)
    try:
        with pytest.raises(sqlite3.OperationalError):
            await migrate(
                db, "outcomes", ["CREATE TABLE b (x INTEGER)", "CREATE TABLE c (x INTEGER); NOT SQL"]
            )
        assert not db.in_transaction
        async with db.execute("SELECT name FROM sqlite_master WHERE name IN ('b', 'c')") as cursor:
            assert list(await cursor.fetchall()) == []
    finally:
        await db.close()
    assert await _versions(path) == []


async def test_a_database_from_a_newer_gateway_is_refused(store_settings: StoreSettings) -> None:
    async with open_store(store_settings):
        pass
    await _query(store_settings, f"INSERT INTO schema_migrations VALUES ('{CORE}', {len(MIGRATIONS) + 1})")
    store = open_store(store_settings)
    with pytest.raises(RuntimeError, match="newer than this gateway"):
        await store.open()
    await store.close()


async def test_counters_of_a_version_1_database_are_migrated_to_compare_as_numbers(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    db = await connect(path)
    try:
        await migrate(db, CORE, MIGRATIONS[:1])
        await db.execute("INSERT INTO request_counters VALUES (?, '9')", (IMPORT_SUPPLIER,))
    finally:
        await db.close()
    async with SqliteStore(path) as store:
        assert await store.load_request_counters() == {IMPORT_SUPPLIER: 9}
        # As text, "10" < "9": the padded counter compares as a number.
        assert (await store.commit(CommitBatch(counters={IMPORT_SUPPLIER: 10}))).advanced == {
            IMPORT_SUPPLIER: 9
        }
        assert (await store.commit(CommitBatch(counters={IMPORT_SUPPLIER: 9}))).advanced == {}


async def test_the_sqlite_database_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    async with (
        SqliteStore(path),
        aiosqlite.connect(path) as db,
        db.execute("PRAGMA journal_mode") as cursor,
    ):
        assert await cursor.fetchone() == ("wal",)


async def test_flags_need_the_device_in_the_inventory(store: FlagStore) -> None:
    # A flag for a device not in the inventory breaks the foreign key: the whole batch is refused.
    with pytest.raises(INTEGRITY):
        await store.commit(CommitBatch(flag_events=[event(), event(Eui("00-DB-12-00-00-00-00-01"), n=2)]))
    assert await store.load_flags() == {}
    assert await store.flag_history() == []


# -- inventory and users ------------------------------------------------------------------------------


async def test_upsert_inserts_updates_and_counts(store: FlagStore) -> None:
    moved = esme(import_supplier=NEW_SUPPLIER, tariff=Tariff.ECONOMY7)
    counts = await store.upsert_devices([comms_hub(), moved, gsme(device_id=Eui("00-DB-12-34-56-78-90-B1"))])
    assert counts == UpsertCounts(received=3, inserted=1, updated=1)
    assert counts.unchanged == 1
    assert await store.get_device(METER) == moved
    assert await store.get_device(HUB) == comms_hub()
    assert await store.get_device(Eui("00-DB-12-99-99-99-99-99")) is None


async def test_every_device_loads_in_batches(store: FlagStore) -> None:
    extra = [esme(device_id=Eui(f"00-DB-12-00-00-00-00-{n:02X}"), mpxn=None) for n in range(1, 26)]
    await store.upsert_devices(extra)
    batches = [batch async for batch in store.load_devices(batch_size=7)]
    assert [len(batch) for batch in batches] == [7, 7, 7, 7]
    loaded = [record for batch in batches for record in batch]
    assert sorted(loaded, key=lambda r: r.device_id) == sorted(
        [*premise(), *extra], key=lambda r: r.device_id
    )


async def test_users_upsert_replaces_roles(store: FlagStore) -> None:
    changed = UserRecord(NEW_SUPPLIER, frozenset({Role.IMPORT_SUPPLIER, Role.GAS_SUPPLIER}))
    counts = await store.upsert_users([changed, USERS[0]])
    assert counts == UpsertCounts(received=2, inserted=0, updated=1)
    users = {user.user_id: user.roles for user in await store.load_users()}
    assert users[NEW_SUPPLIER] == changed.roles
    assert len(users) == len(USERS)


async def test_changes_since_returns_only_what_changed(store: FlagStore) -> None:
    seq = await store.change_seq()
    assert seq == 2  # the devices, then the users
    assert [batch async for batch in store.devices_changed_since(seq)] == []
    assert await store.users_changed_since(seq) == []
    await store.upsert_devices(premise())  # the same rows: no change, no new sequence number
    assert await store.change_seq() == seq
    moved = esme(import_supplier=NEW_SUPPLIER)
    added = [esme(device_id=Eui(f"00-DB-12-00-00-00-00-{n:02X}")) for n in range(1, 6)]
    await store.upsert_devices([moved, gsme(), *added[:3]])
    user = UserRecord(Eui("90-B3-D5-1F-30-05-00-09"), frozenset({Role.OTHER_USER}))
    await store.upsert_users([user])
    await store.upsert_devices(added[2:])
    batches = [batch async for batch in store.devices_changed_since(seq, batch_size=2)]
    # In the order of the upserts, then of Device ID; added[2] only once, with its latest upsert.
    assert batches == [added[:2], [added[2], moved], added[3:]]
    assert await store.users_changed_since(seq) == [user]
    assert await store.users_changed_since(seq + 2) == []
    assert await store.change_seq() == seq + 3


async def test_an_upsert_is_all_or_nothing(store: FlagStore) -> None:
    broken = esme(device_id=Eui("00-DB-12-00-00-00-00-01"))
    object.__setattr__(broken, "smets", None)  # NOT NULL in the table: fails after the first row
    with pytest.raises(INTEGRITY):
        await store.upsert_devices([esme(import_supplier=NEW_SUPPLIER), broken])
    assert await store.get_device(METER) == esme()
    assert await store.change_seq() == 2
    with pytest.raises(ValueError, match="not a Device ID"):
        await store.upsert_devices([esme(device_id=Eui("00-00-00-00-00-00-00-00"))])


# -- flags, history and counters -----------------------------------------------------------------------


async def test_commit_records_history_for_every_event_and_flags_only_for_accepted_changes(
    store: FlagStore,
) -> None:
    events = [
        event(outcome="E081509", n=1),
        event(outcome="accepted", n=2),
        event(outcome="unchanged", n=3),
        event(GAS_METER, outcome="E081505", n=4),
    ]
    await store.commit(CommitBatch(flag_events=events))
    assert await store.load_flags() == {
        METER: FlagState(METER, IMPORT_SUPPLIER, AT + timedelta(minutes=2), events[1].request_id, "CR-7")
    }
    assert await store.flag_history() == events
    assert await store.flag_history(GAS_METER) == [events[3]]
    assert await store.flag_history(limit=2) == events[2:]


async def test_a_batch_may_set_and_clear_the_same_device_in_order(store: FlagStore) -> None:
    batch = [event(n=1), event(set_flag=False, n=2), event(n=3)]
    await store.commit(CommitBatch(flag_events=batch))
    assert list(await store.load_flags()) == [METER]
    await store.commit(CommitBatch(flag_events=[event(set_flag=False, n=4)]))
    assert await store.load_flags() == {}
    assert [e.set for e in await store.flag_history(METER)] == [True, False, True, False]


async def test_counters_only_rise_and_keep_u64_precision(store: FlagStore) -> None:
    big = 2**63 + 5
    await store.commit(CommitBatch(counters={IMPORT_SUPPLIER: big, NEW_SUPPLIER: 7}))
    await store.commit(CommitBatch(counters={IMPORT_SUPPLIER: 2**63 - 1, NEW_SUPPLIER: 9}))
    assert await store.load_request_counters() == {IMPORT_SUPPLIER: big, NEW_SUPPLIER: 9}
    await store.commit(CommitBatch(counters={IMPORT_SUPPLIER: MAX_COUNTER}))
    assert (await store.load_request_counters())[IMPORT_SUPPLIER] == MAX_COUNTER
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        await store.commit(CommitBatch(counters={NEW_SUPPLIER: MAX_COUNTER + 1}))
    assert (await store.load_request_counters())[NEW_SUPPLIER] == 9


async def test_flags_history_and_counters_survive_a_restart(store_settings: StoreSettings) -> None:
    async with open_store(store_settings) as store:
        await store.upsert_devices(premise())
        await store.commit(CommitBatch(flag_events=[event()], counters={IMPORT_SUPPLIER: 41}))
    async with open_store(store_settings) as store:
        assert list(await store.load_flags()) == [METER]
        assert await store.flag_history() == [event()]
        assert await store.load_request_counters() == {IMPORT_SUPPLIER: 41}
        assert await store.get_device(METER) == esme()


async def test_concurrent_operations_on_one_store_do_not_interleave_transactions(store: FlagStore) -> None:
    commits = [store.commit(CommitBatch(flag_events=[event(outcome="unchanged", n=n)])) for n in range(20)]
    reads = [store.users_changed_since(0) for _ in range(5)]
    upserts = [store.upsert_devices([esme(status=DeviceStatus.SUSPENDED)]) for _ in range(3)]
    await asyncio.gather(*commits, *reads, *upserts)
    assert len(await store.flag_history()) == 20


def test_flag_events_are_checked() -> None:
    with pytest.raises(ValueError, match="not accepted, unchanged or a refusal code"):
        event(outcome="maybe")
    with pytest.raises(ValueError, match="timezone-aware"):
        FlagEvent(METER, True, IMPORT_SUPPLIER, "r", True, None, "accepted", datetime(2025, 1, 1))  # noqa: DTZ001


async def test_a_closed_store_says_so(store_settings: StoreSettings) -> None:
    store = open_store(store_settings)
    with pytest.raises(RuntimeError, match="is not open"):
        await store.get_device(METER)


async def test_commit_says_which_counters_it_advanced(store: FlagStore) -> None:
    first = await store.commit(CommitBatch(counters={IMPORT_SUPPLIER: 5, NEW_SUPPLIER: 7}))
    assert first == CommitResult({IMPORT_SUPPLIER: NO_COUNTER, NEW_SUPPLIER: NO_COUNTER})
    again = await store.commit(CommitBatch(counters={IMPORT_SUPPLIER: 9, NEW_SUPPLIER: 7}))
    assert again.advanced == {IMPORT_SUPPLIER: 5}
    assert again.fresh(IMPORT_SUPPLIER, 6)
    assert again.fresh(IMPORT_SUPPLIER, 9)
    assert not again.fresh(IMPORT_SUPPLIER, 5)
    assert not again.fresh(NEW_SUPPLIER, 7)
    assert await store.load_request_counters() == {IMPORT_SUPPLIER: 9, NEW_SUPPLIER: 7}


async def test_two_stores_on_one_database_never_both_take_a_counter(store_settings: StoreSettings) -> None:
    # Two gateway instances, each handed every request once (a redelivery to the other): a counter
    # is fresh for at most one of them, and the highest is stored.
    counters = range(1, 41)
    async with open_store(store_settings) as first, open_store(store_settings) as second:

        async def instance(store: FlagStore, order: list[int]) -> list[int]:
            fresh = []
            for counter in order:
                result = await store.commit(CommitBatch(counters={IMPORT_SUPPLIER: counter}))
                if result.fresh(IMPORT_SUPPLIER, counter):
                    fresh.append(counter)
            return fresh

        taken = await asyncio.gather(
            instance(first, list(counters)), instance(second, list(reversed(counters)))
        )
        assert await first.load_request_counters() == {IMPORT_SUPPLIER: 40}
    assert not set(taken[0]) & set(taken[1])
    assert 40 in taken[0] + taken[1]
    for fresh in taken:  # each instance's fresh counters rise
        assert fresh == sorted(fresh)


async def test_a_request_id_is_recorded_once_whatever_the_order(store_settings: StoreSettings) -> None:
    # Two instances over one store, each handed half the counters, out of order between them, and a
    # repeat of each: every RequestID is first for exactly one commit.
    async with open_store(store_settings) as first, open_store(store_settings) as second:

        async def instance(store: FlagStore, counters: list[int]) -> list[int]:
            taken = []
            for counter in counters:
                result = await store.commit(
                    CommitBatch(counters={IMPORT_SUPPLIER: counter}, request_ids=[(IMPORT_SUPPLIER, counter)])
                )
                if result.first(IMPORT_SUPPLIER, counter):
                    taken.append(counter)
            return taken

        odd, even = list(range(1, 41, 2)), list(range(2, 41, 2))
        taken = await asyncio.gather(instance(first, odd + even), instance(second, even + odd))
        assert sorted(taken[0] + taken[1]) == list(range(1, 41))
        assert await first.purge_request_ids(datetime.now(UTC) - timedelta(hours=1)) == 0
        assert await first.purge_request_ids(datetime.now(UTC) + timedelta(seconds=1)) == 40
        # Forgotten: a RequestID older than any redelivery is recorded afresh.
        again = await first.commit(CommitBatch(request_ids=[(IMPORT_SUPPLIER, 7), (IMPORT_SUPPLIER, 7)]))
        assert again.recorded == {(IMPORT_SUPPLIER, 7)}
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        async with open_store(store_settings) as store:
            await store.commit(CommitBatch(request_ids=[(IMPORT_SUPPLIER, MAX_COUNTER + 1)]))


async def test_pending_forwards_are_stored_with_their_commit_and_leave_when_claimed(
    store: FlagStore,
) -> None:
    deadline = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
    first = ForwardedRequest(RequestId(IMPORT_SUPPLIER, METER, MAX_COUNTER), "4.8.1", "4.8", deadline)
    second = ForwardedRequest(
        RequestId(IMPORT_SUPPLIER, GAS_METER, 7), "4.8.1", "4.8", deadline - timedelta(1)
    )
    await store.commit(CommitBatch(forwarded=(first, second)))
    unknown = RequestId(NEW_SUPPLIER, METER, 1)
    nothing = await store.commit(CommitBatch(answered=(unknown,)))  # nobody forwarded it
    assert (nothing.claimed, nothing.answers) == ({}, {})
    assert await store.load_pending() == [second, first]  # earliest deadline first
    result = await store.commit(CommitBatch(answered=(second.request_id,)))
    assert result.claimed == {second.request_id: Claim(ANSWER_RESPONSE, second)}
    assert await store.load_pending() == [first]


async def test_a_restarted_instance_takes_back_only_its_own_forwards(store: FlagStore) -> None:
    at = datetime.now(UTC)
    mine, theirs = (
        ForwardedRequest(RequestId(IMPORT_SUPPLIER, METER, n), "4.8.1", "4.8", at + timedelta(seconds=n))
        for n in (1, 2)
    )
    first = await store.commit(CommitBatch(forwarded=(mine,), owner="gw-1"))
    await store.commit(CommitBatch(forwarded=(theirs,), owner="gw-2"))
    assert first.stored_forwards == frozenset()
    # A repeat forward leaves the forward with its first owner, and is known stored (not sent again).
    repeat = await store.commit(CommitBatch(forwarded=(mine,), owner="gw-2"))
    assert repeat.stored_forwards == {mine.request_id}
    assert await store.load_pending("gw-1") == [mine]
    assert await store.load_pending("gw-2") == [theirs]
    assert await store.load_pending() == []
    # The others' are the sweep's, once overdue: whoever forwarded them.
    assert await store.overdue_pending(-3.0, 10) == [mine, theirs]


async def test_a_withdrawn_forward_leaves_with_its_request_id_if_its_owner_stored_it(
    store: FlagStore,
) -> None:
    at = datetime.now(UTC)
    kept, withdrawn, answered = (
        ForwardedRequest(RequestId(IMPORT_SUPPLIER, METER, n), "4.8.1", "4.8", at + timedelta(seconds=n))
        for n in (1, 2, 3)
    )
    ids = [(IMPORT_SUPPLIER, n) for n in (1, 2, 3)]
    await store.commit(CommitBatch(request_ids=ids, forwarded=(kept, withdrawn, answered), owner="gw-1"))
    await store.commit(CommitBatch(answered=(answered.request_id,)))
    # Another instance cannot withdraw gw-1's forward; gw-1 withdraws only an unanswered one.
    everything = tuple(f.request_id for f in (kept, withdrawn, answered))
    await store.commit(CommitBatch(withdrawn=everything[:2], owner="gw-2"))
    await store.commit(CommitBatch(withdrawn=everything[1:], owner="gw-1"))
    assert await store.load_pending("gw-1") == [kept]
    again = await store.commit(CommitBatch(request_ids=ids, forwarded=(withdrawn,), owner="gw-1"))
    assert again.recorded == {(IMPORT_SUPPLIER, 2)}  # the retry is new
    assert again.stored_forwards == frozenset()


async def test_a_forward_is_claimed_once_for_its_final_answer(store: FlagStore) -> None:
    forward = ForwardedRequest(RequestId(IMPORT_SUPPLIER, METER, 3), "4.8.1", "4.8", datetime.now(UTC))
    await store.commit(CommitBatch(forwarded=(forward,)))
    # A response and a timeout in one transaction: the response is claimed first, the timeout loses.
    both = await store.commit(CommitBatch(answered=(forward.request_id,), timed_out=(forward.request_id,)))
    assert both.claimed == {forward.request_id: Claim(ANSWER_RESPONSE, forward)}
    again = await store.commit(CommitBatch(answered=(forward.request_id,), timed_out=(forward.request_id,)))
    assert (again.claimed, again.answers) == ({}, {forward.request_id: ANSWER_RESPONSE})
    # A repeat forward of an answered request leaves its answer alone.
    await store.commit(CommitBatch(forwarded=(forward,)))
    assert await store.load_pending() == []
    assert await store.overdue_pending(0.0, 10) == []


async def test_an_unsettled_e21_is_overdue_until_settled(store: FlagStore) -> None:
    past = datetime.now(UTC) - timedelta(seconds=60)
    late, due = (
        ForwardedRequest(RequestId(IMPORT_SUPPLIER, METER, n), "4.8.1", "4.8", past + timedelta(seconds=n))
        for n in (1, 2)
    )
    waiting = ForwardedRequest(
        RequestId(IMPORT_SUPPLIER, METER, 3), "4.8.1", "4.8", past + timedelta(hours=1)
    )
    await store.commit(CommitBatch(forwarded=(late, due, waiting)))
    assert await store.overdue_pending(0.0, 10) == [late, due]
    assert await store.overdue_pending(0.0, 1) == [late]
    assert await store.overdue_pending(3600.0, 10) == []  # within the grace: its holder may answer it
    claimed = await store.commit(CommitBatch(timed_out=(late.request_id,)))
    assert claimed.claimed == {late.request_id: Claim(ANSWER_TIMEOUT, late)}
    # Claimed, not settled: within the grace nobody may claim it again, after it anybody may.
    assert await store.overdue_pending(3600.0, 10) == []
    held = await store.commit(CommitBatch(timed_out=(late.request_id,), timeout_grace_seconds=3600.0))
    assert held.answers == {late.request_id: ANSWER_TIMEOUT}
    assert await store.overdue_pending(0.0, 10) == [late, due]
    again = await store.commit(CommitBatch(timed_out=(late.request_id,)))
    assert again.claimed == {late.request_id: Claim(ANSWER_TIMEOUT, late)}
    await store.commit(CommitBatch(settled=(late.request_id,)))
    assert await store.overdue_pending(0.0, 10) == [due]
    settled = await store.commit(CommitBatch(timed_out=(late.request_id,)))
    assert settled.answers == {late.request_id: ANSWER_TIMEOUT}
    # Answered forwards are forgotten with the RequestIDs; a waiting one never is.
    await store.purge_request_ids(datetime.now(UTC) + timedelta(seconds=1))
    gone = await store.commit(CommitBatch(answered=(late.request_id,)))
    assert (gone.claimed, gone.answers) == ({}, {})
    assert await store.load_pending() == [due, waiting]


async def test_instances_racing_for_a_forward_claim_it_once(store_settings: StoreSettings) -> None:
    forwards = [
        ForwardedRequest(RequestId(IMPORT_SUPPLIER, METER, n), "4.8.1", "4.8", datetime.now(UTC))
        for n in range(1, 31)
    ]
    async with open_store(store_settings) as first, open_store(store_settings) as second:
        await first.commit(CommitBatch(forwarded=forwards))

        async def claims(store: FlagStore, answered: bool) -> list[RequestId]:
            taken: list[RequestId] = []
            for forward in forwards:
                rid = (forward.request_id,)
                batch = CommitBatch(answered=rid) if answered else CommitBatch(timed_out=rid)
                taken.extend((await store.commit(batch)).claimed)
            return taken

        results = await asyncio.gather(
            claims(first, answered=True), claims(second, answered=False), claims(second, answered=True)
        )
    taken = [rid for result in results for rid in result]
    assert sorted(taken, key=str) == sorted((forward.request_id for forward in forwards), key=str)


async def test_a_failed_commit_leaves_nothing_of_its_batch(store: FlagStore) -> None:
    # The flag of a device the inventory does not hold breaks its foreign key, after the history row
    # and before the counters, RequestIDs and pending forwards: the whole transaction is rolled back.
    deadline = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
    forward = ForwardedRequest(RequestId(IMPORT_SUPPLIER, METER, 9), "4.8.1", "4.8", deadline)
    await store.commit(CommitBatch(counters={IMPORT_SUPPLIER: 5}))
    unknown = Eui("00-DB-12-34-56-78-90-FF")
    failing = CommitBatch(
        flag_events=[event(unknown)],
        counters={IMPORT_SUPPLIER: 9, NEW_SUPPLIER: 3},
        request_ids=[(IMPORT_SUPPLIER, 9)],
        forwarded=(forward,),
    )
    with pytest.raises(INTEGRITY):
        await store.commit(failing)
    assert await store.load_request_counters() == {IMPORT_SUPPLIER: 5}
    assert await store.flag_history() == []
    assert await store.load_pending() == []
    # The store goes on: the same batch without the bad event commits, its RequestID recorded afresh.
    result = await store.commit(replace(failing, flag_events=()))
    assert result.advanced == {IMPORT_SUPPLIER: 5, NEW_SUPPLIER: NO_COUNTER}
    assert result.first(IMPORT_SUPPLIER, 9)
    assert await store.load_pending() == [forward]


async def test_a_store_that_fails_its_integrity_check_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    path.write_bytes(b"SQLite format 3\x00" + b"\xa5" * 8192)
    with pytest.raises(StoreCorruptError, match=str(path)):
        await SqliteStore(path).open(check=True)


def test_only_a_busy_or_locked_store_is_worth_retrying() -> None:
    busy = sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode = sqlite3.SQLITE_BUSY  # type: ignore[attr-defined]
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    assert retryable(busy)
    assert not retryable(full)
    assert not retryable(RuntimeError("database is locked"))
