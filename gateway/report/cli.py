"""`mp169 report`: Service Request outcomes and supplier installation figures, MP169-aware.

Which databases: `--store` / `--outcomes`, else the configuration's, as `mp169 run` records them: a
PostgreSQL store (`store.url`, or `--store postgresql://...`) holds every instance's outcomes and the
inventory in one database; a SQLite gateway keeps outcomes in a file beside its store. With neither
configured and nothing recorded at the default path, the last `mp169 demo`'s (var/demo/), said on
stderr. Which
period: `--since` to `--until` (default now); without `--since`, the requests recorded in the day
before `--until`, from the first to the last (so a two-minute demo is charted per minute, not as two
dots on a day's axis).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
from rich.console import Console

from gateway.config import DEFAULT, DEMO_STORE_PATH, ConfigError, Configuration, load_configuration
from gateway.outcomes.queries import (
    OutcomeSchemaError,
    has_outcome_tables,
    is_postgres,
    open_reader,
    recorded_extent,
)
from gateway.report.compute import Granularity, Period, bucket_start
from gateway.report.load import load_report
from gateway.report.render_csv import TABLES, csv_tables
from gateway.report.render_html import render_html
from gateway.report.render_json import render_json
from gateway.report.render_text import render_table
from rules.domain import utc_now

if TYPE_CHECKING:
    from gateway.outcomes.queries import Location
    from gateway.report.compute import Report

_DEFAULT_PERIOD = timedelta(days=1)
EXIT_NOTHING = 1
EXIT_USAGE = 2


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
        "communications as installed. Default period: the requests recorded in the last day.",
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="configuration file (default ./config.toml)"
    )
    parser.add_argument(
        "--since",
        type=parse_time,
        default=None,
        help="start, ISO-8601 (default: the first request recorded in the day before --until)",
    )
    parser.add_argument(
        "--until", type=parse_time, default=None, help="end (exclusive), ISO-8601 (default: now)"
    )
    parser.add_argument(
        "--store",
        default=None,
        metavar="PATH|URL",
        help="the store to report on (as store.path or store.url): a SQLite file, outcomes beside it unless "
        "--outcomes, or postgresql://USER@HOST:PORT/DATABASE, which holds every instance's outcomes",
    )
    parser.add_argument(
        "--outcomes",
        type=Path,
        default=None,
        metavar="PATH",
        help="the SQLite outcome database to report on (not with a PostgreSQL store)",
    )
    parser.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="table (default), json, or csv: one file per table into --out DIR, or --table NAME to stdout",
    )
    parser.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="--format csv: write NAME.csv per table here"
    )
    parser.add_argument(
        "--table",
        choices=TABLES,
        default=None,
        metavar="NAME",
        help=f"--format csv: write this table to stdout ({', '.join(TABLES)})",
    )
    parser.add_argument(
        "--html",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write a self-contained HTML page (its directory is created if missing)",
    )
    parser.set_defaults(handler=run_report)


def _error(message: str) -> None:
    sys.stderr.write(f"mp169 report: {message}\n")


def _configuration(args: argparse.Namespace) -> Configuration:
    overrides: dict[str, str] = {}
    if args.store is not None and is_postgres(args.store):
        overrides["store.url"] = args.store
    elif args.store is not None:
        overrides["store.url"] = ""  # a SQLite file, whatever the configuration's store
        overrides["topics.shared_group"] = ""  # a group's configuration, reporting on one file: no topics
        overrides["store.path"] = args.store
        overrides["outcomes.path"] = ""  # beside the store given, unless --outcomes
    if args.outcomes is not None:
        overrides["outcomes.path"] = str(args.outcomes)
    configuration = load_configuration(args.config, overrides=overrides)
    if configuration.settings.store.postgres:
        if args.outcomes is not None:
            raise ConfigError("--outcomes is for a SQLite gateway: the PostgreSQL store holds the outcomes")
        return configuration
    untouched = all(configuration.origin(key) == DEFAULT for key in ("store.path", "outcomes.path"))
    if untouched and not configuration.outcomes_path.exists():
        demo = load_configuration(args.config, overrides={"store.path": str(DEMO_STORE_PATH)})
        if demo.outcomes_path.exists():
            _error(f"nothing recorded at {configuration.outcomes_path}: reporting the last `mp169 demo`")
            return replace(demo, origins={**demo.origins, "store.path": "the last `mp169 demo`"})
    return configuration


async def _recorded_period(outcomes: Location, until: datetime) -> Period | None:
    """The requests recorded in the day before `until`, from the first to the last in whole minutes and
    a minute either side (as the demo's own report), so the chart's axis starts and ends empty."""
    async with open_reader(outcomes) as db:
        if not await has_outcome_tables(db):
            return None
        extent = await recorded_extent(db, until - _DEFAULT_PERIOD, until)
    if extent is None:
        return None
    first, last = extent
    minute = Granularity.MINUTE.step
    return Period(
        bucket_start(first, Granularity.MINUTE) - minute, bucket_start(last, Granularity.MINUTE) + 2 * minute
    )


def _period(args: argparse.Namespace, outcomes: Location, now: datetime) -> Period:
    until: datetime = args.until or now
    if args.since is not None:
        return Period(args.since, until)
    recorded = asyncio.run(_recorded_period(outcomes, until))
    return recorded or Period(until - _DEFAULT_PERIOD, until)


def _write_csv(report: Report, args: argparse.Namespace) -> int:
    tables = csv_tables(report)
    if args.table is not None:
        sys.stdout.write(tables[args.table])
        return 0
    if args.out is None:
        _error(
            f"--format csv writes one CSV per table: give --out DIR, or --table NAME ({', '.join(TABLES)})"
        )
        return EXIT_USAGE
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, text in tables.items():
            (args.out / f"{name}.csv").write_text(text, encoding="utf-8")
    except OSError as exc:
        _error(f"cannot write the CSV files into {args.out}: {exc}")
        return EXIT_NOTHING
    _error(f"wrote {len(tables)} CSV files into {args.out}: {', '.join(f'{name}.csv' for name in tables)}")
    return 0


def _write_html(report: Report, path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_html(report), encoding="utf-8")
    except OSError as exc:
        _error(f"cannot write {path}: {exc}")
        return EXIT_NOTHING
    _error(f"wrote {path}")
    return 0


class _NoReportError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _databases(configuration: Configuration) -> tuple[Location, Location | None]:
    """The outcome database and the store (None: absent, no installation figures), said on stderr."""
    outcomes = configuration.outcomes_location
    if configuration.settings.store.postgres:
        _error(f"outcomes and store: {configuration.describe_store()}")
        return outcomes, None  # one database: the outcomes' reader reads the inventory too
    path = configuration.outcomes_path
    if not path.exists():
        message = f"no outcome database at {configuration.describe_outcomes()}: nothing recorded yet"
        raise _NoReportError(message, EXIT_NOTHING)
    store = configuration.store_path
    _error(f"outcomes {configuration.describe_outcomes()}")
    absent = "" if store.exists() else ": absent, so no installation figures"
    _error(f"store {configuration.describe_store()}{absent}")
    return outcomes, store if store.exists() else None


def _load(args: argparse.Namespace, configuration: Configuration) -> Report:
    outcomes, store = _databases(configuration)
    now = utc_now()
    where = configuration.store_name if configuration.settings.store.postgres else str(outcomes)
    try:
        period = _period(args, outcomes, now)
        if period.since >= period.until:
            raise _NoReportError("--since must be before --until", EXIT_USAGE)
        return asyncio.run(
            load_report(
                outcomes,
                period,
                target_response_seconds=configuration.settings.gateway.target_response_seconds,
                generated_at=now,
                store=store,
            )
        )
    except OutcomeSchemaError as exc:
        raise _NoReportError(f"{where}: {exc}", EXIT_NOTHING) from exc
    except (OSError, asyncpg.PostgresError) as exc:
        raise _NoReportError(f"cannot read {where}: {exc}", EXIT_NOTHING) from exc


def run_report(args: argparse.Namespace) -> int:
    if args.format != "csv" and (args.out is not None or args.table is not None):
        _error("--out and --table are for --format csv")
        return EXIT_USAGE
    try:
        configuration = _configuration(args)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    try:
        report = _load(args, configuration)
    except _NoReportError as exc:
        _error(str(exc))
        return exc.status
    status = 0
    if args.format == "json":
        sys.stdout.write(render_json(report))
    elif args.format == "csv":
        status = _write_csv(report, args)
    else:
        render_table(report, Console())
    if args.html is not None:
        status = status or _write_html(report, args.html)
    return status
