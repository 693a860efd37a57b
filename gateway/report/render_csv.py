"""The report as CSV, for spreadsheets: one CSV per table (the JSON document's sections)."""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING, Any

from gateway.report.figures import GROUP_COLUMNS, INSTALLATION_COLUMNS, TIMELINE_COLUMNS
from gateway.report.render_json import report_json

if TYPE_CHECKING:
    from gateway.report.compute import Report

TABLES: tuple[str, ...] = (
    "period",
    "totals",
    "by_category",
    "by_srv",
    "by_role",
    "by_user",
    "installation",
    "timeline",
)
"""Every table's name, in the report's order: `mp169 report --format csv --table NAME`."""


def csv_tables(report: Report) -> dict[str, str]:
    """Each table's CSV text (a header row, then the rows), by name, in the order of TABLES."""
    document = report_json(report)
    columns: dict[str, list[str]] = {
        "period": list(document["period"]),
        "totals": list(GROUP_COLUMNS),
        "installation": list(INSTALLATION_COLUMNS),
        "timeline": list(TIMELINE_COLUMNS),
    } | {section.name: [*section.key_columns, *GROUP_COLUMNS] for section in report.groups}
    tables: dict[str, str] = {}
    for name in TABLES:
        section = document[name]
        rows: list[dict[str, Any]] = section if isinstance(section, list) else [section]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns[name])
        for row in rows:
            writer.writerow(["" if row[column] is None else row[column] for column in columns[name]])
        tables[name] = out.getvalue()
    return tables
