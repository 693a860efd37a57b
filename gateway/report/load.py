"""Loading a report: the queries over the outcome database and the inventory, then `build_report`.

The same queries for either engine (gateway/outcomes/queries.py `Reader`): a SQLite gateway's outcome
file and store, or the PostgreSQL database that holds both for every instance."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from gateway.outcomes.queries import (
    has_outcome_tables,
    open_reader,
    read_records,
    read_rollup_cells,
    read_rollup_totals,
)
from gateway.outcomes.tally import CellKey, Tally
from gateway.report.compute import (
    InstalledMeters,
    Period,
    Report,
    build_report,
    cells_from_records,
    merge_cells,
    plan_reads,
)

if TYPE_CHECKING:
    from datetime import datetime

    from gateway.outcomes.queries import Location, Reader


async def read_installed_meters(db: Reader) -> list[InstalledMeters]:
    """Commissioned SMETS2 ESMEs and GSMEs from the inventory, with whether each is flagged."""
    if not await db.has_tables("devices", "flags"):
        return []
    rows = await db.fetch(
        "SELECT d.device_type, d.import_supplier, d.gas_supplier, f.device_id IS NOT NULL, count(*)"
        " FROM devices AS d LEFT JOIN flags AS f ON f.device_id = d.device_id"
        " WHERE d.smets = 2 AND d.status = 'Commissioned' AND d.device_type IN ('ESME', 'GSME')"
        " GROUP BY 1, 2, 3, 4"
    )
    return [
        InstalledMeters(str(kind), imp, gas, bool(flagged), int(count))
        for kind, imp, gas, flagged, count in rows
    ]


async def query_report(
    db: Reader,
    period: Period,
    *,
    target_response_seconds: float,
    generated_at: datetime,
    store: Reader | None = None,
) -> Report:
    """`db` holds the outcome records; `store` (default `db`) the inventory and the flags."""
    cells: dict[CellKey, Tally] = {}
    dated: list[tuple[datetime, Tally]] = []
    if await has_outcome_tables(db):
        for read in plan_reads(period):
            if read.rollup is None:
                records = await read_records(db, read.since, read.until)
                part = cells_from_records(records, target_response_seconds)
                dated.extend((r.received_at, Tally.of_record(r, target_response_seconds)) for r in records)
            else:
                part = await read_rollup_cells(db, read.rollup, read.since, read.until)
                dated.extend((await read_rollup_totals(db, read.rollup, read.since, read.until)).items())
            cells = merge_cells(cells.items(), part.items())
    return build_report(
        period=period,
        cells=cells,
        dated=dated,
        meters=await read_installed_meters(store or db),
        target_response_seconds=target_response_seconds,
        generated_at=generated_at,
    )


async def load_report(
    outcomes: Location,
    period: Period,
    *,
    target_response_seconds: float,
    generated_at: datetime,
    store: Location | None = None,
) -> Report:
    """Open the outcome database (and the store, when it is another one) read-only and build the report
    of `period`. A location is a SQLite path or a postgresql:// URL."""
    build = partial(
        query_report,
        period=period,
        target_response_seconds=target_response_seconds,
        generated_at=generated_at,
    )
    async with open_reader(outcomes) as db:
        if store is None:
            return await build(db)
        async with open_reader(store) as store_db:
            return await build(db, store=store_db)
