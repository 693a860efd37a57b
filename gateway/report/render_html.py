"""The report as a self-contained HTML page with inline SVG charts: no script, nothing fetched."""

from __future__ import annotations

import math
from html import escape
from typing import TYPE_CHECKING

from gateway.report.compute import Granularity
from gateway.report.figures import (
    GROUP_COLUMNS,
    HEADINGS,
    INSTALLATION_COLUMNS,
    LEGEND,
    cell_text,
    installation_figures,
    iso,
    percent,
    tally_figures,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from gateway.outcomes.tally import Tally
    from gateway.report.compute import Report


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
            label = point.start.strftime("%d %b" if report.granularity is Granularity.DAY else "%H:%M")
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
            f'data-bucket="{iso(p.start)}" data-rate="{r:.4f}"><title>{escape(iso(p.start))}: '
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
        f'<th class="{"key" if i < keys else "figure"}">{escape(HEADINGS.get(c, c))}</th>'
        for i, c in enumerate(columns)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"key" if i < keys else "figure"}">{escape(cell_text(c, v))}</td>'
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
        ("tile-success-rate", percent(t.success_rate), "Success rate (MP169, exceptions excluded)"),
        ("tile-excluded", f"{t.refused_consumer_choice:,}", "Refused for consumer choice (excluded)"),
        (
            "tile-within-target",
            percent(t.within_target_share),
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
            ([*row.keys, *(tally_figures(row.tally)[c] for c in GROUP_COLUMNS)] for row in section.rows),
        )
        for section in report.groups
    ]
    installation = _html_table(
        "table-installation",
        INSTALLATION_COLUMNS,
        2,
        ([installation_figures(row)[c] for c in INSTALLATION_COLUMNS] for row in report.installation),
    )
    since, until = iso(report.period.since), iso(report.period.until)
    return "".join(
        (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            f"<title>MP169 report {escape(since)} to {escape(until)}</title>",
            f"<style>{_CSS}</style></head><body>",
            "<h1>MP169 Service Request outcomes</h1>",
            (
                f'<p class="period">{escape(since)} to {escape(until)}, per {report.granularity.value}; '
                f"generated {escape(iso(report.generated_at))}</p>"
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
            f'<p class="legend">{escape(LEGEND.format(target=report.target_response_seconds))}</p>',
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
