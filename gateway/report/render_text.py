"""The report for a terminal: rich tables, and `short_report` for the demo and replay summaries."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.report.figures import GROUP_COLUMNS, HEADINGS, LEGEND, cell_text, iso, percent, tally_figures
from gateway.terminal import Column, FittedTable, print_fitted

if TYPE_CHECKING:
    from rich.console import Console

    from gateway.report.compute import Report


def render_table(report: Report, console: Console) -> None:
    """Terminal tables, one per section, each fitted to the terminal's width (no figure is ever cut)."""
    since, until = iso(report.period.since), iso(report.period.until)
    console.print(f"[bold]MP169 Service Request outcomes[/bold]  {since} to {until}")
    values = [Column(HEADINGS[c], numeric=True) for c in GROUP_COLUMNS]
    figures = tally_figures(report.totals)
    totals = [cell_text(c, figures[c]) for c in GROUP_COLUMNS]
    print_fitted(console, FittedTable("All Service Requests", (), values, [totals]))
    for section in report.groups:
        rows = []
        for row in section.rows:
            figures = tally_figures(row.tally)
            rows.append(
                [
                    *(cell_text(c, k) for c, k in zip(section.key_columns, row.keys, strict=True)),
                    *(cell_text(c, figures[c]) for c in GROUP_COLUMNS),
                ]
            )
        keys = [Column(HEADINGS[column]) for column in section.key_columns]
        print_fitted(console, FittedTable(section.title, keys, values, rows))
    console.print(LEGEND.format(target=report.target_response_seconds), style="dim")
    installation = [
        [
            meters.supplier or "-",
            meters.device_type,
            f"{meters.installed:,}",
            f"{meters.communicating_normally:,}",
            f"{meters.reduced_communications:,}",
        ]
        for meters in report.installation
    ]
    total = report.installed
    installation.append(
        [
            "Total",
            "",
            f"{total.installed:,}",
            f"{total.communicating_normally:,}",
            f"{total.reduced_communications:,}",
        ]
    )
    print_fitted(
        console,
        FittedTable(
            "Installed SMETS2 meters (Commissioned) per responsible supplier",
            (Column("Supplier"), Column("Type")),
            [Column(heading, numeric=True) for heading in ("Installed", "Communicating", "Reduced comms")],
            installation,
            bold_last_row=True,
        ),
    )
    console.print(
        "Installed = Communicating + Reduced comms (communications reduced by consumer choice, MP169: "
        "installed all the same).",
        style="dim",
    )


def short_report(report: Report) -> str:
    """A few lines for the end of `mp169 demo` and the replay summary."""
    t = report.totals
    installed = report.installed
    requests = (
        f"Service Requests: {t.requests:,} ({t.forwarded:,} forwarded: {t.succeeded:,} succeeded, "
        f"{t.failed:,} failed, {t.timed_out:,} timed out, {t.pending:,} pending; "
        f"{t.refused_consumer_choice:,} refused for consumer choice; {t.rejected:,} rejected; "
        f"{t.handled_locally:,} handled locally; {t.refused_flag_request:,} flag requests refused)"
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
