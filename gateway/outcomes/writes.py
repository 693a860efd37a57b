"""The recorder's SQL: one blocking function per transaction, run in the recorder's worker thread.

Everything a batch costs in Python (splitting it, resolving EUIs to ids, building the rows and the
count increments) happens here, in the worker thread, not on the event loop that routes requests.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

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
    decisions = [e for e in batch if isinstance(e, Decision)]
    all_answers = [e for e in batch if isinstance(e, Answer)]
    answers = _first_answer_per_request(all_answers)
    unmatched = 0
    with _transaction(db):
        ids = _resolve_parties(db, parties, batch)
        db.executemany(
            "INSERT INTO outcomes (originator_id, target_id, counter, role, srv, category,"
            " command_variant, received_at, decision, response_code, reason, flagged)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
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
                    int(d.flagged),
                )
                for d in decisions
            ],
        )
        increments: Increments = {}
        add_decision_increments(
            increments,
            (
                (CellKey(d.originator, d.role, d.srv, d.category), d.received_ms, d.decision, d.response_code)
                for d in decisions
            ),
        )
        if answers:
            answered = _apply_answers(db, answers, ids)
            unmatched = len(all_answers) - len(answered)
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
    euis = {e.originator for e in batch} | {e.target for e in batch}
    parties = {eui: cached[eui] for eui in euis if eui in cached}
    unknown = sorted(euis - parties.keys())
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
    for rollup, increments in ((Rollup.HOURLY, hourly), (Rollup.DAILY, daily_increments(hourly))):
        if increments:
            db.executemany(
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
