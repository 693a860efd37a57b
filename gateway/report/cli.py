"""`mp169 report`: Service Request outcomes and supplier installation figures, MP169-aware."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console

from gateway.config import ConfigError, load_settings
from gateway.report.compute import Period
from gateway.report.load import load_report
from gateway.report.render_csv import render_csv
from gateway.report.render_html import render_html
from gateway.report.render_json import render_json
from gateway.report.render_text import render_table
from rules.domain import utc_now

_DEFAULT_PERIOD = timedelta(days=1)


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
    parser.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="output on stdout"
    )
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
    since: datetime = args.since or until - _DEFAULT_PERIOD
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
