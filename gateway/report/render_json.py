"""The report as JSON: one object, the period and then one member per section."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from gateway.report.figures import installation_figures, iso, tally_figures, timeline_figures

if TYPE_CHECKING:
    from gateway.report.compute import Report


def report_json(report: Report) -> dict[str, Any]:
    """One object: the period, then one member per section."""
    document: dict[str, Any] = {
        "period": {
            "since": iso(report.period.since),
            "until": iso(report.period.until),
            "granularity": report.granularity.value,
            "target_response_seconds": report.target_response_seconds,
            "generated_at": iso(report.generated_at),
        },
        "totals": tally_figures(report.totals),
    }
    for section in report.groups:
        document[section.name] = [
            dict(zip(section.key_columns, row.keys, strict=True)) | tally_figures(row.tally)
            for row in section.rows
        ]
    document["installation"] = [installation_figures(row) for row in report.installation]
    document["timeline"] = [timeline_figures(point) for point in report.timeline]
    return document


def render_json(report: Report) -> str:
    return json.dumps(report_json(report), indent=2) + "\n"
