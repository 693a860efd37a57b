"""`mp169 report`: Service Request outcomes and supplier installation figures, MP169-aware.

MP169: a request refused because the consumer chose reduced communications (E169) is an exception,
not a failure. Success rate = succeeded / (forwarded requests with a final device outcome); those
exceptions never enter the denominator and their number is shown beside every rate. A commissioned
SMETS2 meter with reduced communications counts as installed.

Layout: pure computations over outcome counts (`build_report` and the functions it uses), the
queries that read them (`load_report`), and the renderers (rich table, CSV, JSON, a self-contained
HTML page with inline SVG charts, and `short_report` for the demo and replay summaries).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from enum import StrEnum
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from gateway.config import ConfigError, load_settings
from gateway.outcomes import (
    CellKey,
    OutcomeRecord,
    Rollup,
    Tally,
    has_outcome_tables,
    read_records,
    read_rollup_cells,
    read_rollup_totals,
)
from gateway.store import connect
from rules.domain import utc_now

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    import aiosqlite

# Periods up to this long are charted per hour, longer ones per day.
HOURLY_UP_TO = timedelta(days=2)
_DAY = timedelta(days=1)
_HOUR = timedelta(hours=1)


class Granularity(StrEnum):
    HOUR = "hour"
    DAY = "day"


@dataclass(frozen=True, slots=True)
class Period:
    """Requests received in [since, until)."""

    since: datetime
    until: datetime

    @property
    def granularity(self) -> Granularity:
        return Granularity.HOUR if self.until - self.since <= HOURLY_UP_TO else Granularity.DAY


@dataclass(frozen=True, slots=True)
class GroupRow:
    keys: tuple[str | None, ...]
    tally: Tally


@dataclass(frozen=True, slots=True)
class GroupSection:
    name: str
    title: str
    key_columns: tuple[str, ...]
    rows: tuple[GroupRow, ...]


@dataclass(frozen=True, slots=True)
class InstallationRow:
    """Commissioned SMETS2 meters of one responsible supplier and device type."""

    supplier: str | None
    device_type: str
    communicating_normally: int
    reduced_communications: int
    """Flagged: communications reduced due to consumer choice. Installed all the same."""

    @property
    def installed(self) -> int:
        return self.communicating_normally + self.reduced_communications


@dataclass(frozen=True, slots=True)
class TimelinePoint:
    start: datetime
    tally: Tally


@dataclass(frozen=True, slots=True)
class Report:
    period: Period
    target_response_seconds: float
    generated_at: datetime
    totals: Tally
    groups: tuple[GroupSection, ...]
    installation: tuple[InstallationRow, ...]
    timeline: tuple[TimelinePoint, ...]

    @property
    def granularity(self) -> Granularity:
        return self.period.granularity

    def group(self, name: str) -> GroupSection:
        return next(section for section in self.groups if section.name == name)

    @property
    def installed(self) -> InstallationRow:
        """All suppliers and device types together."""
        return InstallationRow(
            supplier=None,
            device_type="all",
            communicating_normally=sum(r.communicating_normally for r in self.installation),
            reduced_communications=sum(r.reduced_communications for r in self.installation),
        )


@dataclass(frozen=True, slots=True)
class InstalledMeters:
    """A count of commissioned SMETS2 meters sharing these facts, as read from the inventory."""

    device_type: str
    import_supplier: str | None
    gas_supplier: str | None
    flagged: bool
    count: int


# -- pure computations -------------------------------------------------------------------------------


def cells_from_records(
    records: Iterable[OutcomeRecord], target_response_seconds: float
) -> dict[CellKey, Tally]:
    cells: dict[CellKey, Tally] = {}
    for record in records:
        key = CellKey(record.originator, record.role, record.srv, record.category)
        cells[key] = cells.get(key, Tally()) + Tally.of_record(record, target_response_seconds)
    return cells


def merge_cells(*parts: Iterable[tuple[CellKey, Tally]]) -> dict[CellKey, Tally]:
    cells: dict[CellKey, Tally] = {}
    for part in parts:
        for key, tally in part:
            cells[key] = cells.get(key, Tally()) + tally
    return cells


def _srv_order(srv: str | None) -> tuple[int, tuple[int | str, ...]]:
    if srv is None:
        return (1, ())
    return (0, tuple(int(p) if p.isdigit() else p for p in srv.split(".")))


def _text_order(value: str | None) -> tuple[int, str]:
    return (1, "") if value is None else (0, value)


def group_sections(cells: Mapping[CellKey, Tally]) -> tuple[GroupSection, ...]:
    """Per SRV category, per SRV, per user role and per user."""

    def section(
        name: str,
        title: str,
        columns: tuple[str, ...],
        key_of: Callable[[CellKey], tuple[str | None, ...]],
        order: Callable[[tuple[str | None, ...]], Any],
    ) -> GroupSection:
        groups: dict[tuple[str | None, ...], Tally] = {}
        for cell, tally in cells.items():
            key = key_of(cell)
            groups[key] = groups.get(key, Tally()) + tally
        rows = tuple(GroupRow(key, groups[key]) for key in sorted(groups, key=order))
        return GroupSection(name, title, columns, rows)

    return (
        section(
            "by_category",
            "By SRV category",
            ("category",),
            lambda c: (c.category,),
            lambda k: _text_order(k[0]),
        ),
        section(
            "by_srv",
            "By SRV",
            ("srv", "category"),
            lambda c: (c.srv, c.category),
            lambda k: (_srv_order(k[0]), _text_order(k[1])),
        ),
        section("by_role", "By user role", ("role",), lambda c: (c.role,), lambda k: _text_order(k[0])),
        section("by_user", "By user", ("user",), lambda c: (c.originator,), lambda k: _text_order(k[0])),
    )


def installation_rows(meters: Iterable[InstalledMeters]) -> tuple[InstallationRow, ...]:
    """Per responsible supplier (import supplier of an ESME, gas supplier of a GSME) and device type."""
    counts: dict[tuple[str | None, str], tuple[int, int]] = {}
    for m in meters:
        supplier = m.import_supplier if m.device_type == "ESME" else m.gas_supplier
        normal, reduced = counts.get((supplier, m.device_type), (0, 0))
        if m.flagged:
            reduced += m.count
        else:
            normal += m.count
        counts[supplier, m.device_type] = (normal, reduced)
    return tuple(
        InstallationRow(supplier, device_type, normal, reduced)
        for (supplier, device_type), (normal, reduced) in sorted(
            counts.items(), key=lambda item: (_text_order(item[0][0]), item[0][1])
        )
    )


def bucket_start(at: datetime, granularity: Granularity) -> datetime:
    at = at.astimezone(UTC)
    if granularity is Granularity.HOUR:
        return at.replace(minute=0, second=0, microsecond=0)
    return datetime.combine(at.date(), time(), UTC)


def _ceil(at: datetime, granularity: Granularity) -> datetime:
    start = bucket_start(at, granularity)
    return start if start == at else start + (_HOUR if granularity is Granularity.HOUR else _DAY)


@dataclass(frozen=True, slots=True)
class Read:
    """Part of a period and where its figures come from: a count table, or the rows (None)."""

    rollup: Rollup | None
    since: datetime
    until: datetime


def plan_reads(period: Period) -> tuple[Read, ...]:
    """Whole hours from outcome_hourly, whole days of a daily-charted period from outcome_daily, rows
    only for the partial hours at either end: a year's report reads about as much as a day's."""
    since, until = period.since.astimezone(UTC), period.until.astimezone(UTC)
    first_hour, end_hour = _ceil(since, Granularity.HOUR), bucket_start(until, Granularity.HOUR)
    if first_hour >= end_hour:
        return (Read(None, since, until),)
    first_day, end_day = _ceil(first_hour, Granularity.DAY), bucket_start(end_hour, Granularity.DAY)
    if period.granularity is Granularity.DAY and first_day < end_day:
        middle = [
            Read(Rollup.HOURLY, first_hour, first_day),
            Read(Rollup.DAILY, first_day, end_day),
            Read(Rollup.HOURLY, end_day, end_hour),
        ]
    else:
        middle = [Read(Rollup.HOURLY, first_hour, end_hour)]
    reads = [Read(None, since, first_hour), *middle, Read(None, end_hour, until)]
    return tuple(read for read in reads if read.since < read.until)


def timeline(period: Period, dated: Iterable[tuple[datetime, Tally]]) -> tuple[TimelinePoint, ...]:
    """One point per hour or day of the period (empty ones included, so the chart's x axis is time)."""
    granularity = period.granularity
    step = _HOUR if granularity is Granularity.HOUR else _DAY
    buckets: dict[datetime, Tally] = {}
    start = bucket_start(period.since, granularity)
    while start < period.until:
        buckets[start] = Tally()
        start += step
    for at, tally in dated:
        key = bucket_start(at, granularity)
        buckets[key] = buckets.get(key, Tally()) + tally
    return tuple(TimelinePoint(start, buckets[start]) for start in sorted(buckets))


def build_report(  # noqa: PLR0913 - the report's parts, each computed elsewhere
    *,
    period: Period,
    cells: Mapping[CellKey, Tally],
    dated: Iterable[tuple[datetime, Tally]],
    meters: Iterable[InstalledMeters],
    target_response_seconds: float,
    generated_at: datetime,
) -> Report:
    return Report(
        period=period,
        target_response_seconds=target_response_seconds,
        generated_at=generated_at,
        totals=Tally.total(cells.values()),
        groups=group_sections(cells),
        installation=installation_rows(meters),
        timeline=timeline(period, dated),
    )


def report_from_records(
    period: Period,
    records: Sequence[OutcomeRecord],
    meters: Iterable[InstalledMeters],
    *,
    target_response_seconds: float,
    generated_at: datetime,
) -> Report:
    """The report of requests received in the period, straight from their records."""
    inside = [r for r in records if period.since <= r.received_at < period.until]
    return build_report(
        period=period,
        cells=cells_from_records(inside, target_response_seconds),
        dated=((r.received_at, Tally.of_record(r, target_response_seconds)) for r in inside),
        meters=meters,
        target_response_seconds=target_response_seconds,
        generated_at=generated_at,
    )


# -- queries ---------------------------------------------------------------------------------------


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


# -- rendering -------------------------------------------------------------------------------------

# Every group row's figures, in this order, in every format.
GROUP_COLUMNS: tuple[str, ...] = (
    "requests",
    "forwarded",
    "succeeded",
    "failed",
    "timed_out",
    "pending",
    "rejected",
    "handled_locally",
    "success_rate",
    "refused_consumer_choice",
    "within_target_share",
)
INSTALLATION_COLUMNS: tuple[str, ...] = (
    "supplier",
    "device_type",
    "installed",
    "communicating_normally",
    "reduced_communications",
)
TIMELINE_COLUMNS: tuple[str, ...] = (
    "start",
    "final",
    "succeeded",
    "refused_consumer_choice",
    "success_rate",
    "success_rate_counting_exceptions",
)
_HEADINGS = {
    "requests": "Requests",
    "forwarded": "Fwd",
    "succeeded": "OK",
    "failed": "Failed",
    "timed_out": "Timeout",
    "pending": "Pending",
    "rejected": "Rejected",
    "handled_locally": "Local",
    "success_rate": "Success",
    "refused_consumer_choice": "Excluded",
    "within_target_share": "In time",
    "category": "Category",
    "srv": "SRV",
    "role": "Role",
    "user": "User",
}
_LEGEND = (
    "Success = OK / (OK + Failed + Timeout), over forwarded requests with a device outcome. Excluded = "
    "refused for consumer choice (MP169 exceptions, E169): not failures, left out of Success and In time. "
    "In time = the device answered within {target:g} s. Rejected = invalid or unauthorised."
)


def _rate(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _figures(tally: Tally) -> dict[str, int | float | None]:
    return {
        "requests": tally.requests,
        "forwarded": tally.forwarded,
        "succeeded": tally.succeeded,
        "failed": tally.failed,
        "timed_out": tally.timed_out,
        "pending": tally.pending,
        "rejected": tally.rejected,
        "handled_locally": tally.handled_locally,
        "success_rate": _rate(tally.success_rate),
        "refused_consumer_choice": tally.refused_consumer_choice,
        "within_target_share": _rate(tally.within_target_share),
    }


def _installation_figures(row: InstallationRow) -> dict[str, str | int | None]:
    return {
        "supplier": row.supplier,
        "device_type": row.device_type,
        "installed": row.installed,
        "communicating_normally": row.communicating_normally,
        "reduced_communications": row.reduced_communications,
    }


def _timeline_figures(point: TimelinePoint) -> dict[str, str | int | float | None]:
    return {
        "start": _iso(point.start),
        "final": point.tally.final,
        "succeeded": point.tally.succeeded,
        "refused_consumer_choice": point.tally.refused_consumer_choice,
        "success_rate": _rate(point.tally.success_rate),
        "success_rate_counting_exceptions": _rate(point.tally.success_rate_counting_exceptions),
    }


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def report_json(report: Report) -> dict[str, Any]:
    """One object: the period, then one member per section."""
    document: dict[str, Any] = {
        "period": {
            "since": _iso(report.period.since),
            "until": _iso(report.period.until),
            "granularity": report.granularity.value,
            "target_response_seconds": report.target_response_seconds,
            "generated_at": _iso(report.generated_at),
        },
        "totals": _figures(report.totals),
    }
    for section in report.groups:
        document[section.name] = [
            dict(zip(section.key_columns, row.keys, strict=True)) | _figures(row.tally)
            for row in section.rows
        ]
    document["installation"] = [_installation_figures(row) for row in report.installation]
    document["timeline"] = [_timeline_figures(point) for point in report.timeline]
    return document


def render_json(report: Report) -> str:
    return json.dumps(report_json(report), indent=2) + "\n"


def render_csv(report: Report) -> str:
    """Sections one after another: a `# name` line, a header row, the rows, a blank line."""
    document = report_json(report)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    sections: list[tuple[str, list[dict[str, Any]]]] = [
        ("period", [document["period"]]),
        ("totals", [document["totals"]]),
        *((section.name, document[section.name]) for section in report.groups),
        ("installation", document["installation"]),
        ("timeline", document["timeline"]),
    ]
    columns = {
        "period": list(document["period"]),
        "totals": list(GROUP_COLUMNS),
        "installation": list(INSTALLATION_COLUMNS),
        "timeline": list(TIMELINE_COLUMNS),
    } | {section.name: [*section.key_columns, *GROUP_COLUMNS] for section in report.groups}
    for index, (name, rows) in enumerate(sections):
        if index:
            writer.writerow([])
        writer.writerow([f"# {name}"])
        writer.writerow(columns[name])
        for row in rows:
            writer.writerow(["" if row[column] is None else row[column] for column in columns[name]])
    return out.getvalue()


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _cell_text(column: str, value: object) -> str:
    if value is None:
        return "-"
    if column.endswith(("_rate", "_share")):
        return _percent(value)  # type: ignore[arg-type]
    return f"{value:,}" if isinstance(value, int) else str(value)


def render_table(report: Report, console: Console) -> None:
    """Rich terminal tables, one per section."""
    since, until = _iso(report.period.since), _iso(report.period.until)
    console.print(f"[bold]MP169 Service Request outcomes[/bold]  {since} to {until}")
    headings = [_HEADINGS[c] for c in GROUP_COLUMNS]
    totals = Table(title="All Service Requests", title_justify="left")
    for heading in headings:
        totals.add_column(heading, justify="right")
    figures = _figures(report.totals)
    totals.add_row(*(_cell_text(c, figures[c]) for c in GROUP_COLUMNS))
    console.print(totals)
    for section in report.groups:
        table = Table(title=section.title, title_justify="left")
        for column in section.key_columns:
            table.add_column(_HEADINGS[column])
        for heading in headings:
            table.add_column(heading, justify="right")
        for row in section.rows:
            figures = _figures(row.tally)
            table.add_row(
                *(_cell_text(c, k) for c, k in zip(section.key_columns, row.keys, strict=True)),
                *(_cell_text(c, figures[c]) for c in GROUP_COLUMNS),
            )
        console.print(table)
    console.print(_LEGEND.format(target=report.target_response_seconds), style="dim")
    installation = Table(
        title="Installed SMETS2 meters (Commissioned) per responsible supplier", title_justify="left"
    )
    for heading in ("Supplier", "Type", "Installed", "Communicating", "Reduced comms (consumer choice)"):
        installation.add_column(heading, justify="left" if heading in {"Supplier", "Type"} else "right")
    for meters in report.installation:
        installation.add_row(
            meters.supplier or "-",
            meters.device_type,
            f"{meters.installed:,}",
            f"{meters.communicating_normally:,}",
            f"{meters.reduced_communications:,}",
        )
    total = report.installed
    installation.add_row(
        "Total",
        "",
        f"{total.installed:,}",
        f"{total.communicating_normally:,}",
        f"{total.reduced_communications:,}",
        style="bold",
    )
    console.print(installation)


def short_report(report: Report) -> str:
    """A few lines for the end of `mp169 demo` and the replay summary."""
    t = report.totals
    installed = report.installed
    requests = (
        f"Service Requests: {t.requests:,} ({t.forwarded:,} forwarded: {t.succeeded:,} succeeded, "
        f"{t.failed:,} failed, {t.timed_out:,} timed out, {t.pending:,} pending; "
        f"{t.refused_consumer_choice:,} refused for consumer choice; {t.rejected:,} rejected; "
        f"{t.handled_locally:,} handled locally)"
    )
    rates = (
        f"Success rate {_percent(t.success_rate)} of {t.final:,} device outcomes, "
        f"{t.refused_consumer_choice:,} consumer-choice exceptions excluded; "
        f"within {report.target_response_seconds:g} s: {_percent(t.within_target_share)}"
    )
    meters = (
        f"Installed SMETS2 meters: {installed.installed:,} ({installed.communicating_normally:,} "
        f"communicating normally, {installed.reduced_communications:,} with reduced communications by "
        "consumer choice)"
    )
    return f"{requests}\n{rates}\n{meters}"


# -- HTML ------------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2933;
       margin: 24px auto; max-width: 1120px; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.period { color: #52606d; margin: 0 0 16px; }
.tiles { display: flex; gap: 12px; flex-wrap: wrap; }
.tile { border: 1px solid #d9e2ec; border-radius: 6px; padding: 10px 14px; min-width: 170px; }
.tile .value { font-size: 22px; font-weight: 600; } .tile .label { color: #52606d; font-size: 12px; }
svg.chart { border: 1px solid #d9e2ec; border-radius: 6px; background: #fff; }
svg text { font: 11px system-ui, sans-serif; fill: #3e4c59; }
.axis line, .axis path { stroke: #9aa5b1; } .grid line { stroke: #e4e7eb; }
.series-mp169 { stroke: #1769aa; fill: none; stroke-width: 2; }
.series-counting-exceptions { stroke: #d9822b; fill: none; stroke-width: 2; stroke-dasharray: 5 3; }
circle.point-mp169 { fill: #1769aa; } circle.point-counting-exceptions { fill: #d9822b; }
rect.bar { fill: #b44d12; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
th, td { border-bottom: 1px solid #e4e7eb; padding: 3px 8px; text-align: right; }
th { background: #f5f7fa; } td.key, th.key { text-align: left; }
.legend { color: #52606d; font-size: 12px; max-width: 900px; }
"""

_CHART_WIDTH = 1060
_LINE_HEIGHT = 300
_MARGIN_LEFT = 56
_MARGIN_RIGHT = 20
_MARGIN_TOP = 36
_MARGIN_BOTTOM = 40
_BAR_HEIGHT = 22
_BAR_LABEL_WIDTH = 170


def _fmt(value: float) -> str:
    return f"{value:.1f}"


def success_rate_svg(report: Report) -> str:
    """Success rate per bucket: MP169 (exceptions excluded), and as if refusals were failures."""
    points = report.timeline
    series: tuple[tuple[str, str, Callable[[Tally], float | None]], ...] = (
        ("mp169", "MP169: consumer-choice exceptions excluded", lambda t: t.success_rate),
        (
            "counting-exceptions",
            "If refusals counted as failures",
            lambda t: t.success_rate_counting_exceptions,
        ),
    )
    rates = [r for _, _, rate_of in series for p in points if (r := rate_of(p.tally)) is not None]
    # Zoom the y axis (in 5% steps) to the data: rates near 100% would otherwise look identical.
    floor = max(0.0, math.floor((min(rates, default=0.0) - 0.02) * 20) / 20)
    plot_w = _CHART_WIDTH - _MARGIN_LEFT - _MARGIN_RIGHT
    plot_h = _LINE_HEIGHT - _MARGIN_TOP - _MARGIN_BOTTOM
    slots = max(len(points), 1)

    def x(index: int) -> float:
        return _MARGIN_LEFT + plot_w * (index + 0.5) / slots

    def y(rate: float) -> float:
        return _MARGIN_TOP + plot_h * (1 - (rate - floor) / (1 - floor))

    parts = [
        (
            f'<svg id="chart-success-rate" class="chart line-chart" xmlns="http://www.w3.org/2000/svg" '
            f'width="{_CHART_WIDTH}" height="{_LINE_HEIGHT}" viewBox="0 0 {_CHART_WIDTH} {_LINE_HEIGHT}" '
            f'role="img" aria-label="Success rate per {report.granularity.value}">'
        ),
        '<g class="grid">',
    ]
    for step in range(5):
        tick = floor + (1 - floor) * step / 4
        parts.append(
            f'<line x1="{_MARGIN_LEFT}" x2="{_CHART_WIDTH - _MARGIN_RIGHT}" y1="{_fmt(y(tick))}" '
            f'y2="{_fmt(y(tick))}"/><text x="{_MARGIN_LEFT - 6}" y="{_fmt(y(tick) + 4)}" '
            f'text-anchor="end">{tick * 100:.4g}%</text>'
        )
    parts.append("</g>")
    label_every = max(1, len(points) // 12)
    parts.append('<g class="axis x-axis">')
    for index, point in enumerate(points):
        if index % label_every == 0:
            label = point.start.strftime("%H:%M" if report.granularity is Granularity.HOUR else "%d %b")
            parts.append(
                f'<text x="{_fmt(x(index))}" y="{_LINE_HEIGHT - _MARGIN_BOTTOM + 16}" '
                f'text-anchor="middle">{escape(label)}</text>'
            )
    parts.append("</g>")
    for legend_index, (name, label, rate_of) in enumerate(series):
        located = [(i, p, rate_of(p.tally)) for i, p in enumerate(points)]
        present = [(i, p, r) for i, p, r in located if r is not None]
        coords = " ".join(f"{_fmt(x(i))},{_fmt(y(r))}" for i, _, r in present)
        parts.append(f'<polyline id="series-{name}" class="series series-{name}" points="{coords}"/>')
        parts.extend(
            f'<circle class="point point-{name}" cx="{_fmt(x(i))}" cy="{_fmt(y(r))}" r="3" '
            f'data-bucket="{_iso(p.start)}" data-rate="{r:.4f}"><title>{escape(_iso(p.start))}: '
            f"{r * 100:.1f}%</title></circle>"
            for i, p, r in present
        )
        lx = _MARGIN_LEFT + legend_index * 330
        parts.append(
            f'<g class="legend-item" id="legend-{name}"><line class="series-{name}" x1="{lx}" '
            f'x2="{lx + 24}" y1="16" y2="16"/><text x="{lx + 30}" y="20">{escape(label)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def refusals_svg(report: Report) -> str:
    """Horizontal bars: requests refused for consumer choice per SRV category."""
    bars = [
        (row.keys[0] or "unknown", row.tally.refused_consumer_choice)
        for row in report.group("by_category").rows
        if row.tally.refused_consumer_choice
    ]
    height = _MARGIN_TOP + max(len(bars), 1) * (_BAR_HEIGHT + 8) + 12
    width = _CHART_WIDTH
    parts = [
        (
            f'<svg id="chart-refusals" class="chart bar-chart" xmlns="http://www.w3.org/2000/svg" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            'aria-label="Requests refused for consumer choice by SRV category">'
        ),
        f'<text x="{_MARGIN_LEFT}" y="20">Requests refused for consumer choice (E169) by SRV category</text>',
    ]
    if not bars:
        parts.append(
            f'<text id="chart-refusals-empty" x="{_MARGIN_LEFT}" y="{_MARGIN_TOP + 16}">'
            "No request was refused for consumer choice in this period.</text>"
        )
    top = max((value for _, value in bars), default=1)
    span = width - _BAR_LABEL_WIDTH - 90
    for index, (category, value) in enumerate(bars):
        y = _MARGIN_TOP + index * (_BAR_HEIGHT + 8)
        bar_w = span * value / top
        parts.append(
            f'<text x="{_BAR_LABEL_WIDTH - 8}" y="{y + 15}" text-anchor="end">{escape(category)}</text>'
            f'<rect class="bar" id="bar-{escape(category)}" data-category="{escape(category)}" '
            f'data-value="{value}" x="{_BAR_LABEL_WIDTH}" y="{y}" width="{_fmt(bar_w)}" '
            f'height="{_BAR_HEIGHT}">'
            f"<title>{escape(category)}: {value}</title></rect>"
            f'<text class="bar-value" x="{_fmt(_BAR_LABEL_WIDTH + bar_w + 6)}" y="{y + 15}">{value:,}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _html_table(table_id: str, columns: Sequence[str], keys: int, rows: Iterable[Sequence[object]]) -> str:
    head = "".join(
        f'<th class="{"key" if i < keys else "figure"}">{escape(_HEADINGS.get(c, c))}</th>'
        for i, c in enumerate(columns)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"key" if i < keys else "figure"}">{escape(_cell_text(c, v))}</td>'
            for i, (c, v) in enumerate(zip(columns, row, strict=True))
        )
        + "</tr>"
        for row in rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def render_html(report: Report) -> str:
    """A self-contained page: inline CSS and SVG, no script, nothing fetched."""
    t = report.totals
    installed = report.installed
    tiles = (
        ("tile-success-rate", _percent(t.success_rate), "Success rate (MP169, exceptions excluded)"),
        ("tile-excluded", f"{t.refused_consumer_choice:,}", "Refused for consumer choice (excluded)"),
        (
            "tile-within-target",
            _percent(t.within_target_share),
            f"Answered within {report.target_response_seconds:g} s",
        ),
        ("tile-requests", f"{t.requests:,}", "Service Requests"),
        (
            "tile-installed",
            f"{installed.installed:,}",
            f"Installed meters ({installed.reduced_communications:,} with reduced comms)",
        ),
    )
    sections = [
        f"<h2>{escape(section.title)}</h2>"
        + _html_table(
            f"table-{section.name}",
            [*section.key_columns, *GROUP_COLUMNS],
            len(section.key_columns),
            ([*row.keys, *(_figures(row.tally)[c] for c in GROUP_COLUMNS)] for row in section.rows),
        )
        for section in report.groups
    ]
    installation = _html_table(
        "table-installation",
        INSTALLATION_COLUMNS,
        2,
        ([_installation_figures(row)[c] for c in INSTALLATION_COLUMNS] for row in report.installation),
    )
    since, until = _iso(report.period.since), _iso(report.period.until)
    return "".join(
        (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            f"<title>MP169 report {escape(since)} to {escape(until)}</title>",
            f"<style>{_CSS}</style></head><body>",
            "<h1>MP169 Service Request outcomes</h1>",
            (
                f'<p class="period">{escape(since)} to {escape(until)}, per {report.granularity.value}; '
                f"generated {escape(_iso(report.generated_at))}</p>"
            ),
            '<div class="tiles">',
            *(
                (
                    f'<div class="tile" id="{tid}"><div class="value">{escape(value)}</div>'
                    f'<div class="label">{escape(label)}</div></div>'
                )
                for tid, value, label in tiles
            ),
            "</div>",
            f"<h2>Success rate per {report.granularity.value}</h2>",
            success_rate_svg(report),
            "<h2>Refusals for consumer choice</h2>",
            refusals_svg(report),
            f'<p class="legend">{escape(_LEGEND.format(target=report.target_response_seconds))}</p>',
            *sections,
            "<h2>Installed SMETS2 meters (Commissioned) per responsible supplier</h2>",
            installation,
            (
                '<p class="legend">Installed = communicating normally + reduced communications by consumer '
                "choice (MP169: a flagged meter is installed and commissioned).</p>"
            ),
            "</body></html>\n",
        )
    )


# -- command line ------------------------------------------------------------------------------------


def parse_time(text: str) -> datetime:
    """An ISO-8601 date or date-time; without an offset it is UTC."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 date or date-time: {text!r}") from exc
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "report",
        help="Service Request outcomes and installation figures (MP169-aware)",
        description="Report Service Request outcomes, with requests refused for consumer choice counted as "
        "exceptions (not failures), and installed meters per supplier, counting those with reduced "
        "communications as installed. Default period: the last day.",
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="configuration file (default ./config.toml)"
    )
    parser.add_argument(
        "--since", type=parse_time, default=None, help="start, ISO-8601 (default: until - 1 day)"
    )
    parser.add_argument(
        "--until", type=parse_time, default=None, help="end (exclusive), ISO-8601 (default: now)"
    )
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument(
        "--html", type=Path, default=None, metavar="FILE", help="also write a self-contained HTML page"
    )
    parser.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        sys.stderr.write(f"mp169 report: {exc}\n")
        return 2
    now = utc_now()
    until: datetime = args.until or now
    since: datetime = args.since or until - _DAY
    if since >= until:
        sys.stderr.write("mp169 report: --since must be before --until\n")
        return 2
    path = settings.outcomes_path
    if not path.exists():
        sys.stderr.write(
            f"mp169 report: no outcome database at {path} (outcomes.path): nothing recorded yet\n"
        )
        return 1
    report = asyncio.run(
        load_report(
            path,
            Period(since, until),
            target_response_seconds=settings.gateway.target_response_seconds,
            generated_at=now,
            store=store if (store := Path(settings.store.path)).exists() else None,
        )
    )
    if args.format == "json":
        sys.stdout.write(render_json(report))
    elif args.format == "csv":
        sys.stdout.write(render_csv(report))
    else:
        render_table(report, Console())
    if args.html is not None:
        args.html.write_text(render_html(report), encoding="utf-8")
        sys.stderr.write(f"mp169 report: wrote {args.html}\n")
    return 0
