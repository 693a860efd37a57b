"""Outcome records in PostgreSQL: the store's database, shared by every gateway instance.

`PostgresWriter` is the recorder's `OutcomeWriter` over PostgreSQL. It lives in the recorder's worker
thread like the SQLite one, with an event loop of its own driving one asyncpg connection, so a slow or
unreachable database waits there, never on the loop that routes requests.

What several writers add (gateway/outcomes/schema.py, PG_MIGRATIONS):
- a device's answer can be recorded by one instance before the instance that forwarded the request has
  written its decision: an answer whose request has no row yet waits in `outcome_early_answers`, and
  every batch and expiry applies the waiting answers whose rows have appeared since (a DELETE claims
  each one, so exactly one writer applies it); one still waiting at expiry is unmatched;
- the parties and the count rows are locked in sorted order, so concurrent batches queue rather than
  deadlock; a deadlock or serialisation failure left anyway fails the batch, which is retried whole.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from gateway.outcomes.schema import Rollup, signed_counter
from gateway.outcomes.tally import TALLY_COLUMNS, CellKey, Increments, add_answer_increments
from gateway.outcomes.writes import INSERT_COLUMNS, Answered, Split, batch_euis, rollup_rows
from rules.codes import ResponseCode

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence
    from datetime import datetime

    from gateway.outcomes.writes import Entry

    Opener = Callable[[str], Awaitable[asyncpg.Connection[Any]]]

_T = TypeVar("_T")

CONNECT_TIMEOUT_SECONDS = 10.0
COMMAND_TIMEOUT_SECONDS = 30.0
"""A statement that takes longer fails the batch (retried): the worker never waits on a hung server."""

_INSERT_OUTCOMES = f"""
    INSERT INTO outcomes ({INSERT_COLUMNS})
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                         $7::integer[], $8::bigint[], $9::text[], $10::text[], $11::text[], $12::boolean[])
"""  # noqa: S608 - constant column list
_INSERT_PARTIES = """
    INSERT INTO outcome_parties (eui) SELECT * FROM unnest($1::text[]) ORDER BY 1 ON CONFLICT (eui) DO NOTHING
"""
_SELECT_PARTIES = "SELECT eui, party_id FROM outcome_parties WHERE eui = ANY($1::text[])"
# A second answer to a request already waiting is unmatched, as a second answer is with SQLite.
_PARK_ANSWERS = """
    INSERT INTO outcome_early_answers (originator_id, target_id, counter, outcome, code, answered_at)
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::bigint[])
    ON CONFLICT DO NOTHING
"""
_CLAIM_ANSWERS = """
    DELETE FROM outcome_early_answers AS a USING outcomes AS o
    WHERE o.target_id = a.target_id AND o.counter = a.counter AND o.originator_id = a.originator_id
    RETURNING o.id, o.decision = 'forward' AND o.device_outcome IS NULL, a.outcome, a.code, a.answered_at
"""
_RETURN_CELL = (
    "(SELECT eui FROM outcome_parties WHERE party_id = o.originator_id), o.role, o.srv, o.category,"
    " o.received_at, o.answered_at, o.device_outcome"
)
# Still NULL when the row lock is ours: another writer's expiry may have timed it out meanwhile.
_APPLY_ANSWERS = f"""
    UPDATE outcomes AS o SET device_outcome = a.outcome, device_response_code = a.code,
        answered_at = a.answered_at
    FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[]) AS a(id, outcome, code, answered_at)
    WHERE o.id = a.id AND o.device_outcome IS NULL
    RETURNING {_RETURN_CELL}
"""  # noqa: S608 - constant column list
_EXPIRE = f"""
    UPDATE outcomes AS o SET device_outcome = 'timeout', device_response_code = $1, answered_at = $2
    WHERE decision = 'forward' AND device_outcome IS NULL AND received_at <= $3
    RETURNING {_RETURN_CELL}
"""  # noqa: S608 - constant column list
_GIVE_UP_ANSWERS = "DELETE FROM outcome_early_answers WHERE answered_at <= $1"
_PURGE_ROWS = """
    DELETE FROM outcomes WHERE id IN
        (SELECT id FROM outcomes WHERE received_at < $1 ORDER BY received_at LIMIT $2)
"""


def _upsert_sql(rollup: Rollup) -> str:
    keys = "start, originator, role, srv, category"
    arrays = ", ".join(
        [f"${n}::text[]" for n in range(1, 6)]
        + [f"${n}::integer[]" for n in range(6, 6 + len(TALLY_COLUMNS))]
    )
    updates = ", ".join(f"{column} = {rollup}.{column} + excluded.{column}" for column in TALLY_COLUMNS)
    return (
        f"INSERT INTO {rollup} ({keys}, {', '.join(TALLY_COLUMNS)}) SELECT * FROM unnest({arrays})"  # noqa: S608
        f" ON CONFLICT ({keys}) DO UPDATE SET {updates}"
    )


_UPSERT = {rollup: _upsert_sql(rollup) for rollup in Rollup}


def _columns(rows: Sequence[tuple[object, ...]], width: int) -> list[list[object]]:
    """Rows as one list per column: a statement per table, whatever the batch's size (unnest)."""
    return [[row[n] for row in rows] for n in range(width)]


def _answered(rows: Sequence[asyncpg.Record]) -> Answered:
    return [
        (CellKey(str(originator), role, srv, category), int(received), int(answered), str(outcome))
        for originator, role, srv, category, received, answered, outcome in rows
    ]


async def connect(url: str) -> asyncpg.Connection[Any]:
    return await asyncpg.connect(
        url, timeout=CONNECT_TIMEOUT_SECONDS, command_timeout=COMMAND_TIMEOUT_SECONDS
    )


class PostgresWriter:
    """OutcomeWriter over one asyncpg connection, driven by an event loop of the worker thread's own."""

    def __init__(self, url: str, opener: Opener = connect) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._db = self._run(opener(url))
        except BaseException:
            self._loop.close()
            raise
        self._parties: dict[str, int] = {}

    def _run(self, work: Awaitable[_T]) -> _T:
        async def run() -> _T:
            return await work

        return self._loop.run_until_complete(run())

    def close(self) -> None:
        try:
            self._run(self._db.close(timeout=CONNECT_TIMEOUT_SECONDS))
        except Exception:  # noqa: BLE001 - a broken connection is dropped, not closed
            self._db.terminate()
        finally:
            self._loop.close()

    def write_batch(self, batch: Sequence[Entry], target_ms: int) -> int:
        return self._run(self._write_batch(batch, target_ms))

    def expire_pending(self, now_ms: int, cutoff_ms: int, target_ms: int) -> tuple[int, int]:
        return self._run(self._expire_pending(now_ms, cutoff_ms, target_ms))

    def purge_rows(self, cutoff_ms: int, limit: int) -> int:
        status = self._run(self._db.execute(_PURGE_ROWS, cutoff_ms, limit))
        return int(status.rsplit(" ", 1)[1])  # "DELETE <count>"

    def purge_rollups(self, older_than: datetime) -> None:
        async def purge() -> None:
            async with self._db.transaction():
                for rollup in Rollup:
                    await self._db.execute(
                        f"DELETE FROM {rollup} WHERE start < $1",  # noqa: S608 - fixed table names
                        rollup.key(older_than),
                    )

        self._run(purge())

    async def _write_batch(self, batch: Sequence[Entry], target_ms: int) -> int:
        split = Split.of(batch)
        unmatched = split.repeated
        async with self._db.transaction():
            ids = await self._resolve_parties(batch)
            if split.decisions:
                await self._db.execute(_INSERT_OUTCOMES, *_columns(split.decision_rows(ids), 12))
            increments = split.decision_increments()
            if split.answers:
                parked = await self._db.execute(
                    _PARK_ANSWERS,
                    [ids[a.originator] for a in split.answers],
                    [ids[a.target] for a in split.answers],
                    [signed_counter(a.counter) for a in split.answers],
                    [a.outcome for a in split.answers],
                    [a.code for a in split.answers],
                    [a.answered_ms for a in split.answers],
                )
                unmatched += len(split.answers) - int(parked.rsplit(" ", 1)[1])  # "INSERT 0 <count>"
            unmatched += await self._apply_waiting_answers(increments, target_ms)
            await self._upsert_rollups(increments)
        self._parties.update(ids)  # only now are the new parties' ids durable
        return unmatched

    async def _expire_pending(self, now_ms: int, cutoff_ms: int, target_ms: int) -> tuple[int, int]:
        async with self._db.transaction():
            increments: Increments = {}
            # The answers that arrived meanwhile first: a request answered is not timed out.
            unmatched = await self._apply_waiting_answers(increments, target_ms)
            expired = _answered(
                await self._db.fetch(_EXPIRE, ResponseCode.DEVICE_TIMEOUT.value, now_ms, cutoff_ms)
            )
            add_answer_increments(increments, expired, target_ms)
            status = await self._db.execute(_GIVE_UP_ANSWERS, cutoff_ms)
            unmatched += int(status.rsplit(" ", 1)[1])
            await self._upsert_rollups(increments)
        return len(expired), unmatched

    async def _resolve_parties(self, batch: Sequence[Entry]) -> dict[str, int]:
        euis = batch_euis(batch)
        parties = {eui: self._parties[eui] for eui in euis if eui in self._parties}
        unknown = [eui for eui in euis if eui not in parties]
        if unknown:
            await self._db.execute(_INSERT_PARTIES, unknown)
            parties.update(
                {str(eui): int(party) for eui, party in await self._db.fetch(_SELECT_PARTIES, unknown)}
            )
        return parties

    async def _apply_waiting_answers(self, increments: Increments, target_ms: int) -> int:
        """Apply every waiting answer whose request's row is there; how many of those were unmatched
        (their request was not a forward still waiting)."""
        claimed = await self._db.fetch(_CLAIM_ANSWERS)
        waiting = [row for row in claimed if row[1]]
        if not waiting:
            return len(claimed)
        answered = _answered(
            await self._db.fetch(
                _APPLY_ANSWERS,
                [row[0] for row in waiting],
                [row[2] for row in waiting],
                [row[3] for row in waiting],
                [row[4] for row in waiting],
            )
        )
        add_answer_increments(increments, answered, target_ms)
        return len(claimed) - len(answered)

    async def _upsert_rollups(self, increments: Increments) -> None:
        for rollup, rows in rollup_rows(increments):
            await self._db.execute(_UPSERT[rollup], *_columns(rows, 5 + len(TALLY_COLUMNS)))
