"""The outcome recorder: buffers what became of every Service Request and writes it in batches.

The pipeline calls `OutcomeRecorder.record_decision` and `record_device_outcome` synchronously: they
only append to an in-memory buffer. A background task writes the buffer in batches, one transaction
per batch, through the recorder's own aiosqlite connection to the same SQLite file as the flag store
(WAL lets both connections work side by side), so the routing hot path never waits on the disk. The
same connection expires requests left pending by a stopped gateway and purges old ones (retention).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Self, TypeVar

import structlog

from gateway.outcomes.schema import (
    COMPONENT,
    MIGRATIONS,
    DeviceOutcome,
    Rollup,
    signed_counter,
    split_request_id,
    to_ms,
)
from gateway.outcomes.tally import (
    CellKey,
    Increments,
    Tally,
    add_answer_increments,
    add_decision_increments,
    daily_increments,
)
from gateway.store import connect, migrate
from rules.codes import ResponseCode
from rules.domain import utc_now

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
    from datetime import datetime
    from pathlib import Path

    import aiosqlite

log = structlog.get_logger("mp169.outcomes")

_T = TypeVar("_T")

_PURGE_CHUNK = 20_000
_SQL_PARAMS = 500  # bound parameters per statement, well below SQLite's limit
_FLUSH_RETRY_SECONDS = 1.0
_PURGE_EVERY = timedelta(hours=1)

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
                        signed_counter(d.counter),
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
            increments: Increments = {}
            add_decision_increments(
                increments,
                (
                    (
                        CellKey(d.originator, d.role, d.srv, d.category),
                        d.received_ms,
                        d.decision,
                        d.response_code,
                    )
                    for d in decisions
                ),
            )
            if answers:
                answered = await self._apply_answers(db, answers, parties)
                self.unmatched += len(all_answers) - len(answered)
                add_answer_increments(increments, answered, self._target_ms)
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
                    signed_counter(a.counter),
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
                increments: Increments = {}
                add_answer_increments(increments, expired, self._target_ms)
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
    for rollup, increments in ((Rollup.HOURLY, hourly), (Rollup.DAILY, daily_increments(hourly))):
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
