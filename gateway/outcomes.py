"""Outcome records: what became of every Service Request, kept durably for reporting.

The pipeline calls `OutcomeRecorder.record_decision` and `record_device_outcome` synchronously: they
only append to an in-memory buffer. A background task writes the buffer in batches, one transaction
per batch, through the recorder's own aiosqlite connection to the same SQLite file as the flag store
(WAL lets both connections work side by side), so the routing hot path never waits on the disk.

Storage (component "outcomes" of the shared migrations table):
- `outcomes`: one row per request. EUIs are stored as small integer ids (`outcome_parties`) and
  times as integer milliseconds since the Unix epoch (UTC): a year of 100,000 devices is tens of
  millions of rows, and this keeps each row and its indexes small. The view `outcome_records` shows
  the rows with EUIs, the RequestID and ISO-8601 times for people and ad-hoc queries.
- `outcome_hourly`, `outcome_daily`: counts per UTC hour and per UTC day of the requests' arrival,
  user, role, SRV and category, maintained in the same transaction as the rows, so a report reads
  rows only for the partial hours at the ends of its period.

MP169 counting rule (the `Tally` below): a request refused because the consumer chose reduced
communications (response code E169) is an exception, not a failure; it never enters a success-rate
denominator and is counted on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Self, TypeVar

import structlog

from gateway.store import connect, migrate
from rules.codes import ResponseCode
from rules.decide import Action
from rules.domain import utc_now

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
    from pathlib import Path

    import aiosqlite

log = structlog.get_logger("mp169.outcomes")

_T = TypeVar("_T")

COMPONENT = "outcomes"

# Each entry is one migration (a SQL script) of component "outcomes"; its version is its position + 1.
# Append new migrations; never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE outcome_parties (
        party_id INTEGER PRIMARY KEY,
        eui TEXT NOT NULL UNIQUE
    );
    CREATE TABLE outcomes (
        id INTEGER PRIMARY KEY,
        originator_id INTEGER NOT NULL REFERENCES outcome_parties (party_id),
        target_id INTEGER NOT NULL REFERENCES outcome_parties (party_id),
        counter INTEGER NOT NULL,  -- RequestID counter; u64 stored as its signed 64-bit pattern
        role TEXT,
        srv TEXT,
        category TEXT,
        command_variant INTEGER,
        received_at INTEGER NOT NULL,  -- ms since the Unix epoch, UTC
        decision TEXT NOT NULL,  -- forward | refuse | reject | handle-locally
        response_code TEXT NOT NULL,
        reason TEXT NOT NULL,
        device_outcome TEXT,  -- success | failure | timeout; NULL while pending or not forwarded
        device_response_code TEXT,
        answered_at INTEGER,
        flagged INTEGER NOT NULL  -- a concerned device was flagged at decision time
    );
    -- Device outcomes find their request by RequestID; the target and counter nearly identify it.
    CREATE INDEX outcomes_request ON outcomes (target_id, counter);
    CREATE INDEX outcomes_received ON outcomes (received_at);
    -- Small: only forwarded requests still waiting for their device.
    CREATE INDEX outcomes_pending ON outcomes (received_at)
        WHERE decision = 'forward' AND device_outcome IS NULL;
    -- Counts of the requests that arrived in each UTC hour / day (the rollups), kept with the rows.
    CREATE TABLE outcome_hourly (
        start TEXT NOT NULL,  -- YYYY-MM-DDTHH:00
        originator TEXT NOT NULL,
        role TEXT NOT NULL,  -- '' when none
        srv TEXT NOT NULL,  -- '' when unknown
        category TEXT NOT NULL,  -- '' when unknown
        requests INTEGER NOT NULL DEFAULT 0,
        forwarded INTEGER NOT NULL DEFAULT 0,
        succeeded INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        timed_out INTEGER NOT NULL DEFAULT 0,
        refused_consumer_choice INTEGER NOT NULL DEFAULT 0,
        rejected INTEGER NOT NULL DEFAULT 0,
        handled_locally INTEGER NOT NULL DEFAULT 0,
        within_target INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (start, originator, role, srv, category)
    ) WITHOUT ROWID;
    CREATE TABLE outcome_daily (
        start TEXT NOT NULL,  -- YYYY-MM-DD
        originator TEXT NOT NULL,
        role TEXT NOT NULL,
        srv TEXT NOT NULL,
        category TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        forwarded INTEGER NOT NULL DEFAULT 0,
        succeeded INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        timed_out INTEGER NOT NULL DEFAULT 0,
        refused_consumer_choice INTEGER NOT NULL DEFAULT 0,
        rejected INTEGER NOT NULL DEFAULT 0,
        handled_locally INTEGER NOT NULL DEFAULT 0,
        within_target INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (start, originator, role, srv, category)
    ) WITHOUT ROWID;
    CREATE VIEW outcome_records AS
    SELECT o.id,
           printf('%s:%s:%llu', op.eui, tp.eui, o.counter) AS request_id,
           op.eui AS originator, o.role, tp.eui AS target, o.srv, o.category, o.command_variant,
           strftime('%Y-%m-%dT%H:%M:%fZ', o.received_at / 1000.0, 'unixepoch') AS received_at,
           o.decision, o.response_code, o.reason, o.device_outcome, o.device_response_code,
           strftime('%Y-%m-%dT%H:%M:%fZ', o.answered_at / 1000.0, 'unixepoch') AS answered_at,
           o.flagged
    FROM outcomes AS o
    JOIN outcome_parties AS op ON op.party_id = o.originator_id
    JOIN outcome_parties AS tp ON tp.party_id = o.target_id;
    """,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_U64 = 2**64
_I64_MAX = 2**63 - 1
_PURGE_CHUNK = 20_000
_SQL_PARAMS = 500  # bound parameters per statement, well below SQLite's limit
_FLUSH_RETRY_SECONDS = 1.0
_PURGE_EVERY = timedelta(hours=1)


class DeviceOutcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    TIMEOUT = "timeout"


def to_ms(at: datetime) -> int:
    """Milliseconds since the Unix epoch of an aware datetime."""
    if at.tzinfo is None:
        raise ValueError(f"naive datetime {at.isoformat()}: outcome times must be timezone-aware")
    return (at - _EPOCH) // _MS


def from_ms(ms: int) -> datetime:
    return _EPOCH + ms * _MS


class Rollup(StrEnum):
    """The count tables: per UTC hour and per UTC day of the requests' arrival."""

    HOURLY = "outcome_hourly"
    DAILY = "outcome_daily"

    def key(self, at: datetime) -> str:
        """The `start` of the bucket holding `at`."""
        at = at.astimezone(UTC)
        return at.strftime("%Y-%m-%dT%H:00") if self is Rollup.HOURLY else at.date().isoformat()

    @staticmethod
    def start_of(key: str) -> datetime:
        return datetime.fromisoformat(key).replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class OutcomeRecord:
    """One request's lifecycle, as recorded and as read back for reports."""

    request_id: str
    originator: str
    role: str | None
    target: str
    srv: str | None
    category: str | None
    command_variant: int | None
    received_at: datetime
    decision: str
    response_code: str
    reason: str
    device_outcome: str | None
    device_response_code: str | None
    answered_at: datetime | None
    flagged: bool


@dataclass(frozen=True, slots=True)
class Tally:
    """Counts for a set of requests; the one place the MP169 counting rule lives.

    Success rate = succeeded / final, where final = succeeded + failed + timed out (forwarded
    requests with a device outcome). Requests refused for consumer choice are never forwarded, so
    they never enter `final`: they are exceptions, counted in `refused_consumer_choice`.
    """

    requests: int = 0
    forwarded: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    refused_consumer_choice: int = 0
    rejected: int = 0
    """Rejected as invalid or unauthorised, or refused for a reason other than consumer choice."""
    handled_locally: int = 0
    within_target: int = 0
    """Final outcomes answered by the device (success or failure) within the target response time."""

    @classmethod
    def of_decision(cls, decision: str, response_code: str) -> Tally:
        if response_code == ResponseCode.CONSUMER_CHOICE:
            return cls(requests=1, refused_consumer_choice=1)
        if decision == Action.FORWARD:
            return cls(requests=1, forwarded=1)
        if decision == Action.LOCAL:
            return cls(requests=1, handled_locally=1)
        return cls(requests=1, rejected=1)

    @classmethod
    def of_device_outcome(cls, outcome: str, received_ms: int, answered_ms: int, target_ms: int) -> Tally:
        if outcome == DeviceOutcome.TIMEOUT:
            return cls(timed_out=1)
        in_time = int(answered_ms - received_ms <= target_ms)
        if outcome == DeviceOutcome.SUCCESS:
            return cls(succeeded=1, within_target=in_time)
        return cls(failed=1, within_target=in_time)

    @classmethod
    def of_record(cls, record: OutcomeRecord, target_response_seconds: float) -> Tally:
        tally = cls.of_decision(record.decision, record.response_code)
        if record.device_outcome is None or record.answered_at is None:
            return tally
        return tally + cls.of_device_outcome(
            record.device_outcome,
            to_ms(record.received_at),
            to_ms(record.answered_at),
            round(target_response_seconds * 1000),
        )

    @classmethod
    def total(cls, tallies: Iterable[Tally]) -> Tally:
        result = cls()
        for tally in tallies:
            result += tally
        return result

    def __add__(self, other: Tally) -> Tally:
        return Tally(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Tally)))

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in fields(Tally))

    @property
    def final(self) -> int:
        return self.succeeded + self.failed + self.timed_out

    @property
    def pending(self) -> int:
        return self.forwarded - self.final

    @property
    def success_rate(self) -> float | None:
        """MP169 success rate: consumer-choice exceptions excluded from the denominator."""
        return self.succeeded / self.final if self.final else None

    @property
    def within_target_share(self) -> float | None:
        return self.within_target / self.final if self.final else None

    @property
    def success_rate_counting_exceptions(self) -> float | None:
        """What the rate would be if consumer-choice refusals counted as failures (before MP169)."""
        denominator = self.final + self.refused_consumer_choice
        return self.succeeded / denominator if denominator else None


TALLY_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Tally))


@dataclass(frozen=True, slots=True)
class CellKey:
    """The finest grouping reports need: user, role, SRV and category."""

    originator: str
    role: str | None
    srv: str | None
    category: str | None


# -- the buffer's entries ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Decision:
    originator: str
    target: str
    counter: int
    role: str | None
    srv: str | None
    category: str | None
    command_variant: int | None
    received_ms: int
    decision: str
    response_code: str
    reason: str
    flagged: bool


@dataclass(frozen=True, slots=True)
class _Answer:
    originator: str
    target: str
    counter: int
    outcome: str
    code: str | None
    answered_ms: int


_Entry = _Decision | _Answer


def split_request_id(request_id: str) -> tuple[str, str, int]:
    originator, target, counter = request_id.split(":")
    return originator, target, int(counter)


def _signed(counter: int) -> int:
    """SQLite integers are signed 64-bit: store a u64 counter above 2**63 - 1 as its bit pattern."""
    return counter - _U64 if counter > _I64_MAX else counter


def _unsigned(stored: int) -> int:
    return stored + _U64 if stored < 0 else stored


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class OutcomeRecorder:
    """Buffers outcome records and writes them in batched transactions from a background task."""

    def __init__(  # noqa: PLR0913 - the settings of one recorder
        self,
        path: Path,
        *,
        batch_size: int = 500,
        flush_seconds: float = 0.5,
        target_response_seconds: float = 30.0,
        retention_days: int | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._path = path
        self._batch_size = batch_size
        self._flush_seconds = flush_seconds
        self._target_ms = round(target_response_seconds * 1000)
        self._retention = None if retention_days is None else timedelta(days=retention_days)
        self._clock = clock
        self._buffer: list[_Entry] = []
        self._db: aiosqlite.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # One transaction at a time on the connection: flushes, expiry and purge chunks interleave.
        self._lock = asyncio.Lock()
        self._parties: dict[str, int] = {}
        self._closed = False
        self.flushed = 0
        """Records (decisions and device outcomes) written so far."""
        self.unmatched = 0
        """Device outcomes that found no forwarded request still waiting for one."""
        self.purged = 0
        """Rows deleted by retention so far."""

    # -- the hot path: synchronous, memory only -----------------------------------------------

    def record_decision(  # noqa: PLR0913 - one argument per recorded fact
        self,
        *,
        request_id: str,
        originator: str,
        role: str | None,
        target: str,
        srv: str | None,
        category: str | None,
        command_variant: int | None,
        received_at: datetime,
        decision: str,
        response_code: str,
        reason: str,
        flagged: bool,
    ) -> None:
        counter = _checked_counter(request_id, originator, target)
        self._append(
            _Decision(
                originator=originator,
                target=target,
                counter=counter,
                role=role,
                srv=srv,
                category=category,
                command_variant=command_variant,
                received_ms=to_ms(received_at),
                decision=decision,
                response_code=response_code,
                reason=reason,
                flagged=flagged,
            )
        )

    def record_device_outcome(self, request_id: str, outcome: str, code: str | None, at: datetime) -> None:
        """The device's final answer to a forwarded request (success, failure) or a timeout."""
        originator, target, counter = split_request_id(request_id)
        self._append(_Answer(originator, target, counter, DeviceOutcome(outcome).value, code, to_ms(at)))

    def _append(self, entry: _Entry) -> None:
        if self._closed:
            raise RuntimeError("outcome recorder is closed")
        self._buffer.append(entry)
        if len(self._buffer) >= self._batch_size:
            self._wake.set()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await connect(self._path)
        await migrate(self._db, COMPONENT, MIGRATIONS)
        self._task = asyncio.create_task(self._run(), name="mp169-outcomes")

    async def close(self) -> None:
        """Stop the background task and write everything still buffered."""
        self._closed = True
        if self._task is not None:
            # Not cancelled: a cancellation landing on a COMMIT could write a batch twice.
            self._wake.set()
            await self._task
            self._task = None
        if self._db is not None:
            try:
                await self.flush()
            finally:
                await self._db.close()
                self._db = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _run(self) -> None:
        next_purge = self._clock()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._flush_seconds):
                    await self._wake.wait()
            self._wake.clear()
            if self._closed:
                return  # close() writes what is left
            try:
                await self.flush()
                if self._retention is not None and self._clock() >= next_purge:
                    await self.purge(self._clock() - self._retention)
                    next_purge = self._clock() + _PURGE_EVERY
            except Exception:
                log.exception("outcome-flush-failed", buffered=len(self._buffer))
                await asyncio.sleep(_FLUSH_RETRY_SECONDS)

    # -- writing --------------------------------------------------------------------------------

    async def flush(self) -> int:
        """Write everything buffered, one transaction per batch; returns how many records."""
        written = 0
        async with self._lock:
            while self._buffer:
                batch = self._buffer[: self._batch_size]
                del self._buffer[: len(batch)]
                try:
                    await self._write(batch)
                except BaseException:
                    self._buffer[:0] = batch  # nothing of it was committed: keep it, in order
                    raise
                written += len(batch)
                self.flushed += len(batch)
        return written

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("outcome recorder is not started")
        return self._db

    async def _write(self, batch: Sequence[_Entry]) -> None:
        db = self._connection()
        decisions = [e for e in batch if isinstance(e, _Decision)]
        all_answers = [e for e in batch if isinstance(e, _Answer)]
        answers = _first_answer_per_request(all_answers)
        await db.execute("BEGIN IMMEDIATE")
        try:
            parties = await self._resolve_parties(db, batch)
            await db.executemany(
                "INSERT INTO outcomes (originator_id, target_id, counter, role, srv, category,"
                " command_variant, received_at, decision, response_code, reason, flagged)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        parties[d.originator],
                        parties[d.target],
                        _signed(d.counter),
                        d.role,
                        d.srv,
                        d.category,
                        d.command_variant,
                        d.received_ms,
                        d.decision,
                        d.response_code,
                        d.reason,
                        int(d.flagged),
                    )
                    for d in decisions
                ],
            )
            increments = _decision_increments(decisions)
            if answers:
                answered = await self._apply_answers(db, answers, parties)
                self.unmatched += len(all_answers) - len(answered)
                _add_answer_increments(increments, answered, self._target_ms)
            await _upsert_rollups(db, increments)
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        # Only now are the new parties' ids durable.
        self._parties.update(parties)

    async def _resolve_parties(self, db: aiosqlite.Connection, batch: Sequence[_Entry]) -> dict[str, int]:
        euis = {e.originator for e in batch} | {e.target for e in batch}
        parties = {eui: self._parties[eui] for eui in euis if eui in self._parties}
        unknown = sorted(euis - parties.keys())
        if not unknown:
            return parties
        await db.executemany(
            "INSERT INTO outcome_parties (eui) VALUES (?) ON CONFLICT (eui) DO NOTHING",
            [(eui,) for eui in unknown],
        )
        for chunk in _chunks(unknown, _SQL_PARAMS):
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT eui, party_id FROM outcome_parties WHERE eui IN ({marks})"  # noqa: S608 - placeholders
            async with db.execute(sql, chunk) as cursor:
                parties.update({str(eui): int(party) async for eui, party in cursor})
        return parties

    async def _apply_answers(
        self, db: aiosqlite.Connection, answers: Sequence[_Answer], parties: Mapping[str, int]
    ) -> list[tuple[CellKey, int, int, str]]:
        """Set the device outcome of requests still waiting; returns (cell, received, answered, outcome)."""
        await db.execute(
            "CREATE TEMP TABLE IF NOT EXISTS outcome_answers (target_id INTEGER, counter INTEGER,"
            " originator_id INTEGER, outcome TEXT, code TEXT, answered_at INTEGER)"
        )
        await db.execute("DELETE FROM temp.outcome_answers")
        await db.executemany(
            "INSERT INTO temp.outcome_answers VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    parties[a.target],
                    _signed(a.counter),
                    parties[a.originator],
                    a.outcome,
                    a.code,
                    a.answered_ms,
                )
                for a in answers
            ],
        )
        return await _update_returning(
            db,
            "UPDATE outcomes SET device_outcome = a.outcome, device_response_code = a.code,"
            " answered_at = a.answered_at"
            " FROM temp.outcome_answers AS a"
            " WHERE outcomes.target_id = a.target_id AND outcomes.counter = a.counter"
            " AND outcomes.originator_id = a.originator_id"
            " AND outcomes.decision = 'forward' AND outcomes.device_outcome IS NULL"
            " RETURNING (SELECT eui FROM outcome_parties WHERE party_id = outcomes.originator_id),"
            " outcomes.role, outcomes.srv, outcomes.category, outcomes.received_at, outcomes.answered_at,"
            " outcomes.device_outcome",
            (),
        )

    async def expire_pending(self, now: datetime, target_response_seconds: float) -> int:
        """Mark forwarded requests older than the target response time and still unanswered as timed out.

        For requests whose gateway stopped before their answer or timeout was recorded (the pipeline
        times out the others itself). Call it with a margin over the pipeline's own timeout.
        """
        cutoff = to_ms(now) - round(target_response_seconds * 1000)
        await self.flush()
        async with self._lock:
            db = self._connection()
            await db.execute("BEGIN IMMEDIATE")
            try:
                expired = await _update_returning(
                    db,
                    "UPDATE outcomes SET device_outcome = 'timeout', device_response_code = ?,"
                    " answered_at = ?"
                    " WHERE decision = 'forward' AND device_outcome IS NULL AND received_at <= ?"
                    " RETURNING (SELECT eui FROM outcome_parties WHERE party_id = outcomes.originator_id),"
                    " role, srv, category, received_at, answered_at, device_outcome",
                    (ResponseCode.DEVICE_TIMEOUT.value, to_ms(now), cutoff),
                )
                increments: dict[tuple[str, CellKey], Tally] = {}
                _add_answer_increments(increments, expired, self._target_ms)
                await _upsert_rollups(db, increments)
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
        if expired:
            log.info("outcomes-expired", count=len(expired))
        return len(expired)

    async def purge(self, older_than: datetime) -> int:
        """Delete requests received before `older_than`, and the counts of hours and days ended by then.

        Deletes in chunks, each its own short transaction, so recording goes on meanwhile.
        """
        cutoff = to_ms(older_than)
        deleted = 0
        while True:
            async with self._lock:
                db = self._connection()
                cursor = await db.execute(
                    "DELETE FROM outcomes WHERE id IN"
                    " (SELECT id FROM outcomes WHERE received_at < ? ORDER BY received_at LIMIT ?)",
                    (cutoff, _PURGE_CHUNK),
                )
                count = cursor.rowcount
            deleted += count
            self.purged += count
            if count < _PURGE_CHUNK:
                break
        async with self._lock:
            db = self._connection()
            for rollup in Rollup:
                await db.execute(
                    f"DELETE FROM {rollup} WHERE start < ?",  # noqa: S608 - fixed table names
                    (rollup.key(older_than),),
                )
        if deleted:
            log.info("outcomes-purged", count=deleted, older_than=older_than.isoformat())
        return deleted


def _checked_counter(request_id: str, originator: str, target: str) -> int:
    rid_originator, rid_target, counter = split_request_id(request_id)
    if (rid_originator, rid_target) != (originator, target):
        raise ValueError(f"RequestID {request_id} does not match originator {originator} and target {target}")
    return counter


def _first_answer_per_request(answers: Iterable[_Answer]) -> list[_Answer]:
    """A request has one final outcome: the first one recorded wins, as in the database."""
    first: dict[tuple[str, str, int], _Answer] = {}
    for answer in answers:
        first.setdefault((answer.originator, answer.target, answer.counter), answer)
    return list(first.values())


async def _update_returning(
    db: aiosqlite.Connection, sql: str, params: tuple[object, ...]
) -> list[tuple[CellKey, int, int, str]]:
    async with db.execute(sql, params) as cursor:
        return [
            (CellKey(str(originator), role, srv, category), int(received), int(answered), str(outcome))
            async for originator, role, srv, category, received, answered, outcome in cursor
        ]


def _hour(ms: int) -> str:
    return Rollup.HOURLY.key(from_ms(ms))


def _decision_increments(decisions: Iterable[_Decision]) -> dict[tuple[str, CellKey], Tally]:
    """Hourly count increments; the daily ones are their sums."""
    increments: dict[tuple[str, CellKey], Tally] = {}
    for d in decisions:
        key = (_hour(d.received_ms), CellKey(d.originator, d.role, d.srv, d.category))
        increments[key] = increments.get(key, Tally()) + Tally.of_decision(d.decision, d.response_code)
    return increments


def _add_answer_increments(
    increments: dict[tuple[str, CellKey], Tally],
    answered: Iterable[tuple[CellKey, int, int, str]],
    target_ms: int,
) -> None:
    # Counted in the hour the request arrived, with the request, whenever the answer came.
    for cell, received_ms, answered_ms, outcome in answered:
        key = (_hour(received_ms), cell)
        tally = Tally.of_device_outcome(outcome, received_ms, answered_ms, target_ms)
        increments[key] = increments.get(key, Tally()) + tally


def _upsert_sql(rollup: Rollup) -> str:
    # The count columns are TALLY_COLUMNS, in order.
    return f"""
INSERT INTO {rollup} (start, originator, role, srv, category, requests, forwarded, succeeded, failed,
    timed_out, refused_consumer_choice, rejected, handled_locally, within_target)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (start, originator, role, srv, category) DO UPDATE SET
    requests = requests + excluded.requests,
    forwarded = forwarded + excluded.forwarded,
    succeeded = succeeded + excluded.succeeded,
    failed = failed + excluded.failed,
    timed_out = timed_out + excluded.timed_out,
    refused_consumer_choice = refused_consumer_choice + excluded.refused_consumer_choice,
    rejected = rejected + excluded.rejected,
    handled_locally = handled_locally + excluded.handled_locally,
    within_target = within_target + excluded.within_target
"""  # noqa: S608 - fixed table names


async def _upsert_rollups(db: aiosqlite.Connection, hourly: Mapping[tuple[str, CellKey], Tally]) -> None:
    daily: dict[tuple[str, CellKey], Tally] = {}
    for (hour, cell), tally in hourly.items():
        key = (hour[:10], cell)  # YYYY-MM-DD of YYYY-MM-DDTHH:00
        daily[key] = daily.get(key, Tally()) + tally
    for rollup, increments in ((Rollup.HOURLY, hourly), (Rollup.DAILY, daily)):
        if increments:
            await db.executemany(
                _upsert_sql(rollup),
                [
                    (
                        start,
                        cell.originator,
                        cell.role or "",
                        cell.srv or "",
                        cell.category or "",
                        *tally.as_tuple(),
                    )
                    for (start, cell), tally in increments.items()
                ],
            )


# -- reading (used by reports) ------------------------------------------------------------------------


async def has_outcome_tables(db: aiosqlite.Connection) -> bool:
    async with db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outcome_hourly'"
    ) as cur:
        return await cur.fetchone() is not None


async def read_records(db: aiosqlite.Connection, since: datetime, until: datetime) -> list[OutcomeRecord]:
    """Requests received in [since, until), oldest first."""
    async with db.execute(
        "SELECT op.eui, tp.eui, o.counter, o.role, o.srv, o.category, o.command_variant, o.received_at,"
        " o.decision, o.response_code, o.reason, o.device_outcome, o.device_response_code, o.answered_at,"
        " o.flagged"
        " FROM outcomes AS o"
        " JOIN outcome_parties AS op ON op.party_id = o.originator_id"
        " JOIN outcome_parties AS tp ON tp.party_id = o.target_id"
        " WHERE o.received_at >= ? AND o.received_at < ? ORDER BY o.received_at, o.id",
        (to_ms(since), to_ms(until)),
    ) as cursor:
        return [_record(row) for row in await cursor.fetchall()]


def _record(row: Sequence[Any]) -> OutcomeRecord:
    originator, target, counter, *middle, answered, flagged = row
    role, srv, category, command_variant, received, decision, code, reason, outcome, device_code = middle
    return OutcomeRecord(
        request_id=f"{originator}:{target}:{_unsigned(counter)}",
        originator=originator,
        role=role,
        target=target,
        srv=srv,
        category=category,
        command_variant=command_variant,
        received_at=from_ms(received),
        decision=decision,
        response_code=code,
        reason=reason,
        device_outcome=outcome,
        device_response_code=device_code,
        answered_at=None if answered is None else from_ms(answered),
        flagged=bool(flagged),
    )


_SUMS = ", ".join(f"sum({c})" for c in TALLY_COLUMNS)


async def read_rollup_cells(
    db: aiosqlite.Connection, rollup: Rollup, since: datetime, until: datetime
) -> dict[CellKey, Tally]:
    """Counts per user, role, SRV and category of the buckets starting in [since, until)."""
    async with db.execute(
        f"SELECT originator, role, srv, category, {_SUMS} FROM {rollup}"  # noqa: S608 - fixed names
        " WHERE start >= ? AND start < ? GROUP BY originator, role, srv, category",
        (rollup.key(since), rollup.key(until)),
    ) as cursor:
        return {
            CellKey(str(row[0]), row[1] or None, row[2] or None, row[3] or None): Tally(*row[4:])
            for row in await cursor.fetchall()
        }


async def read_rollup_totals(
    db: aiosqlite.Connection, rollup: Rollup, since: datetime, until: datetime
) -> dict[datetime, Tally]:
    """Counts per bucket of the buckets starting in [since, until)."""
    async with db.execute(
        f"SELECT start, {_SUMS} FROM {rollup} WHERE start >= ? AND start < ? GROUP BY start",  # noqa: S608
        (rollup.key(since), rollup.key(until)),
    ) as cursor:
        return {Rollup.start_of(row[0]): Tally(*row[1:]) for row in await cursor.fetchall()}
