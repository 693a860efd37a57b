"""The report as plain data, computed from outcome counts and inventory facts: no I/O, no clock.

MP169: a request refused because the consumer chose reduced communications (E169) is an exception,
not a failure. Success rate = succeeded / (forwarded requests with a final device outcome); those
exceptions never enter the denominator and their number is shown beside every rate. A commissioned
SMETS2 meter with reduced communications counts as installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from gateway.outcomes.schema import OutcomeRecord, Rollup
from gateway.outcomes.tally import CellKey, Tally

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

# Periods up to MINUTELY_UP_TO are charted per minute (read from the rows: the count tables are
# hourly), up to HOURLY_UP_TO per hour, longer ones per day: never more than about 120 points.
MINUTELY_UP_TO = timedelta(hours=2)
HOURLY_UP_TO = timedelta(days=2)


class Granularity(StrEnum):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"

    @property
    def step(self) -> timedelta:
        return _STEPS[self]


_STEPS = {
    Granularity.MINUTE: timedelta(minutes=1),
    Granularity.HOUR: timedelta(hours=1),
    Granularity.DAY: timedelta(days=1),
}


@dataclass(frozen=True, slots=True)
class Period:
    """Requests received in [since, until)."""

    since: datetime
    until: datetime

    @property
    def granularity(self) -> Granularity:
        length = self.until - self.since
        if length <= MINUTELY_UP_TO:
            return Granularity.MINUTE
        return Granularity.HOUR if length <= HOURLY_UP_TO else Granularity.DAY


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
    if granularity is Granularity.MINUTE:
        return at.replace(second=0, microsecond=0)
    if granularity is Granularity.HOUR:
        return at.replace(minute=0, second=0, microsecond=0)
    return datetime.combine(at.date(), time(), UTC)


def bucket_end(at: datetime, granularity: Granularity) -> datetime:
    """The end of the bucket holding `at`: `at` itself when a bucket starts there."""
    start = bucket_start(at, granularity)
    return start if start == at else start + granularity.step


@dataclass(frozen=True, slots=True)
class Read:
    """Part of a period and where its figures come from: a count table, or the rows (None)."""

    rollup: Rollup | None
    since: datetime
    until: datetime


def plan_reads(period: Period) -> tuple[Read, ...]:
    """Whole hours from outcome_hourly, whole days of a daily-charted period from outcome_daily, rows
    only for the partial hours at either end: a year's report reads about as much as a day's. A
    period charted per minute (two hours at most) is read from the rows."""
    since, until = period.since.astimezone(UTC), period.until.astimezone(UTC)
    first_hour, end_hour = bucket_end(since, Granularity.HOUR), bucket_start(until, Granularity.HOUR)
    if first_hour >= end_hour or period.granularity is Granularity.MINUTE:
        return (Read(None, since, until),)
    first_day, end_day = bucket_end(first_hour, Granularity.DAY), bucket_start(end_hour, Granularity.DAY)
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
    """One point per minute, hour or day of the period (empty ones included: the x axis is time)."""
    granularity = period.granularity
    step = granularity.step
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
