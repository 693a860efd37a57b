"""Reading the outcome database (for reports): the records of a period and the count tables."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.outcomes.schema import (
    COMPONENT,
    MIGRATIONS,
    OutcomeRecord,
    Rollup,
    from_ms,
    to_ms,
    unsigned_counter,
)
from gateway.outcomes.tally import TALLY_COLUMNS, CellKey, Tally

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime

    import aiosqlite


class OutcomeSchemaError(Exception):
    """The outcome database's schema is older than this reader's (it is read-only: it cannot migrate)."""


async def has_outcome_tables(db: aiosqlite.Connection) -> bool:
    """Whether `db` holds outcomes; OutcomeSchemaError if it holds them in an older schema."""
    async with db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outcome_hourly'"
    ) as cur:
        if await cur.fetchone() is None:
            return False
    async with db.execute(
        "SELECT coalesce(max(version), 0) FROM schema_migrations WHERE component = ?", (COMPONENT,)
    ) as cur:
        row = await cur.fetchone()
    version = 0 if row is None else int(row[0])
    if version < len(MIGRATIONS):
        raise OutcomeSchemaError(
            f"the outcome database is at schema version {version}, this report needs {len(MIGRATIONS)}: "
            "start the gateway (`mp169 run`) once to migrate it"
        )
    return True


async def recorded_extent(
    db: aiosqlite.Connection, since: datetime, until: datetime
) -> tuple[datetime, datetime] | None:
    """The first and last arrival of the requests received in [since, until), if any."""
    async with db.execute(
        "SELECT min(received_at), max(received_at) FROM outcomes WHERE received_at >= ? AND received_at < ?",
        (to_ms(since), to_ms(until)),
    ) as cursor:
        row = await cursor.fetchone()
    if row is None or row[0] is None:
        return None
    return from_ms(int(row[0])), from_ms(int(row[1]))


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
