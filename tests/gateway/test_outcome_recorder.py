"""The outcome recorder on a real database, SQLite and PostgreSQL (`outcome_location`): batching, late
device outcomes, expiry, purge, shutdown; and what several PostgreSQL writers add."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg
import pytest
from structlog.testing import capture_logs

from gateway.metrics import Metrics
from gateway.outcomes import recorder as recorder_module
from gateway.outcomes.database import SqliteOutcomes
from gateway.outcomes.queries import (
    is_postgres,
    open_reader,
    read_records,
    read_rollup_cells,
    read_rollup_totals,
)
from gateway.outcomes.recorder import OutcomeRecorder
from gateway.outcomes.schema import COMPONENT, MIGRATIONS, PG_MIGRATIONS, Rollup, to_ms
from gateway.outcomes.tally import Tally
from gateway.postgres import migrate_component
from gateway.report.compute import cells_from_records
from gateway.store import connect, migrate
from tests.outcomes import Faults, database, rows

if TYPE_CHECKING:
    from gateway.outcomes.queries import Location

T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
USER = "90-B3-D5-1F-30-01-00-00"
DEVICE = "00-DB-12-34-56-78-90-A0"
OTHER_DEVICE = "00-DB-12-34-56-78-90-A1"


def rid(counter: int, device: str = DEVICE) -> str:
    return f"{USER}:{device}:{counter}"


def decide(
    recorder: OutcomeRecorder,
    counter: int,
    at: datetime,
    *,
    decision: str = "forward",
    code: str = "I99",
    device: str = DEVICE,
    srv: str = "4.8.1",
) -> None:
    recorder.record_decision(
        request_id=rid(counter, device),
        originator=USER,
        role="IS",
        target=device,
        srv=srv,
        category="consumption",
        command_variant=1,
        received_at=at,
        decision=decision,
        response_code=code,
        reason="forwarded" if decision == "forward" else "consumer-choice",
        flagged=decision == "refuse",
    )


READ_ONLY_ERRORS = (sqlite3.OperationalError, asyncpg.ReadOnlySQLTransactionError)


def read_only_error(location: Location) -> tuple[str, str]:
    """The log field and value naming the engine's own read-only error."""
    return ("sqlstate", "25006") if is_postgres(location) else ("sqlite_error", "SQLITE_READONLY")


async def wait_until(predicate, seconds: float = 10.0) -> None:
    """Wait for the background task (generous bound: it is not a timing assertion)."""
    async with asyncio.timeout(seconds):
        while not predicate():  # noqa: ASYNC110 - polls counters the recorder exposes
            await asyncio.sleep(0.01)


async def test_background_task_writes_a_full_batch_and_close_writes_the_rest(outcome_location):
    path = outcome_location
    recorder = OutcomeRecorder(database(path), batch_size=3, flush_seconds=3600)
    await recorder.start()
    for counter in range(3):
        decide(recorder, counter, T0 + timedelta(seconds=counter))
    # Three make a batch: the background task writes them without waiting for the interval.
    await wait_until(lambda: recorder.flushed == 3)
    decide(recorder, 3, T0)
    await asyncio.sleep(0)  # let the background task run: one record is no batch, it stays buffered
    assert recorder.buffered == 1
    assert await rows(path, "SELECT count(*) FROM outcomes") == [(3,)]
    await recorder.close()
    assert await rows(path, "SELECT count(*) FROM outcomes") == [(4,)]
    with pytest.raises(RuntimeError, match="closed"):
        decide(recorder, 5, T0)


async def test_interval_flush_writes_a_partial_batch(outcome_location):
    path = outcome_location
    async with OutcomeRecorder(database(path), batch_size=1000, flush_seconds=0.05) as recorder:
        decide(recorder, 1, T0)
        await wait_until(lambda: recorder.flushed == 1)
        assert await rows(path, "SELECT count(*) FROM outcomes") == [(1,)]


async def test_device_outcome_in_a_later_batch_updates_its_request(outcome_location):
    path = outcome_location
    async with OutcomeRecorder(
        database(path), batch_size=100, flush_seconds=3600, target_response_seconds=30
    ) as recorder:
        decide(recorder, 1, T0)
        # Same counter, another target: another request.
        decide(recorder, 1, T0 + timedelta(seconds=10), device=OTHER_DEVICE)
        await recorder.flush()
        recorder.record_device_outcome(rid(1), "success", "I0", T0 + timedelta(seconds=4))
        # A second answer to the same request does not replace the first final outcome.
        recorder.record_device_outcome(rid(1), "failure", "E20", T0 + timedelta(seconds=5))
        recorder.record_device_outcome(rid(99), "success", "I0", T0)  # never forwarded
        await recorder.flush()
        # Unmatched by expiry at the latest (PostgreSQL keeps an answer without its request's row a
        # while: another instance may still write that request's decision).
        assert await recorder.expire_pending(T0 + timedelta(seconds=30), 30) == 0
        assert recorder.unmatched == 2
    records = {r.request_id: r for r in await read_records_from(path)}
    answered = records[rid(1)]
    assert (answered.device_outcome, answered.device_response_code) == ("success", "I0")
    assert answered.answered_at == T0 + timedelta(seconds=4)
    assert records[rid(1, OTHER_DEVICE)].device_outcome is None


async def test_a_later_answer_after_restart_finds_its_request(outcome_location):
    path = outcome_location
    async with OutcomeRecorder(database(path)) as first:
        decide(first, 7, T0)
    async with OutcomeRecorder(
        database(path)
    ) as second:  # migrations already applied; party ids from the file
        second.record_device_outcome(rid(7), "failure", "E20", T0 + timedelta(seconds=1))
    (record,) = await read_records_from(path)
    assert record.device_outcome == "failure"
    assert await rows(
        path, "SELECT component, version FROM schema_migrations WHERE component = 'outcomes'"
    ) == [("outcomes", version) for version in range(1, len(MIGRATIONS) + 1)]


async def test_expire_pending_times_out_only_old_unanswered_forwards(outcome_location):
    path = outcome_location
    async with OutcomeRecorder(database(path), flush_seconds=3600, target_response_seconds=30) as recorder:
        decide(recorder, 1, T0)  # old, unanswered: times out
        decide(recorder, 2, T0)  # old, answered
        decide(recorder, 3, T0, decision="refuse", code="E169")  # never forwarded
        decide(recorder, 4, T0 + timedelta(seconds=45))  # recent: still pending
        recorder.record_device_outcome(rid(2), "success", "I0", T0 + timedelta(seconds=2))
        now = T0 + timedelta(seconds=60)
        assert await recorder.expire_pending(now, 30) == 1  # flushes the buffer first
        assert await recorder.expire_pending(now, 30) == 0
    by_counter = {r.request_id: r for r in await read_records_from(path)}
    assert by_counter[rid(1)].device_outcome == "timeout"
    assert by_counter[rid(1)].device_response_code == "E21"
    assert by_counter[rid(1)].answered_at == now
    assert by_counter[rid(2)].device_outcome == "success"
    assert by_counter[rid(3)].device_outcome is None
    assert by_counter[rid(4)].device_outcome is None
    assert Tally.total((await daily_totals(path)).values()) == Tally(
        requests=4, forwarded=3, succeeded=1, timed_out=1, refused_consumer_choice=1, within_target=1
    )


async def test_daily_counts_equal_the_rows_they_summarise(outcome_location):
    """The rollup is maintained incrementally across batches; it must equal a recount of the rows."""
    path = outcome_location
    outcomes_cycle = ("success", "failure", "timeout", None)
    async with OutcomeRecorder(
        database(path), batch_size=7, flush_seconds=3600, target_response_seconds=30
    ) as recorder:
        for counter in range(60):
            at = T0 + timedelta(hours=counter)  # spans three days
            refused = counter % 5 == 0
            decide(
                recorder,
                counter,
                at,
                decision="refuse" if refused else "forward",
                code="E169" if refused else "I99",
                srv=("4.8.1", "11.2")[counter % 2],
            )
            outcome = outcomes_cycle[counter % 4]
            if not refused and outcome is not None:
                recorder.record_device_outcome(rid(counter), outcome, "I0", at + timedelta(seconds=counter))
    records = await read_records_from(path)
    days = [datetime(2024, 5, d, tzinfo=UTC) for d in (1, 2, 3)]
    assert sorted(await daily_totals(path)) == days
    async with open_reader(path) as db:
        for rollup, step, starts in (
            (Rollup.DAILY, timedelta(days=1), days),
            (Rollup.HOURLY, timedelta(hours=1), [T0 + timedelta(hours=h) for h in range(60)]),
        ):
            for start in starts:
                inside = [r for r in records if start <= r.received_at < start + step]
                expected = cells_from_records(inside, 30)
                assert await read_rollup_cells(db, rollup, start, start + step) == expected, (rollup, start)
    total = Tally.total((await daily_totals(path)).values())
    assert (total.requests, total.refused_consumer_choice, total.final) == (60, 12, 36)


async def test_a_failed_batch_stays_buffered_and_nothing_of_it_is_written(outcome_location):
    path = outcome_location
    disk = Faults("read-only")
    async with OutcomeRecorder(disk.database(path), flush_seconds=3600) as recorder:
        decide(recorder, 1, T0)
        decide(recorder, 2, T0)
        with pytest.raises(READ_ONLY_ERRORS, match=r"(?i)read-?only"):
            await recorder.flush()
        assert recorder.buffered == 2
        assert recorder.write_failures == 1
        assert await rows(path, "SELECT count(*) FROM outcomes") == [(0,)]
        disk.fault = None
        assert await recorder.flush() == 2
    assert await rows(path, "SELECT requests FROM outcome_daily") == [(2,)]
    assert disk.opened == 2  # a fresh connection after the failure
    assert len(disk.threads) == 1  # the worker's, not the event loop's
    assert threading.get_ident() not in disk.threads


@pytest.mark.parametrize(
    ("outcome_location", "fault", "field", "code"),
    [
        ("sqlite", "full", "sqlite_error", "SQLITE_FULL"),
        ("sqlite", "read-only", "sqlite_error", "SQLITE_READONLY"),
        ("postgresql", "read-only", "sqlstate", "25006"),
    ],
    indirect=["outcome_location"],
)
async def test_an_unwritable_database_bounds_the_buffer_drops_the_oldest_and_recovers(
    outcome_location, fault, field, code
):
    path = outcome_location
    disk = Faults(fault)
    metrics = Metrics()
    recorder = OutcomeRecorder(
        disk.database(path),
        batch_size=100,
        max_buffered=300,
        flush_seconds=0.01,
        retry_seconds=0.01,
        metrics=metrics,
    )
    with capture_logs() as logs:
        async with recorder:
            for counter in range(1000):
                decide(recorder, counter, T0 + timedelta(seconds=counter))
            assert (recorder.buffered, recorder.dropped) == (300, 700)
            await wait_until(lambda: recorder.write_failures >= 3)
            # Retried and still failing: the failed batches went back without passing the bound.
            assert recorder.failing
            assert (recorder.buffered, recorder.dropped, recorder.flushed) == (300, 700, 0)
            assert await rows(path, "SELECT count(*) FROM outcomes") == [(0,)]
            disk.fault = None
            await wait_until(lambda: recorder.buffered == 0 and not recorder.failing)
    assert [r.request_id for r in await read_records_from(path)] == [rid(c) for c in range(700, 1000)]
    sample = metrics.registry.get_sample_value
    assert sample("mp169_outcome_records_dropped_total") == 700
    assert sample("mp169_outcome_write_failures_total") == recorder.write_failures
    events = [e for e in logs if e["event"].startswith("outcome")]
    failures = [e for e in events if e["event"] == "outcome-write-failed"]
    assert len(failures) == 1  # once per fault, not once per retry
    assert failures[0][field] == code
    assert failures[0]["exc_info"] is not None
    assert [e["event"] for e in events if e["event"] != "outcome-write-failed"] == [
        "outcome-buffer-full-dropping-oldest",
        "outcome-recording-recovered",
    ]
    assert events[-1]["dropped"] == 700


async def test_records_arriving_during_a_failed_write_keep_the_bound(outcome_location):
    path = outcome_location
    disk = Faults("read-only")
    async with OutcomeRecorder(
        disk.database(path), batch_size=100, max_buffered=300, flush_seconds=3600
    ) as recorder:
        for counter in range(300):
            decide(recorder, counter, T0)
        with pytest.raises(READ_ONLY_ERRORS):
            await recorder.flush()  # leaves no connection: the next write opens one
        disk.held = True
        flush = asyncio.create_task(recorder.flush())
        await wait_until(lambda: disk.waiting)
        assert recorder.buffered == 200  # the first batch is in flight
        for counter in range(300, 400):
            decide(recorder, counter, T0)
        disk.release()
        with pytest.raises(READ_ONLY_ERRORS):
            await flush
        # The failed batch was the oldest: it goes, the newer records stay.
        assert (recorder.buffered, recorder.dropped) == (300, 100)
        disk.fault = None
        assert await recorder.flush() == 300
    assert [r.request_id for r in await read_records_from(path)] == [rid(c) for c in range(100, 400)]


async def test_close_on_an_unwritable_file_counts_and_logs_what_it_could_not_write(outcome_location):
    path = outcome_location
    recorder = OutcomeRecorder(Faults("read-only").database(path), flush_seconds=3600)
    await recorder.start()
    for counter in range(5):
        decide(recorder, counter, T0)
    with capture_logs() as logs:
        await recorder.close()
    assert (recorder.buffered, recorder.dropped) == (0, 5)
    (lost,) = [e for e in logs if e["event"] == "outcome-records-lost-at-close"]
    assert lost["count"] == 5
    field, code = read_only_error(path)
    assert lost[field] == code


async def test_purge_deletes_old_rows_in_chunks_and_old_days(outcome_location, monkeypatch):
    monkeypatch.setattr(recorder_module, "_PURGE_CHUNK", 2)
    path = outcome_location
    async with OutcomeRecorder(database(path), flush_seconds=3600) as recorder:
        for counter in range(10):
            decide(recorder, counter, T0 + timedelta(hours=6 * counter))  # 10:00 on day 1 to 16:00 on day 3
        await recorder.flush()
        cutoff = datetime(2024, 5, 2, 12, tzinfo=UTC)
        assert await recorder.purge(cutoff) == 5  # 10:00, 16:00, 22:00, 04:00 and 10:00 of day 2
    remaining = await read_records_from(path)
    assert remaining[0].received_at == datetime(2024, 5, 2, 16, tzinfo=UTC)
    assert len(remaining) == 5
    # Day 1 is wholly before the cutoff; day 2's counts are kept (the report reads whole days from them).
    assert sorted(await daily_totals(path)) == [datetime(2024, 5, d, tzinfo=UTC) for d in (2, 3)]
    hours = await read_rollup_totals_from(path, Rollup.HOURLY)
    assert min(hours) == datetime(2024, 5, 2, 16, tzinfo=UTC)  # hours before 12:00 on day 2 are gone


async def test_retention_purges_in_the_background(outcome_location):
    path = outcome_location
    now = T0 + timedelta(days=10)
    async with OutcomeRecorder(
        database(path), flush_seconds=0.05, retention_days=5, clock=lambda: now
    ) as recorder:
        decide(recorder, 1, T0)  # older than five days
        decide(recorder, 2, now)
        await wait_until(lambda: recorder.purged == 1)
    assert [r.request_id for r in await read_records_from(path)] == [rid(2)]


async def test_u64_counters_round_trip(outcome_location):
    path = outcome_location
    top = 2**64 - 1
    async with OutcomeRecorder(database(path)) as recorder:
        decide(recorder, top, T0)
        recorder.record_device_outcome(rid(top), "success", "I0", T0)
    (record,) = await read_records_from(path)
    assert record.request_id == rid(top)
    assert record.device_outcome == "success"
    assert await rows(path, "SELECT request_id FROM outcome_records") == [(rid(top),)]


def test_inconsistent_or_naive_input_is_refused_at_the_call(tmp_path):
    recorder = OutcomeRecorder(SqliteOutcomes(tmp_path / "db.sqlite3"))
    with pytest.raises(ValueError, match="does not match"):
        recorder.record_decision(
            request_id=rid(1, OTHER_DEVICE),
            originator=USER,
            role=None,
            target=DEVICE,
            srv=None,
            category=None,
            command_variant=1,
            received_at=T0,
            decision="reject",
            response_code="E4",
            reason="x",
            flagged=False,
        )
    with pytest.raises(ValueError, match="timezone"):
        decide(recorder, 1, datetime(2024, 5, 1, 10, 0))  # noqa: DTZ001 - the point of the test
    with pytest.raises(ValueError, match="DeviceOutcome"):
        recorder.record_device_outcome(rid(1), "maybe", None, T0)


async def read_records_from(path):
    async with open_reader(path) as db:
        return await read_records(db, T0 - timedelta(days=30), T0 + timedelta(days=30))


async def read_rollup_totals_from(path, rollup: Rollup) -> dict[datetime, Tally]:
    async with open_reader(path) as db:
        return await read_rollup_totals(db, rollup, T0 - timedelta(days=30), T0 + timedelta(days=30))


async def daily_totals(path) -> dict[datetime, Tally]:
    return await read_rollup_totals_from(path, Rollup.DAILY)


async def migrate_to_first_version(location: Location) -> None:
    if is_postgres(location):
        pool = await asyncpg.create_pool(str(location), min_size=1, max_size=1)
        try:
            async with pool.acquire() as db:
                await migrate_component(db, COMPONENT, PG_MIGRATIONS[:1])
        finally:
            await pool.close()
        return
    db = await connect(location)
    try:
        await migrate(db, COMPONENT, MIGRATIONS[:1])
    finally:
        await db.close()


def test_both_engines_have_the_same_outcome_schema_versions() -> None:
    assert len(PG_MIGRATIONS) == len(MIGRATIONS)


async def test_migration_2_moves_refused_flag_requests_out_of_handled_locally(outcome_location) -> None:
    path = outcome_location
    await migrate_to_first_version(path)
    await rows(path, "INSERT INTO outcome_parties (eui) VALUES (?), (?)", USER, DEVICE)
    for counter, code in ((1, "I0"), (2, "E081505"), (3, "E3")):
        await rows(
            path,
            "INSERT INTO outcomes (originator_id, target_id, counter, srv, category, received_at, decision,"
            " response_code, reason, flagged) VALUES ((SELECT party_id FROM outcome_parties WHERE eui = ?),"
            " (SELECT party_id FROM outcome_parties WHERE eui = ?), ?, '8.15.1', 'consumer-choice-flag', ?,"
            " 'handle-locally', ?, 'r', 1 = 0)",
            USER,
            DEVICE,
            counter,
            to_ms(T0),
            code,
        )
    for table, start in (("outcome_hourly", "2024-05-01T10:00"), ("outcome_daily", "2024-05-01")):
        await rows(
            path,
            f"INSERT INTO {table} (start, originator, role, srv, category, requests, handled_locally)"
            " VALUES (?, ?, '', '8.15.1', 'consumer-choice-flag', 3, 3)",
            start,
            USER,
        )
    async with OutcomeRecorder(database(path)):
        pass
    expected = Tally(requests=3, handled_locally=1, refused_flag_request=2)
    assert await read_rollup_totals_from(path, Rollup.HOURLY) == {T0: expected}
    assert await read_rollup_totals_from(path, Rollup.DAILY) == {T0.replace(hour=0): expected}


async def test_a_refused_flag_request_is_not_handled_locally(outcome_location) -> None:
    path = outcome_location
    async with OutcomeRecorder(database(path)) as recorder:
        decide(recorder, 1, T0, decision="handle-locally", code="I0", srv="8.15.1")
        decide(recorder, 2, T0, decision="handle-locally", code="E081501", srv="8.15.1")
    expected = Tally(requests=2, handled_locally=1, refused_flag_request=1)
    assert await read_rollup_totals_from(path, Rollup.HOURLY) == {T0: expected}
    records = await read_records_from(path)
    assert sum(cells_from_records(records, 30).values(), Tally()) == expected


# -- several instances over one PostgreSQL database ---------------------------------------------------


async def test_an_answer_recorded_by_another_instance_before_the_decision_waits_for_it(postgres_url):
    async with (
        OutcomeRecorder(database(postgres_url), flush_seconds=3600) as forwarding,
        OutcomeRecorder(database(postgres_url), flush_seconds=3600) as answering,
    ):
        # The device's answer reached the other instance before the decision left this one's buffer.
        answering.record_device_outcome(rid(1), "success", "I0", T0 + timedelta(seconds=3))
        await answering.flush()
        assert await rows(postgres_url, "SELECT count(*) FROM outcome_early_answers") == [(1,)]
        decide(forwarding, 1, T0)
        decide(forwarding, 2, T0)  # its answer never comes
        await forwarding.flush()
        assert await rows(postgres_url, "SELECT count(*) FROM outcome_early_answers") == [(0,)]
        assert await answering.expire_pending(T0 + timedelta(seconds=60), 30) == 1
        assert (forwarding.unmatched, answering.unmatched) == (0, 0)
    by_id = {r.request_id: r for r in await read_records_from(postgres_url)}
    assert (by_id[rid(1)].device_outcome, by_id[rid(1)].answered_at) == ("success", T0 + timedelta(seconds=3))
    assert by_id[rid(2)].device_outcome == "timeout"
    assert Tally.total((await daily_totals(postgres_url)).values()) == Tally(
        requests=2, forwarded=2, succeeded=1, timed_out=1, within_target=1
    )


async def test_instances_writing_together_keep_the_counts_equal_to_the_rows(postgres_url):
    """Concurrent batches of several instances (shared EUIs, the same count rows) lose no increment."""
    recorders = [
        OutcomeRecorder(database(postgres_url), batch_size=25, flush_seconds=3600, target_response_seconds=30)
        for _ in range(3)
    ]
    for recorder in recorders:
        await recorder.start()
    try:
        for counter in range(600):
            recorder = recorders[counter % 3]
            decide(
                recorder, counter, T0 + timedelta(minutes=counter % 90), srv=("4.8.1", "11.2")[counter % 2]
            )
            # The answer through another instance than the decision.
            other = recorders[(counter + 1) % 3]
            other.record_device_outcome(rid(counter), ("success", "failure")[counter % 2], "I0", T0)
        await asyncio.gather(*(recorder.flush() for recorder in recorders))
        # An answer parked while its decision was committing in another transaction waits for the next
        # write of any instance, at the latest the expiry sweep (which times nothing out here).
        assert await recorders[0].expire_pending(T0, 30) == 0
    finally:
        for recorder in recorders:
            await recorder.close()
    records = await read_records_from(postgres_url)
    assert len(records) == 600
    assert all(r.device_outcome is not None for r in records)
    async with open_reader(postgres_url) as db:
        stored = await read_rollup_cells(db, Rollup.DAILY, T0.replace(hour=0), T0 + timedelta(days=1))
    assert stored == cells_from_records(records, 30)
    assert sum(recorder.unmatched for recorder in recorders) == 0


async def test_a_database_that_goes_away_bounds_the_buffer_and_is_reconnected(postgres_url):
    faults = Faults()
    recorder = OutcomeRecorder(
        faults.database(postgres_url),
        batch_size=100,
        max_buffered=300,
        flush_seconds=0.01,
        retry_seconds=0.01,
    )
    async with recorder:
        decide(recorder, 0, T0)
        await wait_until(lambda: recorder.flushed == 1)
        # The server drops the recorder's connection and refuses new ones.
        faults.fault = "unreachable"
        await rows(
            postgres_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        for counter in range(1, 1001):
            decide(recorder, counter, T0)  # routing goes on: appending never waits for the database
        await wait_until(lambda: recorder.write_failures >= 3)
        assert (recorder.buffered, recorder.dropped) == (300, 700)
        faults.fault = None
        await wait_until(lambda: recorder.buffered == 0 and not recorder.failing)
    assert [r.request_id for r in await read_records_from(postgres_url)] == [
        rid(c) for c in (0, *range(701, 1001))
    ]
