"""The recorder's writes: one blocking method per transaction, run in the recorder's worker thread.

`OutcomeWriter` is what the recorder needs of a database; `SqliteWriter` is it over one sqlite3
connection, `gateway.outcomes.pg.PostgresWriter` over PostgreSQL. What a batch means (its split, the
first answer per request, the rows and the count increments) is built here once for both, in the
worker thread, not on the event loop that routes requests.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from gateway.outcomes.schema import Rollup, signed_counter
from gateway.outcomes.tally import (
    TALLY_COLUMNS,
    CellKey,
    Increments,
    Tally,
    add_answer_increments,
    add_decision_increments,
    daily_increments,
)
from rules.codes import ResponseCode

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
    from datetime import datetime

_T = TypeVar("_T")

_SQL_PARAMS = 500  # bound parameters per statement, well below SQLite's limit


# -- the buffer's entries ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
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
class Answer:
    originator: str
    target: str
    counter: int
    outcome: str
    code: str | None
    answered_ms: int


Entry = Decision | Answer

Answered = list[tuple[CellKey, int, int, str]]
"""(cell, received ms, answered ms, outcome) of requests whose device outcome was just set."""


# -- what a writer does ---------------------------------------------------------------------------


class OutcomeWriter(Protocol):
    """One connection to the outcome tables, used only by the recorder's worker thread."""

    def write_batch(self, batch: Sequence[Entry], target_ms: int) -> int:
        """Insert the decisions, set the device outcomes and update the counts, in one transaction.
        Returns how many device outcomes found no forwarded request still waiting for one."""
        ...

    def expire_pending(self, now_ms: int, cutoff_ms: int, target_ms: int) -> tuple[int, int]:
        """Time out forwarded requests received at or before `cutoff_ms` still without a device outcome;
        (requests timed out, device outcomes given up on as unmatched)."""
        ...

    def purge_rows(self, cutoff_ms: int, limit: int) -> int:
        """Delete up to `limit` of the oldest requests received before `cutoff_ms` (its own transaction)."""
        ...

    def purge_rollups(self, older_than: datetime) -> None:
        """Delete the counts of the hours and days that ended by `older_than`."""
        ...

    def close(self) -> None: ...


# -- what a batch means, for every engine ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Split:
    decisions: list[Decision]
    answers: list[Answer]
    """The first answer per request: a request has one final outcome, the first one recorded wins."""
    repeated: int
    """Answers after the first to the same request in the batch (unmatched)."""

    @classmethod
    def of(cls, batch: Sequence[Entry]) -> Split:
        decisions = [e for e in batch if isinstance(e, Decision)]
        answers = [e for e in batch if isinstance(e, Answer)]
        first = _first_answer_per_request(answers)
        return cls(decisions, first, len(answers) - len(first))

    def decision_rows(self, ids: Mapping[str, int]) -> list[tuple[object, ...]]:
        """The `outcomes` rows, in INSERT_COLUMNS order."""
        return [
            (
                ids[d.originator],
                ids[d.target],
                signed_counter(d.counter),
                d.role,
                d.srv,
                d.category,
                d.command_variant,
                d.received_ms,
                d.decision,
                d.response_code,
                d.reason,
                d.flagged,
            )
            for d in self.decisions
        ]

    def decision_increments(self) -> Increments:
        increments: Increments = {}
        add_decision_increments(
            increments,
            (
                (CellKey(d.originator, d.role, d.srv, d.category), d.received_ms, d.decision, d.response_code)
                for d in self.decisions
            ),
        )
        return increments


INSERT_COLUMNS = (
    "originator_id, target_id, counter, role, srv, category, command_variant, received_at, decision,"
    " response_code, reason, flagged"
)


def batch_euis(batch: Sequence[Entry]) -> list[str]:
    """Every EUI of a batch, sorted (instances inserting parties together lock them in one order)."""
    return sorted({e.originator for e in batch} | {e.target for e in batch})


def rollup_rows(
    hourly: Mapping[tuple[str, CellKey], Tally],
) -> Iterator[tuple[Rollup, list[tuple[object, ...]]]]:
    """Each count table's increments as rows (start, originator, role, srv, category, *TALLY_COLUMNS),
    one per stored key, sorted: concurrent writers lock the rows in one order."""
    for rollup, increments in ((Rollup.HOURLY, hourly), (Rollup.DAILY, daily_increments(hourly))):
        merged: dict[tuple[str, str, str, str, str], Tally] = {}
        for (start, cell), tally in increments.items():
            key = (start, cell.originator, cell.role or "", cell.srv or "", cell.category or "")
            merged[key] = merged.get(key, Tally()) + tally
        if merged:
            yield rollup, [(*key, *merged[key].as_tuple()) for key in sorted(merged)]


# -- SQLite -------------------------------------------------------------------------------------------


class SqliteWriter:
    """OutcomeWriter over one sqlite3 connection, with the EUI ids cached for its file."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self._parties: dict[str, int] = {}

    def write_batch(self, batch: Sequence[Entry], target_ms: int) -> int:
        return write_batch(self.db, self._parties, batch, target_ms)

    def expire_pending(self, now_ms: int, cutoff_ms: int, target_ms: int) -> tuple[int, int]:
        # One instance: a device outcome is recorded after its request's decision, never waits.
        return expire_pending(self.db, now_ms, cutoff_ms, target_ms), 0

    def purge_rows(self, cutoff_ms: int, limit: int) -> int:
        return purge_rows(self.db, cutoff_ms, limit)

    def purge_rollups(self, older_than: datetime) -> None:
        purge_rollups(self.db, older_than)

    def close(self) -> None:
        self.db.close()


# -- transactions -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        # SQLite rolls back by itself on some errors (SQLITE_FULL, SQLITE_IOERR): then a ROLLBACK would
        # fail with "no transaction is active" and hide the error that matters.
        if db.in_transaction:
            with contextlib.suppress(Exception):
                db.execute("ROLLBACK")
        raise


def write_batch(
    db: sqlite3.Connection, parties: MutableMapping[str, int], batch: Sequence[Entry], target_ms: int
) -> int:
    """Insert the decisions, set the device outcomes and update the counts, in one transaction.

    `parties` caches EUI ids of this connection's file; it gains the new ones once they are committed.
    Returns how many device outcomes found no forwarded request still waiting for one.
    """
    split = Split.of(batch)
    unmatched = split.repeated
    with _transaction(db):
        ids = _resolve_parties(db, parties, batch)
        db.executemany(
            f"INSERT INTO outcomes ({INSERT_COLUMNS}) VALUES ({', '.join('?' * 12)})",  # noqa: S608
            split.decision_rows(ids),
        )
        increments = split.decision_increments()
        if split.answers:
            answered = _apply_answers(db, split.answers, ids)
            unmatched += len(split.answers) - len(answered)
            add_answer_increments(increments, answered, target_ms)
        _upsert_rollups(db, increments)
    # Only now are the new parties' ids durable.
    parties.update(ids)
    return unmatched


def expire_pending(db: sqlite3.Connection, now_ms: int, cutoff_ms: int, target_ms: int) -> int:
    """Time out forwarded requests received at or before `cutoff_ms` still without a device outcome."""
    with _transaction(db):
        expired = _update_returning(
            db,
            "UPDATE outcomes SET device_outcome = 'timeout', device_response_code = ?,"
            " answered_at = ?"
            " WHERE decision = 'forward' AND device_outcome IS NULL AND received_at <= ?"
            " RETURNING (SELECT eui FROM outcome_parties WHERE party_id = outcomes.originator_id),"
            " role, srv, category, received_at, answered_at, device_outcome",
            (ResponseCode.DEVICE_TIMEOUT.value, now_ms, cutoff_ms),
        )
        increments: Increments = {}
        add_answer_increments(increments, expired, target_ms)
        _upsert_rollups(db, increments)
    return len(expired)


def purge_rows(db: sqlite3.Connection, cutoff_ms: int, limit: int) -> int:
    """Delete up to `limit` of the oldest requests received before `cutoff_ms` (its own transaction)."""
    cursor = db.execute(
        "DELETE FROM outcomes WHERE id IN"
        " (SELECT id FROM outcomes WHERE received_at < ? ORDER BY received_at LIMIT ?)",
        (cutoff_ms, limit),
    )
    return cursor.rowcount


def purge_rollups(db: sqlite3.Connection, older_than: datetime) -> None:
    """Delete the counts of the hours and days that ended by `older_than`."""
    for rollup in Rollup:
        db.execute(
            f"DELETE FROM {rollup} WHERE start < ?",  # noqa: S608 - fixed table names
            (rollup.key(older_than),),
        )


# -- parts of a batch ------------------------------------------------------------------------------


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _first_answer_per_request(answers: Iterable[Answer]) -> list[Answer]:
    """A request has one final outcome: the first one recorded wins, as in the database."""
    first: dict[tuple[str, str, int], Answer] = {}
    for answer in answers:
        first.setdefault((answer.originator, answer.target, answer.counter), answer)
    return list(first.values())


def _resolve_parties(
    db: sqlite3.Connection, cached: Mapping[str, int], batch: Sequence[Entry]
) -> dict[str, int]:
    euis = batch_euis(batch)
    parties = {eui: cached[eui] for eui in euis if eui in cached}
    unknown = [eui for eui in euis if eui not in parties]
    if not unknown:
        return parties
    db.executemany(
        "INSERT INTO outcome_parties (eui) VALUES (?) ON CONFLICT (eui) DO NOTHING",
        [(eui,) for eui in unknown],
    )
    for chunk in _chunks(unknown, _SQL_PARAMS):
        marks = ",".join("?" * len(chunk))
        sql = f"SELECT eui, party_id FROM outcome_parties WHERE eui IN ({marks})"  # noqa: S608 - placeholders
        parties.update({str(eui): int(party) for eui, party in db.execute(sql, chunk)})
    return parties


def _apply_answers(db: sqlite3.Connection, answers: Sequence[Answer], parties: Mapping[str, int]) -> Answered:
    """Set the device outcome of requests still waiting."""
    db.execute(
        "CREATE TEMP TABLE IF NOT EXISTS outcome_answers (target_id INTEGER, counter INTEGER,"
        " originator_id INTEGER, outcome TEXT, code TEXT, answered_at INTEGER)"
    )
    db.execute("DELETE FROM temp.outcome_answers")
    db.executemany(
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
    return _update_returning(
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


def _update_returning(db: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> Answered:
    return [
        (CellKey(str(originator), role, srv, category), int(received), int(answered), str(outcome))
        for originator, role, srv, category, received, answered, outcome in db.execute(sql, params)
    ]


def _upsert_sql(rollup: Rollup) -> str:
    # The count columns are TALLY_COLUMNS, in order.
    keys = "start, originator, role, srv, category"
    updates = ",\n    ".join(f"{column} = {column} + excluded.{column}" for column in TALLY_COLUMNS)
    return (
        f"INSERT INTO {rollup} ({keys}, {', '.join(TALLY_COLUMNS)})\n"
        f"VALUES ({', '.join('?' * (5 + len(TALLY_COLUMNS)))})\n"
        f"ON CONFLICT ({keys}) DO UPDATE SET\n    {updates}\n"
    )


def _upsert_rollups(db: sqlite3.Connection, hourly: Mapping[tuple[str, CellKey], Tally]) -> None:
    for rollup, rows in rollup_rows(hourly):
        db.executemany(_upsert_sql(rollup), rows)
