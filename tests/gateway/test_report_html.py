"""The HTML report renders in headless Chromium: charts present with their data, no script, no JS error."""

from __future__ import annotations

import shutil
import struct
import subprocess
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pytest
from lxml import html as lxml_html

from gateway.report.compute import Period, build_report
from gateway.report.render_html import render_html
from tests.gateway.test_report import T0, TARGET, fixture_report

if TYPE_CHECKING:
    from pathlib import Path

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
)


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.fail(
            "chromium not found: install the Debian package `chromium` (apt-get install chromium); "
            "CI (.ci/run) installs it"
        )
    return found


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )


def assert_no_javascript_error(stderr: str) -> None:
    # Chromium logs page console messages and uncaught exceptions as "CONSOLE(...)" / "Uncaught".
    assert "Uncaught" not in stderr
    assert "CONSOLE" not in stderr


async def test_page_renders_in_chromium_with_its_charts(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render_html(await fixture_report(tmp_path / "mp169.sqlite3")), encoding="utf-8")
    assert "<script" not in page.read_text()

    dumped = run_chromium(tmp_path, "--dump-dom", page.as_uri())
    assert_no_javascript_error(dumped.stderr)
    dom = lxml_html.fromstring(dumped.stdout)
    assert dom.xpath("//script") == []

    (line_chart,) = dom.xpath("//svg[@id='chart-success-rate']")
    # The fixture's device outcomes all fall in the 10:00 hour: one point per series, at 4/7 and 4/9.
    mp169 = line_chart.xpath(".//circle[contains(@class, 'point-mp169')]")
    assert [(c.get("data-bucket"), c.get("data-rate")) for c in mp169] == [("2024-05-01T10:00:00Z", "0.5714")]
    counting = line_chart.xpath(".//circle[contains(@class, 'point-counting-exceptions')]")
    assert [(c.get("data-bucket"), c.get("data-rate")) for c in counting] == [
        ("2024-05-01T10:00:00Z", "0.4444")
    ]
    assert len(line_chart.xpath(".//polyline[@id='series-mp169']")) == 1
    assert len(line_chart.xpath(".//polyline[@id='series-counting-exceptions']")) == 1

    (bar_chart,) = dom.xpath("//svg[@id='chart-refusals']")
    bars = bar_chart.xpath(".//rect[contains(@class, 'bar')]")
    assert [(b.get("data-category"), b.get("data-value")) for b in bars] == [("consumption", "2")]

    assert len(dom.xpath("//table[@id='table-by_category']/tbody/tr")) == 5
    assert len(dom.xpath("//table[@id='table-installation']/tbody/tr")) == 3
    assert dom.xpath("string(//div[@id='tile-success-rate']/div[@class='value'])") == "57.1%"


async def test_screenshot_is_taken(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render_html(await fixture_report(tmp_path / "mp169.sqlite3")), encoding="utf-8")
    shot = tmp_path / "page.png"
    result = run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri())
    assert_no_javascript_error(result.stderr)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1200, 1600)


def test_empty_period_says_so_instead_of_drawing_bars():
    period = Period(datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 5, 1, 3, tzinfo=UTC))
    report = build_report(
        period=period, cells={}, dated=(), meters=(), target_response_seconds=TARGET, generated_at=T0
    )
    dom = lxml_html.fromstring(render_html(report))
    assert dom.xpath("//svg[@id='chart-refusals']//rect") == []
    assert dom.xpath("//*[@id='chart-refusals-empty']")
    assert dom.xpath("//svg[@id='chart-success-rate']//circle") == []
