"""Loading a report: the queries over the outcome database and the inventory, then `build_report`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.outcomes.queries import has_outcome_tables, read_records, read_rollup_cells, read_rollup_totals
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
from gateway.store import connect

if TYPE_CHECKING:
    from datetime import datetime
    from pathlib import Path

    import aiosqlite


async def read_installed_meters(db: aiosqlite.Connection) -> list[InstalledMeters]:
    """Commissioned SMETS2 ESMEs and GSMEs from the inventory, with whether each is flagged."""
    async with db.execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('devices', 'flags')"
    ) as cursor:
        row = await cursor.fetchone()
    if row is None or row[0] < 2:
        return []
    async with db.execute(
        "SELECT d.device_type, d.import_supplier, d.gas_supplier, f.device_id IS NOT NULL, count(*)"
        " FROM devices AS d LEFT JOIN flags AS f ON f.device_id = d.device_id"
        " WHERE d.smets = 2 AND d.status = 'Commissioned' AND d.device_type IN ('ESME', 'GSME')"
        " GROUP BY 1, 2, 3, 4"
    ) as cursor:
        return [
            InstalledMeters(str(kind), imp, gas, bool(flagged), int(count))
            async for kind, imp, gas, flagged, count in cursor
        ]


async def query_report(
    db: aiosqlite.Connection,
    period: Period,
    *,
    target_response_seconds: float,
    generated_at: datetime,
    store: aiosqlite.Connection | None = None,
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
    path: Path,
    period: Period,
    *,
    target_response_seconds: float,
    generated_at: datetime,
    store: Path | None = None,
) -> Report:
    """Open the outcome database (and the flag store, when it is another file) read-only and build the
    report of `period`."""
    db = await connect(path, read_only=True)
    store_db = await connect(store, read_only=True) if store is not None else None
    try:
        return await query_report(
            db,
            period,
            target_response_seconds=target_response_seconds,
            generated_at=generated_at,
            store=store_db,
        )
    finally:
        await db.close()
        if store_db is not None:
            await store_db.close()
