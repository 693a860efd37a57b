"""The whole system in memory: the real gateway, simulated devices, a generated stream, the checks.

`run_demo` is what `mp169 demo` runs. These tests also prove the checks can fail: a gateway routing
with a table that forwards consumption to flagged meters must be caught.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from rules.table import PACKAGED_TABLE
from simulator.demo import DemoOptions, DemoResult, run_demo
from simulator.invariants import EventKind
from tests.gateway.messages import header

if TYPE_CHECKING:
    from pathlib import Path

    from simulator.mosquitto import Mosquitto


def small(tmp_path: Path, **changes: object) -> DemoOptions:
    options = {"premises": 80, "requests": 800, "workdir": tmp_path / "demo", **changes}
    return DemoOptions(**options)  # type: ignore[arg-type]


def invariant(result: DemoResult, name: str) -> tuple[bool, int, int]:
    [found] = [r for r in result.replay.invariants if r.name == name]
    return found.passed, found.checked, found.violations


async def test_the_demo_holds_every_invariant_and_its_report_agrees(tmp_path: Path) -> None:
    result = await run_demo(small(tmp_path))
    summary = result.replay.summary
    assert result.replay.passed, [r for r in result.replay.invariants if not r.passed]
    assert summary.completed
    assert summary.missing == 0
    # The stream holds no repeated RequestID: an E16901 would mean requests were decided out of order.
    assert "E16901" not in summary.first_codes
    # Access control was exercised: unregistered suppliers (E4) and wrong device types (E11).
    assert summary.first_codes["E4"] > 0
    assert summary.first_codes["E11"] > 0
    assert invariant(result, "authorised-access")[1] > 0
    # The traffic exercised what MP169 is about, not a vacuous pass.
    assert invariant(result, "no-consumption-to-flagged")[1] > 0
    assert invariant(result, "protected-traffic-delivered")[1] > 0
    assert summary.decisions["refused"] > 0
    totals = result.report.totals
    assert totals.refused_consumer_choice == summary.decisions["refused"]
    assert totals.forwarded == summary.decisions["forwarded"]
    assert result.report.installed.reduced_communications > 0


async def test_a_gateway_forwarding_consumption_to_flagged_meters_is_caught(tmp_path: Path) -> None:
    broken = tmp_path / "broken-table.toml"
    text = PACKAGED_TABLE.read_text(encoding="utf-8")
    broken.write_text(re.sub(r"refused_when_flagged = true", "refused_when_flagged = false", text))
    result = await run_demo(small(tmp_path, rules=broken))
    assert not result.replay.passed
    passed, checked, violations = invariant(result, "no-consumption-to-flagged")
    assert not passed
    assert 0 < violations <= checked


def first_answers(result: DemoResult) -> dict[str, str]:
    """RequestID -> the first response code the user saw, for every request the replay published."""
    published = {header(e.payload)[0] for e in result.replay.events if e.kind is EventKind.REQUEST}
    answers: dict[str, str] = {}
    for event in result.replay.events:
        if event.kind is EventKind.ANSWER:
            request_id, code = header(event.payload)
            if request_id in published and request_id is not None and code is not None:
                answers.setdefault(request_id, code)
    return answers


async def test_the_same_seed_gives_the_same_decisions(tmp_path: Path) -> None:
    quiet = {"failure_rate": 0.0, "timeout_rate": 0.0}
    first = await run_demo(small(tmp_path / "a", **quiet))
    second = await run_demo(small(tmp_path / "b", **quiet))
    assert first_answers(first) == first_answers(second)
    assert len(first_answers(first)) > 500


def test_the_demo_command_exits_zero_and_prints_the_verdicts(tmp_path: Path) -> None:
    # As a newcomer runs it: its own process, its own event loop.
    command = [sys.executable, "-m", "gateway.cli", "demo", "--premises", "40", "--requests", "300"]
    done = subprocess.run(
        [*command, "--workdir", str(tmp_path), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "no-consumption-to-flagged" in done.stdout
    assert "FAIL" not in done.stdout
    assert "Installed SMETS2 meters" in done.stdout


async def test_a_saved_stream_replays_to_the_same_decisions(tmp_path: Path) -> None:
    quiet = {"failure_rate": 0.0, "timeout_rate": 0.0}
    saved = tmp_path / "traffic.jsonl"
    live = await run_demo(small(tmp_path / "a", save_traffic=saved, **quiet))
    replayed = await run_demo(small(tmp_path / "b", recording=saved, **quiet))
    assert replayed.replay.passed
    assert first_answers(replayed) == first_answers(live)


@pytest.mark.broker
async def test_mosquitto_and_memory_give_the_same_decisions(tmp_path: Path, mosquitto: Mosquitto) -> None:
    quiet = {"failure_rate": 0.0, "timeout_rate": 0.0}
    saved = tmp_path / "traffic.jsonl"
    in_memory = await run_demo(small(tmp_path / "a", save_traffic=saved, **quiet))
    over_mqtt = await run_demo(small(tmp_path / "b", broker=mosquitto.url, recording=saved, **quiet))
    back = await run_demo(small(tmp_path / "c", recording=saved, **quiet))
    assert over_mqtt.replay.passed
    assert "E16901" not in over_mqtt.replay.summary.first_codes
    assert first_answers(over_mqtt) == first_answers(in_memory) == first_answers(back)


async def test_one_seed_gives_the_same_figures_even_on_a_busy_machine(tmp_path: Path) -> None:
    # Two demos at once in one event loop, each slowing the other: on the real clock late device
    # answers became timeouts (E21) by chance; on the demo's simulated clock only unanswered ones do.
    first, second = await asyncio.gather(
        run_demo(small(tmp_path / "a", timeout_rate=0.05)), run_demo(small(tmp_path / "b", timeout_rate=0.05))
    )
    for result in (first, second):
        assert result.replay.passed
    assert first.replay.summary.device_outcomes == second.replay.summary.device_outcomes
    assert first.replay.summary.device_outcomes["E21"] > 0
    assert first.replay.summary.first_codes == second.replay.summary.first_codes
    assert first.report.totals == second.report.totals
