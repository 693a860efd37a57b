"""The report for a terminal: rich tables, and `short_report` for the demo and replay summaries."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from gateway.report.figures import GROUP_COLUMNS, HEADINGS, LEGEND, cell_text, iso, percent, tally_figures

if TYPE_CHECKING:
    from rich.console import Console

    from gateway.report.compute import Report


def render_table(report: Report, console: Console) -> None:
    """Rich terminal tables, one per section."""
    since, until = iso(report.period.since), iso(report.period.until)
    console.print(f"[bold]MP169 Service Request outcomes[/bold]  {since} to {until}")
    headings = [HEADINGS[c] for c in GROUP_COLUMNS]
    totals = Table(title="All Service Requests", title_justify="left")
    for heading in headings:
        totals.add_column(heading, justify="right")
    figures = tally_figures(report.totals)
    totals.add_row(*(cell_text(c, figures[c]) for c in GROUP_COLUMNS))
    console.print(totals)
    for section in report.groups:
        table = Table(title=section.title, title_justify="left")
        for column in section.key_columns:
            table.add_column(HEADINGS[column])
        for heading in headings:
            table.add_column(heading, justify="right")
        for row in section.rows:
            figures = tally_figures(row.tally)
            table.add_row(
                *(cell_text(c, k) for c, k in zip(section.key_columns, row.keys, strict=True)),
                *(cell_text(c, figures[c]) for c in GROUP_COLUMNS),
            )
        console.print(table)
    console.print(LEGEND.format(target=report.target_response_seconds), style="dim")
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
        f"Success rate {percent(t.success_rate)} of {t.final:,} device outcomes, "
        f"{t.refused_consumer_choice:,} consumer-choice exceptions excluded; "
        f"within {report.target_response_seconds:g} s: {percent(t.within_target_share)}"
    )
    meters = (
        f"Installed SMETS2 meters: {installed.installed:,} ({installed.communicating_normally:,} "
        f"communicating normally, {installed.reduced_communications:,} with reduced communications by "
        "consumer choice)"
    )
    return f"{requests}\n{rates}\n{meters}"
