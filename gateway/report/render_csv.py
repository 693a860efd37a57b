"""The report as CSV, for spreadsheets: the JSON document's sections one after another."""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING, Any

from gateway.report.figures import GROUP_COLUMNS, INSTALLATION_COLUMNS, TIMELINE_COLUMNS
from gateway.report.render_json import report_json

if TYPE_CHECKING:
    from gateway.report.compute import Report


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
