"""Outcome recording and reporting at scale: recorder throughput, file size, report query times.

Synthetic traffic for an estate of smart meters (default 100,000, 2 Service Requests per meter per
day, some meters flagged for reduced communications, one day with a network incident) goes through
the real OutcomeRecorder into a fresh SQLite file; then the real report queries run on it. A year of
daily counts is made by copying the measured days' counts, which is what a year of traffic leaves in
`outcome_daily` and `outcome_hourly`, so the year report's cost is measured, not guessed. The
year's row count and file size are extrapolated from the measured bytes per request.

    python bench/outcomes.py                       # 100,000 meters x 14 days (about 2.8M requests)
    python bench/outcomes.py --devices 20000 --days 14 --html /tmp/report.html

Writes bench/results/outcomes.json and prints Markdown lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.outcomes.database import SqliteOutcomes
from gateway.outcomes.queries import open_reader
from gateway.outcomes.recorder import OutcomeRecorder
from gateway.report.compute import Period, Report
from gateway.report.load import query_report
from gateway.report.render_html import render_html
from gateway.report.render_text import short_report

RESULTS = Path(__file__).parent / "results" / "outcomes.json"
START = datetime(2024, 5, 1, tzinfo=UTC)
TARGET_SECONDS = 30.0
REQUESTS_PER_METER_PER_DAY = 2
YEAR_DAYS = 365
FULL_ESTATE = 100_000
DCC = "90-B3-D5-1F-30-00-00-02"
SUPPLIERS = [f"90-B3-D5-1F-30-01-00-{i:02X}" for i in range(12)]
DISTRIBUTORS = [f"90-B3-D5-1F-30-02-00-{i:02X}" for i in range(3)]
# srv, category, who asks ("supplier" or "distributor"), refused when flagged, weight
SRV_MIX = (
    ("4.8.1", "consumption", "supplier", True, 30),
    ("4.6.1", "consumption", "supplier", True, 20),
    ("4.1.1", "consumption", "supplier", True, 8),
    ("4.17", "consumption", "supplier", True, 5),
    ("4.10", "network-data", "distributor", True, 8),
    ("2.1", "tariff", "supplier", False, 5),
    ("6.2.1", "configuration", "supplier", False, 5),
    ("6.15.1", "security", "supplier", False, 3),
    ("11.2", "firmware", "supplier", False, 3),
    ("7.1", "supply", "supplier", False, 2),
    ("8.2", "inventory", "supplier", False, 4),
)
CORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices(device_id TEXT PRIMARY KEY, device_type TEXT NOT NULL,
    smets INTEGER NOT NULL, status TEXT NOT NULL, comms_hub_id TEXT, mpxn TEXT, import_supplier TEXT,
    export_supplier TEXT, gas_supplier TEXT, network_operator TEXT, tariff TEXT NOT NULL,
    wan INTEGER NOT NULL, updated_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS flags(device_id TEXT PRIMARY KEY, set_by TEXT NOT NULL, set_at TEXT NOT NULL,
    request_id TEXT NOT NULL, consumer_reference TEXT);
"""


@dataclass(frozen=True, slots=True)
class Meter:
    eui: str
    device_type: str
    supplier: str
    distributor: str
    flagged_from: datetime | None


def estate(count: int, days: int, rng: random.Random) -> list[Meter]:
    """55% ESME, 45% GSME; 1.5% flagged before the period, 1% more flagged during it."""
    meters = []
    end = START + timedelta(days=days)
    for index in range(count):
        draw = rng.random()
        flagged_from = None
        if draw < 0.015:
            flagged_from = START - timedelta(days=30)
        elif draw < 0.025:
            flagged_from = START + (end - START) * rng.random()
        meters.append(
            Meter(
                eui=f"00-DB-12-{index >> 24 & 0xFF:02X}-{index >> 16 & 0xFF:02X}-{index >> 8 & 0xFF:02X}-"
                f"{index & 0xFF:02X}-A0",
                device_type="ESME" if rng.random() < 0.55 else "GSME",
                supplier=rng.choices(SUPPLIERS, weights=range(12, 0, -1))[0],
                distributor=rng.choice(DISTRIBUTORS),
                flagged_from=flagged_from,
            )
        )
    return meters


class Traffic:
    """Feeds one hour of synthetic requests (decisions, then device outcomes) to the recorder."""

    def __init__(self, meters: list[Meter], rng: random.Random, incident_day: int) -> None:
        self.meters = meters
        self.rng = rng
        self.incident_day = incident_day
        self.counter = 0
        self.srvs = [row[:4] for row in SRV_MIX]
        self.weights = [row[4] for row in SRV_MIX]
        self.record_seconds = 0.0
        self.records = 0

    def hour(self, recorder: OutcomeRecorder, start: datetime) -> None:
        rng = self.rng
        per_hour = len(self.meters) * REQUESTS_PER_METER_PER_DAY // 24
        incident = (start - START).days == self.incident_day
        times = sorted(rng.random() * 3600 for _ in range(per_hour))
        kinds = rng.choices(self.srvs, weights=self.weights, k=per_hour)
        answers = []
        began = time.perf_counter()
        for offset, kind in zip(times, kinds, strict=True):
            srv, asker, refusable = kind[0], kind[2], kind[3]
            category: str | None = kind[1]
            meter = self.meters[rng.randrange(len(self.meters))]
            at = start + timedelta(seconds=offset)
            self.counter += 1
            user = meter.supplier if asker == "supplier" else meter.distributor
            role: str | None = (
                ("IS" if meter.device_type == "ESME" else "GS") if asker == "supplier" else "ED"
            )
            flagged = meter.flagged_from is not None and meter.flagged_from <= at
            draw = rng.random()
            if draw < 0.008:  # a distributor asking for a supplier's SRV
                user, role, decision, code, reason = (
                    meter.distributor,
                    None,
                    "reject",
                    "E2",
                    "role-not-eligible",
                )
            elif draw < 0.01:
                decision, code, reason, srv, category, role = (
                    "reject",
                    "E4",
                    "unknown-srv",
                    "99.1",
                    None,
                    None,
                )
            elif refusable and flagged:
                decision, code, reason = "refuse", "E169", "consumer-choice"
            elif srv == "8.2":
                decision, code, reason = "handle-locally", "I0", "read-inventory"
            else:
                decision, code, reason = "forward", "I99", "forwarded"
            request_id = f"{user}:{meter.eui}:{self.counter}"
            recorder.record_decision(
                request_id=request_id,
                originator=user,
                role=role,
                target=meter.eui,
                srv=srv,
                category=category,
                command_variant=1,
                received_at=at,
                decision=decision,
                response_code=code,
                reason=reason,
                flagged=flagged,
            )
            if decision == "forward":
                answers.append((request_id, at, rng.random()))
        for request_id, at, draw in answers:
            timeout_share = 0.10 if incident else 0.01
            if draw < timeout_share:
                recorder.record_device_outcome(
                    request_id, "timeout", "E21", at + timedelta(seconds=TARGET_SECONDS)
                )
            elif draw < timeout_share + 0.02:
                recorder.record_device_outcome(request_id, "failure", "E20", at + timedelta(seconds=2))
            else:
                latency = min(rng.lognormvariate(0.7, 0.8), 45.0)
                recorder.record_device_outcome(request_id, "success", "I0", at + timedelta(seconds=latency))
        self.record_seconds += time.perf_counter() - began
        self.records += per_hour + len(answers)


def write_inventory(path: Path, meters: list[Meter]) -> None:
    with sqlite3.connect(path) as db:
        db.executescript(CORE_SCHEMA)
        db.executemany(
            "INSERT INTO devices VALUES (?, ?, 2, 'Commissioned', NULL, NULL, ?, NULL, ?, ?, 'single', 1, 1)",
            [
                (
                    m.eui,
                    m.device_type,
                    m.supplier if m.device_type == "ESME" else None,
                    m.supplier if m.device_type == "GSME" else None,
                    m.distributor,
                )
                for m in meters
            ],
        )
        db.executemany(
            "INSERT INTO flags VALUES (?, ?, ?, 'bench', NULL)",
            [(m.eui, m.supplier, m.flagged_from.isoformat()) for m in meters if m.flagged_from is not None],
        )


async def timed_report(path: Path, period: Period) -> tuple[float, Report]:
    async with open_reader(path) as db:
        began = time.perf_counter()
        report = await query_report(
            db, period, target_response_seconds=TARGET_SECONDS, generated_at=period.until
        )
        return time.perf_counter() - began, report


def extend_rollups_to_a_year(path: Path, days: int) -> None:
    """Copy the measured days' counts back in time until both count tables hold a year, as a year would."""
    shifted = {"outcome_daily": "date(start, ?)", "outcome_hourly": "strftime('%Y-%m-%dT%H:00', start, ?)"}
    with sqlite3.connect(path) as db:
        for table, start in shifted.items():
            for shift in range(days, YEAR_DAYS, days):
                db.execute(
                    f"INSERT INTO {table} SELECT {start}, originator, role, srv, category, requests,"
                    " forwarded, succeeded, failed, timed_out, refused_consumer_choice, rejected,"
                    f" handled_locally, within_target FROM {table} WHERE start >= ?",
                    (f"-{shift} days", START.date().isoformat()),
                )


def count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def file_bytes(path: Path) -> int:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path.stat().st_size


def hot_path_us(calls: int = 200_000) -> float:
    """The pipeline's cost per recorded decision: the call only appends to the buffer."""
    recorder = OutcomeRecorder(
        SqliteOutcomes(Path("unused.sqlite3")), batch_size=calls + 1, max_buffered=calls + 1
    )
    user, device = SUPPLIERS[0], "00-DB-12-34-56-78-90-A0"
    began = time.perf_counter()
    for counter in range(calls):
        recorder.record_decision(
            request_id=f"{user}:{device}:{counter}",
            originator=user,
            role="IS",
            target=device,
            srv="4.8.1",
            category="consumption",
            command_variant=1,
            received_at=START,
            decision="forward",
            response_code="I99",
            reason="forwarded",
            flagged=False,
        )
    return (time.perf_counter() - began) / calls * 1e6


async def record_traffic(path: Path, traffic: Traffic, days: int) -> tuple[int, float, float]:
    """Returns the records written, the seconds spent writing them (the recorder's flushes) and the
    CPU seconds the event loop's own thread spent on those flushes (what routing would lose)."""
    flush_seconds = loop_cpu_seconds = 0.0
    async with OutcomeRecorder(
        SqliteOutcomes(path), batch_size=500, flush_seconds=3600, target_response_seconds=TARGET_SECONDS
    ) as recorder:
        for hour in range(days * 24):
            traffic.hour(recorder, START + timedelta(hours=hour))
            began, began_cpu = time.perf_counter(), time.thread_time()
            await recorder.flush()
            flush_seconds += time.perf_counter() - began
            loop_cpu_seconds += time.thread_time() - began_cpu
        return recorder.flushed, flush_seconds, loop_cpu_seconds


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=FULL_ESTATE)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--seed", type=int, default=169)
    parser.add_argument("--html", type=Path, default=None, help="write the whole period's HTML report here")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    meters = estate(args.devices, args.days, rng)
    workdir = Path(tempfile.mkdtemp(prefix="mp169-bench-outcomes-"))
    try:
        path = workdir / "mp169.sqlite3"
        write_inventory(path, meters)
        inventory_bytes = file_bytes(path)
        flushed, flush_seconds, loop_cpu_seconds = await record_traffic(
            path, Traffic(meters, rng, args.days // 2), args.days
        )
        outcome_bytes = file_bytes(path) - inventory_bytes
        rows = count(path, "outcomes")
        end = START + timedelta(days=args.days)
        day_s, _ = await timed_report(
            path, Period(end - timedelta(days=1, minutes=30), end - timedelta(minutes=30))
        )
        period_s, period_report = await timed_report(
            path, Period(START + timedelta(hours=6), end - timedelta(hours=6))
        )
        before_year = file_bytes(path)
        extend_rollups_to_a_year(path, args.days)
        rollup_year_bytes = (file_bytes(path) - before_year) * YEAR_DAYS / (YEAR_DAYS - args.days)
        year = Period(
            end - timedelta(days=YEAR_DAYS, hours=-6, minutes=30), end - timedelta(hours=6, minutes=30)
        )
        year_s, _ = await timed_report(path, year)
        year_rollup_rows = {table: count(path, table) for table in ("outcome_hourly", "outcome_daily")}
        async with OutcomeRecorder(SqliteOutcomes(path)) as recorder:
            began = time.perf_counter()
            purged = await recorder.purge(START + timedelta(days=1))
            purge_s = time.perf_counter() - began
    finally:
        shutil.rmtree(workdir)
    if args.html is not None:
        args.html.write_text(render_html(period_report), encoding="utf-8")

    bytes_per_request = outcome_bytes / rows
    year_rows = FULL_ESTATE * REQUESTS_PER_METER_PER_DAY * YEAR_DAYS
    records_per_request = flushed / rows
    rate = flushed / flush_seconds
    results = {
        "devices": args.devices,
        "days": args.days,
        "requests": rows,
        "records_flushed": flushed,
        "flush_records_per_s": round(rate),
        "hot_path_us_per_record": round(hot_path_us(), 2),
        "flush_loop_cpu_us_per_record": round(loop_cpu_seconds / flushed * 1e6, 2),
        "outcome_bytes": outcome_bytes,
        "bytes_per_request": round(bytes_per_request, 1),
        "report_one_day_s": round(day_s, 3),
        "report_period_s": round(period_s, 3),
        "year_rollup_rows": year_rollup_rows,
        "year_rollup_mib": round(rollup_year_bytes / 2**20),
        "report_year_s": round(year_s, 3),
        "purge_one_day_rows": purged,
        "purge_one_day_s": round(purge_s, 2),
        "year_100k_requests": year_rows,
        "year_100k_file_gib": round((year_rows * bytes_per_request + rollup_year_bytes) / 2**30, 1),
        "year_100k_recorder_seconds_per_day": round(
            FULL_ESTATE * REQUESTS_PER_METER_PER_DAY * records_per_request / rate, 1
        ),
        "summary": short_report(period_report),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(
        f"- estate: {args.devices:,} meters x {args.days} days = {rows:,} Service Requests "
        f"({flushed:,} records: decisions and device outcomes)"
    )
    print(
        f"- recorder: {rate:,.0f} records/s written (batches of 500, one transaction each); "
        f"the pipeline's call costs {results['hot_path_us_per_record']} us (memory only); the event loop "
        f"spends {results['flush_loop_cpu_us_per_record']} us of CPU per record written (the rest runs "
        "in the recorder's worker thread)"
    )
    print(f"- storage: {bytes_per_request:.0f} bytes per request (row, indexes, hourly and daily counts)")
    print(f"- report of one day (hourly counts + rows of 2 partial hours): {day_s:.2f} s")
    print(f"- report of the {args.days} days (daily + hourly counts + rows): {period_s:.2f} s")
    print(
        f"- report of a year ({year_rollup_rows['outcome_daily']:,} daily and "
        f"{year_rollup_rows['outcome_hourly']:,} hourly count rows): {year_s:.2f} s"
    )
    print(f"- purge of one day ({purged:,} requests): {purge_s:.1f} s")
    print(
        f"- a year of {FULL_ESTATE:,} meters (extrapolated): {year_rows:,} requests, "
        f"{results['year_100k_file_gib']} GiB, recorder writing "
        f"{results['year_100k_recorder_seconds_per_day']} s per day"
    )


if __name__ == "__main__":
    asyncio.run(main())
