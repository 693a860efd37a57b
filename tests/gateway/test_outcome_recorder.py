"""The outcome recorder on a real SQLite file: batching, late device outcomes, expiry, purge, shutdown."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import aiosqlite
import pytest
from structlog.testing import capture_logs

from gateway.metrics import Metrics
from gateway.outcomes import recorder as recorder_module
from gateway.outcomes.queries import read_records, read_rollup_cells, read_rollup_totals
from gateway.outcomes.recorder import OutcomeRecorder
from gateway.outcomes.schema import COMPONENT, MIGRATIONS, Rollup, to_ms
from gateway.outcomes.tally import Tally
from gateway.report.compute import cells_from_records
from gateway.store import connect, migrate, open_connection

if TYPE_CHECKING:
    from pathlib import Path

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


async def rows(path, sql: str) -> list[tuple[object, ...]]:
    async with aiosqlite.connect(path) as db, db.execute(sql) as cursor:
        return list(await cursor.fetchall())


async def wait_until(predicate, seconds: float = 10.0) -> None:
    """Wait for the background task (generous bound: it is not a timing assertion)."""
    async with asyncio.timeout(seconds):
        while not predicate():  # noqa: ASYNC110 - polls counters the recorder exposes
            await asyncio.sleep(0.01)


async def test_background_task_writes_a_full_batch_and_close_writes_the_rest(tmp_path):
    path = tmp_path / "db.sqlite3"
    recorder = OutcomeRecorder(path, batch_size=3, flush_seconds=3600)
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


async def test_interval_flush_writes_a_partial_batch(tmp_path):
    path = tmp_path / "db.sqlite3"
    async with OutcomeRecorder(path, batch_size=1000, flush_seconds=0.05) as recorder:
        decide(recorder, 1, T0)
        await wait_until(lambda: recorder.flushed == 1)
        assert await rows(path, "SELECT count(*) FROM outcomes") == [(1,)]


async def test_device_outcome_in_a_later_batch_updates_its_request(tmp_path):
    path = tmp_path / "db.sqlite3"
    async with OutcomeRecorder(
        path, batch_size=100, flush_seconds=3600, target_response_seconds=30
    ) as recorder:
        decide(recorder, 1, T0)
        decide(recorder, 1, T0, device=OTHER_DEVICE)  # same counter, another target: another request
        await recorder.flush()
        recorder.record_device_outcome(rid(1), "success", "I0", T0 + timedelta(seconds=4))
        # A second answer to the same request does not replace the first final outcome.
        recorder.record_device_outcome(rid(1), "failure", "E20", T0 + timedelta(seconds=5))
        recorder.record_device_outcome(rid(99), "success", "I0", T0)  # never forwarded
        await recorder.flush()
        assert recorder.unmatched == 2
    records = {r.request_id: r for r in await read_records_from(path)}
    answered = records[rid(1)]
    assert (answered.device_outcome, answered.device_response_code) == ("success", "I0")
    assert answered.answered_at == T0 + timedelta(seconds=4)
    assert records[rid(1, OTHER_DEVICE)].device_outcome is None


async def test_a_later_answer_after_restart_finds_its_request(tmp_path):
    path = tmp_path / "db.sqlite3"
    async with OutcomeRecorder(path) as first:
        decide(first, 7, T0)
    async with OutcomeRecorder(path) as second:  # migrations already applied; party ids from the file
        second.record_device_outcome(rid(7), "failure", "E20", T0 + timedelta(seconds=1))
    (record,) = await read_records_from(path)
    assert record.device_outcome == "failure"
    assert await rows(
        path, "SELECT component, version FROM schema_migrations WHERE component = 'outcomes'"
    ) == [("outcomes", version) for version in range(1, len(MIGRATIONS) + 1)]


async def test_expire_pending_times_out_only_old_unanswered_forwards(tmp_path):
    path = tmp_path / "db.sqlite3"
    async with OutcomeRecorder(path, flush_seconds=3600, target_response_seconds=30) as recorder:
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


async def test_daily_counts_equal_the_rows_they_summarise(tmp_path):
    """The rollup is maintained incrementally across batches; it must equal a recount of the rows."""
    path = tmp_path / "db.sqlite3"
    outcomes_cycle = ("success", "failure", "timeout", None)
    async with OutcomeRecorder(
        path, batch_size=7, flush_seconds=3600, target_response_seconds=30
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
    db = await connect(path, read_only=True)
    try:
        for rollup, step, starts in (
            (Rollup.DAILY, timedelta(days=1), days),
            (Rollup.HOURLY, timedelta(hours=1), [T0 + timedelta(hours=h) for h in range(60)]),
        ):
            for start in starts:
                inside = [r for r in records if start <= r.received_at < start + step]
                expected = cells_from_records(inside, 30)
                assert await read_rollup_cells(db, rollup, start, start + step) == expected, (rollup, start)
    finally:
        await db.close()
    total = Tally.total((await daily_totals(path)).values())
    assert (total.requests, total.refused_consumer_choice, total.final) == (60, 12, 36)


class Disk:
    """The outcome file as the recorder's `opener` seam finds it: writable, or with a fault SQLite
    itself reports on the real connection: "full" (a page quota at the file's size: SQLITE_FULL, as
    on a full disk) or "read-only" (SQLITE_READONLY). Each (re)connection sees the current state."""

    def __init__(self, fault: str | None = None) -> None:
        self.fault = fault
        self.opened = 0
        self.held = False
        """The next connection waits for `release`: a write the test knows to be in flight."""
        self.waiting = False
        self._released = threading.Event()
        self.threads: set[int] = set()

    def release(self) -> None:
        self._released.set()

    def open(self, path: Path) -> sqlite3.Connection:
        if self.held:
            self.waiting = True
            self._released.wait(timeout=30)
        db = open_connection(path)  # not check_same_thread=False: the opening thread is the only user
        self.opened += 1
        self.threads.add(threading.get_ident())
        if self.fault == "full":
            (pages,) = db.execute("PRAGMA page_count").fetchone()
            db.execute(f"PRAGMA max_page_count = {pages}")
        elif self.fault == "read-only":
            db.execute("PRAGMA query_only = ON")
        return db


async def test_a_failed_batch_stays_buffered_and_nothing_of_it_is_written(tmp_path):
    path = tmp_path / "db.sqlite3"
    disk = Disk("read-only")
    async with OutcomeRecorder(path, flush_seconds=3600, opener=disk.open) as recorder:
        decide(recorder, 1, T0)
        decide(recorder, 2, T0)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
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
    ("fault", "sqlite_error"), [("full", "SQLITE_FULL"), ("read-only", "SQLITE_READONLY")]
)
async def test_an_unwritable_file_bounds_the_buffer_drops_the_oldest_and_recovers(
    tmp_path, fault, sqlite_error
):
    path = tmp_path / "db.sqlite3"
    disk = Disk(fault)
    metrics = Metrics()
    recorder = OutcomeRecorder(
        path,
        batch_size=100,
        max_buffered=300,
        flush_seconds=0.01,
        retry_seconds=0.01,
        metrics=metrics,
        opener=disk.open,
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
    assert failures[0]["sqlite_error"] == sqlite_error
    assert failures[0]["exc_info"] is not None
    assert [e["event"] for e in events if e["event"] != "outcome-write-failed"] == [
        "outcome-buffer-full-dropping-oldest",
        "outcome-recording-recovered",
    ]
    assert events[-1]["dropped"] == 700


async def test_records_arriving_during_a_failed_write_keep_the_bound(tmp_path):
    path = tmp_path / "db.sqlite3"
    disk = Disk("read-only")
    async with OutcomeRecorder(
        path, batch_size=100, max_buffered=300, flush_seconds=3600, opener=disk.open
    ) as recorder:
        for counter in range(300):
            decide(recorder, counter, T0)
        with pytest.raises(sqlite3.OperationalError):
            await recorder.flush()  # leaves no connection: the next write opens one
        disk.held = True
        flush = asyncio.create_task(recorder.flush())
        await wait_until(lambda: disk.waiting)
        assert recorder.buffered == 200  # the first batch is in flight
        for counter in range(300, 400):
            decide(recorder, counter, T0)
        disk.release()
        with pytest.raises(sqlite3.OperationalError):
            await flush
        # The failed batch was the oldest: it goes, the newer records stay.
        assert (recorder.buffered, recorder.dropped) == (300, 100)
        disk.fault = None
        assert await recorder.flush() == 300
    assert [r.request_id for r in await read_records_from(path)] == [rid(c) for c in range(100, 400)]


async def test_close_on_an_unwritable_file_counts_and_logs_what_it_could_not_write(tmp_path):
    path = tmp_path / "db.sqlite3"
    recorder = OutcomeRecorder(path, flush_seconds=3600, opener=Disk("read-only").open)
    await recorder.start()
    for counter in range(5):
        decide(recorder, counter, T0)
    with capture_logs() as logs:
        await recorder.close()
    assert (recorder.buffered, recorder.dropped) == (0, 5)
    (lost,) = [e for e in logs if e["event"] == "outcome-records-lost-at-close"]
    assert lost["count"] == 5
    assert lost["sqlite_error"] == "SQLITE_READONLY"


async def test_purge_deletes_old_rows_in_chunks_and_old_days(tmp_path, monkeypatch):
    monkeypatch.setattr(recorder_module, "_PURGE_CHUNK", 2)
    path = tmp_path / "db.sqlite3"
    async with OutcomeRecorder(path, flush_seconds=3600) as recorder:
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


async def test_retention_purges_in_the_background(tmp_path):
    path = tmp_path / "db.sqlite3"
    now = T0 + timedelta(days=10)
    async with OutcomeRecorder(path, flush_seconds=0.05, retention_days=5, clock=lambda: now) as recorder:
        decide(recorder, 1, T0)  # older than five days
        decide(recorder, 2, now)
        await wait_until(lambda: recorder.purged == 1)
    assert [r.request_id for r in await read_records_from(path)] == [rid(2)]


async def test_u64_counters_round_trip(tmp_path):
    path = tmp_path / "db.sqlite3"
    top = 2**64 - 1
    async with OutcomeRecorder(path) as recorder:
        decide(recorder, top, T0)
        recorder.record_device_outcome(rid(top), "success", "I0", T0)
    (record,) = await read_records_from(path)
    assert record.request_id == rid(top)
    assert record.device_outcome == "success"
    assert await rows(path, "SELECT request_id FROM outcome_records") == [(rid(top),)]


def test_inconsistent_or_naive_input_is_refused_at_the_call(tmp_path):
    recorder = OutcomeRecorder(tmp_path / "db.sqlite3")
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
    db = await connect(path, read_only=True)
    try:
        return await read_records(db, T0 - timedelta(days=30), T0 + timedelta(days=30))
    finally:
        await db.close()


async def read_rollup_totals_from(path, rollup: Rollup) -> dict[datetime, Tally]:
    db = await connect(path, read_only=True)
    try:
        return await read_rollup_totals(db, rollup, T0 - timedelta(days=30), T0 + timedelta(days=30))
    finally:
        await db.close()


async def daily_totals(path) -> dict[datetime, Tally]:
    return await read_rollup_totals_from(path, Rollup.DAILY)


async def test_migration_2_moves_refused_flag_requests_out_of_handled_locally(tmp_path) -> None:
    path = tmp_path / "outcomes.sqlite3"
    db = await connect(path)
    await migrate(db, COMPONENT, MIGRATIONS[:1])
    await db.execute("INSERT INTO outcome_parties VALUES (1, ?), (2, ?)", (USER, DEVICE))
    for counter, code in ((1, "I0"), (2, "E081505"), (3, "E3")):
        await db.execute(
            "INSERT INTO outcomes (originator_id, target_id, counter, srv, category, received_at, decision,"
            " response_code, reason, flagged) VALUES (1, 2, ?, '8.15.1', 'consumer-choice-flag', ?,"
            " 'handle-locally', ?, 'r', 0)",
            (counter, to_ms(T0), code),
        )
    for table, start in (("outcome_hourly", "2024-05-01T10:00"), ("outcome_daily", "2024-05-01")):
        await db.execute(
            f"INSERT INTO {table} (start, originator, role, srv, category, requests, handled_locally)"
            " VALUES (?, ?, '', '8.15.1', 'consumer-choice-flag', 3, 3)",
            (start, USER),
        )
    await db.close()
    async with OutcomeRecorder(path):
        pass
    expected = Tally(requests=3, handled_locally=1, refused_flag_request=2)
    assert await read_rollup_totals_from(path, Rollup.HOURLY) == {T0: expected}
    assert await read_rollup_totals_from(path, Rollup.DAILY) == {T0.replace(hour=0): expected}


async def test_a_refused_flag_request_is_not_handled_locally(tmp_path) -> None:
    path = tmp_path / "outcomes.sqlite3"
    async with OutcomeRecorder(path) as recorder:
        decide(recorder, 1, T0, decision="handle-locally", code="I0", srv="8.15.1")
        decide(recorder, 2, T0, decision="handle-locally", code="E081501", srv="8.15.1")
    expected = Tally(requests=2, handled_locally=1, refused_flag_request=1)
    assert await read_rollup_totals_from(path, Rollup.HOURLY) == {T0: expected}
    records = await read_records_from(path)
    assert sum(cells_from_records(records, 30).values(), Tally()) == expected
