"""Reading the outcome database (for reports): the records of a period and the count tables.

One set of queries for both engines: a `Reader` runs a statement (written with `?` placeholders) on
SQLite (`SqliteReader`, read-only) or PostgreSQL (`PostgresReader`, a read-only session), and says
which tables exist; `open_reader` picks one by location, a path or a postgresql:// URL.
"""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

from gateway.outcomes.schema import (
    COMPONENT,
    MIGRATIONS,
    PG_MIGRATIONS,
    OutcomeRecord,
    Rollup,
    from_ms,
    to_ms,
    unsigned_counter,
)
from gateway.outcomes.tally import TALLY_COLUMNS, CellKey, Tally
from gateway.store import connect

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence
    from datetime import datetime

    import aiosqlite

Location = Path | str
"""A SQLite file, or a PostgreSQL database's postgresql:// URL."""


class Reader(ABC):
    """Statements on one read-only connection, whichever the engine."""

    migrations: Sequence[str]
    """The outcome migrations of this engine: a database at fewer versions is too old to read."""

    @abstractmethod
    async def fetch(self, sql: str, *args: object) -> list[Sequence[Any]]:
        """The rows of `sql`, its parameters written `?`."""

    @abstractmethod
    async def has_tables(self, *names: str) -> bool:
        """Whether every one of these tables exists."""


class SqliteReader(Reader):
    migrations = MIGRATIONS

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def fetch(self, sql: str, *args: object) -> list[Sequence[Any]]:
        async with self.db.execute(sql, args) as cursor:
            return list(await cursor.fetchall())

    async def has_tables(self, *names: str) -> bool:
        marks = ", ".join("?" * len(names))
        ((count,),) = await self.fetch(
            f"SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ({marks})",  # noqa: S608
            *names,
        )
        return int(count) == len(names)


_PLACEHOLDER = re.compile(r"\?")


class PostgresReader(Reader):
    migrations = PG_MIGRATIONS

    def __init__(self, db: asyncpg.Connection[Any]) -> None:
        self.db = db

    async def fetch(self, sql: str, *args: object) -> list[Sequence[Any]]:
        numbers = iter(range(1, len(args) + 1))
        return list(await self.db.fetch(_PLACEHOLDER.sub(lambda _: f"${next(numbers)}", sql), *args))

    async def has_tables(self, *names: str) -> bool:
        ((count,),) = await self.fetch(
            "SELECT count(*) FROM unnest(?::text[]) AS t(name) WHERE to_regclass(name) IS NOT NULL",
            list(names),
        )
        return int(count) == len(names)


def is_postgres(location: Location) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


@contextlib.asynccontextmanager
async def open_reader(location: Location) -> AsyncIterator[Reader]:
    """A read-only reader of a SQLite file or a PostgreSQL database."""
    if is_postgres(location):
        db = await asyncpg.connect(str(location), server_settings={"default_transaction_read_only": "on"})
        try:
            yield PostgresReader(db)
        finally:
            await db.close()
        return
    sqlite = await connect(Path(location), read_only=True)
    try:
        yield SqliteReader(sqlite)
    finally:
        await sqlite.close()


class OutcomeSchemaError(Exception):
    """The outcome database's schema is older than this reader's (it is read-only: it cannot migrate)."""


async def has_outcome_tables(db: Reader) -> bool:
    """Whether `db` holds outcomes; OutcomeSchemaError if it holds them in an older schema."""
    if not await db.has_tables("outcome_hourly"):
        return False
    ((version,),) = await db.fetch(
        "SELECT coalesce(max(version), 0) FROM schema_migrations WHERE component = ?", COMPONENT
    )
    if int(version) < len(db.migrations):
        raise OutcomeSchemaError(
            f"the outcome database is at schema version {version}, this report needs "
            f"{len(db.migrations)}: start the gateway (`mp169 run`) once to migrate it"
        )
    return True


async def recorded_extent(db: Reader, since: datetime, until: datetime) -> tuple[datetime, datetime] | None:
    """The first and last arrival of the requests received in [since, until), if any."""
    (row,) = await db.fetch(
        "SELECT min(received_at), max(received_at) FROM outcomes WHERE received_at >= ? AND received_at < ?",
        to_ms(since),
        to_ms(until),
    )
    if row[0] is None:
        return None
    return from_ms(int(row[0])), from_ms(int(row[1]))


async def read_records(db: Reader, since: datetime, until: datetime) -> list[OutcomeRecord]:
    """Requests received in [since, until), oldest first."""
    rows = await db.fetch(
        "SELECT op.eui, tp.eui, o.counter, o.role, o.srv, o.category, o.command_variant, o.received_at,"
        " o.decision, o.response_code, o.reason, o.device_outcome, o.device_response_code, o.answered_at,"
        " o.flagged"
        " FROM outcomes AS o"
        " JOIN outcome_parties AS op ON op.party_id = o.originator_id"
        " JOIN outcome_parties AS tp ON tp.party_id = o.target_id"
        " WHERE o.received_at >= ? AND o.received_at < ? ORDER BY o.received_at, o.id",
        to_ms(since),
        to_ms(until),
    )
    return [_record(row) for row in rows]


def _record(row: Sequence[Any]) -> OutcomeRecord:
    originator, target, counter, *middle, answered, flagged = row
    role, srv, category, command_variant, received, decision, code, reason, outcome, device_code = middle
    return OutcomeRecord(
        request_id=f"{originator}:{target}:{unsigned_counter(counter)}",
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
    db: Reader, rollup: Rollup, since: datetime, until: datetime
) -> dict[CellKey, Tally]:
    """Counts per user, role, SRV and category of the buckets starting in [since, until)."""
    rows = await db.fetch(
        f"SELECT originator, role, srv, category, {_SUMS} FROM {rollup}"  # noqa: S608 - fixed names
        " WHERE start >= ? AND start < ? GROUP BY originator, role, srv, category",
        rollup.key(since),
        rollup.key(until),
    )
    return {
        CellKey(str(row[0]), row[1] or None, row[2] or None, row[3] or None): Tally(*map(int, row[4:]))
        for row in rows
    }


async def read_rollup_totals(
    db: Reader, rollup: Rollup, since: datetime, until: datetime
) -> dict[datetime, Tally]:
    """Counts per bucket of the buckets starting in [since, until)."""
    rows = await db.fetch(
        f"SELECT start, {_SUMS} FROM {rollup} WHERE start >= ? AND start < ? GROUP BY start",  # noqa: S608
        rollup.key(since),
        rollup.key(until),
    )
    return {Rollup.start_of(row[0]): Tally(*map(int, row[1:])) for row in rows}
