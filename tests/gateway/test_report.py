"""The report: hand-computed figures in every format, the MP169 exception rule, installation counts;
every test that reads a database runs on SQLite and PostgreSQL (`outcome_location`)."""

# The expected terminal tables below are wider than a source line.
# ruff: noqa: E501

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from hypothesis import example, given
from hypothesis import strategies as st
from rich.console import Console

from gateway.config import StoreSettings
from gateway.outcomes.queries import is_postgres
from gateway.outcomes.recorder import OutcomeRecorder
from gateway.outcomes.schema import OutcomeRecord, Rollup
from gateway.outcomes.tally import Tally
from gateway.report.cli import register
from gateway.report.compute import (
    Granularity,
    InstalledMeters,
    Period,
    Read,
    installation_rows,
    plan_reads,
    report_from_records,
)
from gateway.report.figures import GROUP_COLUMNS
from gateway.report.load import load_report
from gateway.report.render_csv import TABLES, csv_tables
from gateway.report.render_json import render_json
from gateway.report.render_text import render_table, short_report
from gateway.storage import open_store
from simulator.server import free_port
from tests.gateway.test_outcome_recorder import migrate_to_first_version
from tests.outcomes import database, rows

if TYPE_CHECKING:
    from gateway.outcomes.queries import Location

T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
TARGET = 30.0
DCC = "90-B3-D5-1F-30-00-00-02"
S1 = "90-B3-D5-1F-30-01-00-00"  # import supplier
S2 = "90-B3-D5-1F-30-01-00-01"  # gas supplier (and import supplier of E5)
ED = "90-B3-D5-1F-30-02-00-00"  # electricity distributor
E1 = "00-DB-12-34-56-78-90-A1"  # ESME of S1, flagged
E2 = "00-DB-12-34-56-78-90-A2"  # ESME of S1
E3 = "00-DB-12-34-56-78-90-A3"  # SMETS1 ESME: not counted
E4 = "00-DB-12-34-56-78-90-A4"  # decommissioned, still flagged: not counted
E5 = "00-DB-12-34-56-78-90-A5"  # ESME of S2
G1 = "00-DB-12-34-56-78-90-B1"  # GSME of S2, flagged
G2 = "00-DB-12-34-56-78-90-B2"
G3 = "00-DB-12-34-56-78-90-B3"
C1 = "00-DB-12-34-56-78-90-C1"  # comms hub: not a meter

DEVICES = (
    # device, type, smets, status, import supplier, gas supplier
    (E1, "ESME", 2, "Commissioned", S1, None),
    (E2, "ESME", 2, "Commissioned", S1, None),
    (E3, "ESME", 1, "Commissioned", S1, None),
    (E4, "ESME", 2, "Decommissioned", S1, None),
    (E5, "ESME", 2, "Commissioned", S2, S1),
    (G1, "GSME", 2, "Commissioned", None, S2),
    (G2, "GSME", 2, "Commissioned", None, S2),
    (G3, "GSME", 2, "Commissioned", None, S2),
    (C1, "CHF", 2, "Commissioned", None, None),
)
FLAGGED = (E1, E4, G1)


@dataclass(frozen=True)
class Req:
    """One request of the fixture: its decision and, if forwarded, its device outcome."""

    minute: float
    user: str
    role: str | None
    target: str
    srv: str | None
    category: str | None
    decision: str
    code: str
    reason: str
    flagged: bool = False
    outcome: str | None = None
    answered_after: float = 0.0  # seconds


FIXTURE = (
    Req(1, S1, "IS", E2, "4.8.1", "consumption", "forward", "I99", "forwarded", False, "success", 5),
    Req(2, S1, "IS", E2, "4.1.1", "consumption", "forward", "I99", "forwarded", False, "failure", 10),
    Req(3, S1, "IS", E2, "4.8.1", "consumption", "forward", "I99", "forwarded", False, "timeout", 30),
    Req(4, S1, "IS", E1, "4.8.1", "consumption", "refuse", "E169", "consumer-choice", True),
    Req(5, S1, "IS", E1, "4.1.1", "consumption", "refuse", "E169", "consumer-choice", True),
    Req(6, S1, "IS", E1, "11.2", "firmware", "forward", "I99", "forwarded", True, "success", 30.5),
    Req(7, S2, "GS", G1, "4.1.1", "consumption", "forward", "I99", "forwarded", True, "success", 3),
    Req(19 + 50 / 60, S2, "GS", G2, "4.8.1", "consumption", "forward", "I99", "forwarded"),  # pending
    Req(9, ED, None, E2, "4.8.1", "consumption", "reject", "E2", "role-not-eligible"),
    Req(10, S1, None, DCC, "8.15.1", "consumer-choice-flag", "handle-locally", "I0", "flag-request"),
    Req(11, ED, None, E2, "99.9", None, "reject", "E4", "unknown-srv"),
    Req(12, S1, "IS", E2, "6.15.1", "security", "forward", "I99", "forwarded", False, "success", 2),
    Req(13, S2, "GS", G3, "11.2", "firmware", "forward", "I99", "forwarded"),  # expired below
    Req(
        14, S2, None, DCC, "8.15.1", "consumer-choice-flag", "handle-locally", "E081505", "multi-rate-tariff"
    ),
)
EXPIRE_AT = T0 + timedelta(minutes=20)  # cutoff 10:19:30: request 13 times out, the pending one does not


def request_id(index: int, req: Req) -> str:
    return f"{req.user}:{req.target}:{1000 + index}"


def received(req: Req) -> datetime:
    return T0 + timedelta(minutes=req.minute)


def store_settings(location: Location) -> StoreSettings:
    return StoreSettings(url=location) if is_postgres(location) else StoreSettings(path=str(location))


async def write_inventory(location: Location) -> None:
    """The store's tables (its own migrations) with the fixture's devices and flags, in the outcome
    database: one SQLite file, or the PostgreSQL database that holds both."""
    async with open_store(store_settings(location)):
        pass
    for row in DEVICES:
        await rows(
            location,
            "INSERT INTO devices (device_id, device_type, smets, status, import_supplier, gas_supplier,"
            " tariff, wan, updated_seq) VALUES (?, ?, ?, ?, ?, ?, 'single', 1 = 1, 1)",
            *row,
        )
    for device in FLAGGED:
        await rows(location, "INSERT INTO flags VALUES (?, ?, '2024-04-01T00:00:00Z', 'x', NULL)", device, S1)


async def record_fixture(location: Location) -> None:
    """The fixture through the real recorder: inventory, decisions, device outcomes, expiry."""
    await write_inventory(location)
    async with OutcomeRecorder(
        database(location), batch_size=4, flush_seconds=3600, target_response_seconds=TARGET
    ) as rec:
        for index, req in enumerate(FIXTURE):
            rec.record_decision(
                request_id=request_id(index, req),
                originator=req.user,
                role=req.role,
                target=req.target,
                srv=req.srv,
                category=req.category,
                command_variant=8 if req.target == DCC else 1,
                received_at=received(req),
                decision=req.decision,
                response_code=req.code,
                reason=req.reason,
                flagged=req.flagged,
            )
        await rec.flush()
        for index, req in enumerate(FIXTURE):
            if req.outcome is not None:
                code = {"success": "I0", "failure": "E20", "timeout": "E21"}[req.outcome]
                at = received(req) + timedelta(seconds=req.answered_after)
                rec.record_device_outcome(request_id(index, req), req.outcome, code, at)
        assert await rec.expire_pending(EXPIRE_AT, TARGET) == 1


DAY = Period(datetime(2024, 5, 1, 9, tzinfo=UTC), datetime(2024, 5, 1, 12, tzinfo=UTC))


_RECORDED: set[str] = set()


async def fixture_report(location: Location, period: Period = DAY):
    if str(location) not in _RECORDED:  # every test has a new file or database
        await record_fixture(location)
        _RECORDED.add(str(location))
    return await load_report(
        location, period, target_response_seconds=TARGET, generated_at=T0 + timedelta(hours=3)
    )


# -- hand-computed expectations (see the FIXTURE comments) ---------------------------------------------
#          requests fwd ok fail t/o pend rej local flag-refused success excluded within
TOTALS = (14, 8, 4, 1, 2, 1, 2, 1, 1, 0.5714, 2, 0.5714)
BY_CATEGORY = {
    "consumer-choice-flag": (2, 0, 0, 0, 0, 0, 0, 1, 1, None, 0, None),
    "consumption": (8, 5, 2, 1, 1, 1, 1, 0, 0, 0.5, 2, 0.75),
    "firmware": (2, 2, 1, 0, 1, 0, 0, 0, 0, 0.5, 0, 0.0),
    "security": (1, 1, 1, 0, 0, 0, 0, 0, 0, 1.0, 0, 1.0),
    None: (1, 0, 0, 0, 0, 0, 1, 0, 0, None, 0, None),
}
BY_SRV = {
    ("4.1.1", "consumption"): (3, 2, 1, 1, 0, 0, 0, 0, 0, 0.5, 1, 1.0),
    ("4.8.1", "consumption"): (5, 3, 1, 0, 1, 1, 1, 0, 0, 0.5, 1, 0.5),
    ("6.15.1", "security"): (1, 1, 1, 0, 0, 0, 0, 0, 0, 1.0, 0, 1.0),
    ("8.15.1", "consumer-choice-flag"): (2, 0, 0, 0, 0, 0, 0, 1, 1, None, 0, None),
    ("11.2", "firmware"): (2, 2, 1, 0, 1, 0, 0, 0, 0, 0.5, 0, 0.0),
    ("99.9", None): (1, 0, 0, 0, 0, 0, 1, 0, 0, None, 0, None),
}
BY_ROLE = {
    "GS": (3, 3, 1, 0, 1, 1, 0, 0, 0, 0.5, 0, 0.5),
    "IS": (7, 5, 3, 1, 1, 0, 0, 0, 0, 0.6, 2, 0.6),
    None: (4, 0, 0, 0, 0, 0, 2, 1, 1, None, 0, None),
}
BY_USER = {
    S1: (8, 5, 3, 1, 1, 0, 0, 1, 0, 0.6, 2, 0.6),
    S2: (4, 3, 1, 0, 1, 1, 0, 0, 1, 0.5, 0, 0.5),
    ED: (2, 0, 0, 0, 0, 0, 2, 0, 0, None, 0, None),
}
INSTALLATION = [
    {
        "supplier": S1,
        "device_type": "ESME",
        "installed": 2,
        "communicating_normally": 1,
        "reduced_communications": 1,
    },
    {
        "supplier": S2,
        "device_type": "ESME",
        "installed": 1,
        "communicating_normally": 1,
        "reduced_communications": 0,
    },
    {
        "supplier": S2,
        "device_type": "GSME",
        "installed": 3,
        "communicating_normally": 2,
        "reduced_communications": 1,
    },
]
TIMELINE = [
    {
        "start": "2024-05-01T09:00:00Z",
        "final": 0,
        "succeeded": 0,
        "refused_consumer_choice": 0,
        "success_rate": None,
        "success_rate_counting_exceptions": None,
    },
    {
        "start": "2024-05-01T10:00:00Z",
        "final": 7,
        "succeeded": 4,
        "refused_consumer_choice": 2,
        "success_rate": 0.5714,
        "success_rate_counting_exceptions": 0.4444,  # 4 / (7 + 2)
    },
    {
        "start": "2024-05-01T11:00:00Z",
        "final": 0,
        "succeeded": 0,
        "refused_consumer_choice": 0,
        "success_rate": None,
        "success_rate_counting_exceptions": None,
    },
]


def figures(values: tuple[object, ...]) -> dict[str, object]:
    return dict(zip(GROUP_COLUMNS, values, strict=True))


async def test_json_matches_hand_computed_figures(outcome_location):
    document = json.loads(render_json(await fixture_report(outcome_location)))
    assert document == {
        "period": {
            "since": "2024-05-01T09:00:00Z",
            "until": "2024-05-01T12:00:00Z",
            "granularity": "hour",
            "target_response_seconds": 30.0,
            "generated_at": "2024-05-01T13:00:00Z",
        },
        "totals": figures(TOTALS),
        "by_category": [{"category": k} | figures(v) for k, v in BY_CATEGORY.items()],
        "by_srv": [{"srv": s, "category": c} | figures(v) for (s, c), v in BY_SRV.items()],
        "by_role": [{"role": k} | figures(v) for k, v in BY_ROLE.items()],
        "by_user": [{"user": k} | figures(v) for k, v in BY_USER.items()],
        "installation": INSTALLATION,
        "timeline": TIMELINE,
    }


async def test_rows_hourly_and_daily_counts_give_the_same_figures(outcome_location):
    """Each period below is read from a different source; the figures must not depend on it."""
    sections = ("totals", "by_category", "by_srv", "by_role", "by_user", "installation")
    hourly = json.loads(render_json(await fixture_report(outcome_location)))  # whole hours: outcome_hourly
    rows_only = Period(T0 + timedelta(seconds=30), T0 + timedelta(minutes=30))
    assert [read.rollup for read in plan_reads(rows_only)] == [None]
    from_rows = json.loads(render_json(await fixture_report(outcome_location, rows_only)))
    week = Period(datetime(2024, 4, 28, 6, tzinfo=UTC), datetime(2024, 5, 4, 6, 30, tzinfo=UTC))
    assert [read.rollup for read in plan_reads(week)] == [Rollup.HOURLY, Rollup.DAILY, Rollup.HOURLY, None]
    daily = json.loads(render_json(await fixture_report(outcome_location, week)))
    for section in sections:
        assert from_rows[section] == hourly[section], section
        assert daily[section] == hourly[section], section
    assert daily["period"]["granularity"] == "day"
    assert [p["start"] for p in daily["timeline"]] == [f"2024-{d}T00:00:00Z" for d in DAYS]
    assert [p["final"] for p in daily["timeline"]] == [0, 0, 0, 7, 0, 0, 0]


DAYS = ("04-28", "04-29", "04-30", "05-01", "05-02", "05-03", "05-04")


@given(
    # hypothesis bounds are naive by its API; the drawn values carry UTC
    st.datetimes(datetime(2024, 1, 1), datetime(2024, 12, 31), timezones=st.just(UTC)),  # noqa: DTZ001
    st.timedeltas(timedelta(seconds=1), timedelta(days=40)),
)
@example(datetime(2024, 1, 1, tzinfo=UTC), timedelta(hours=1))  # found by hypothesis: charted per minute
def test_reads_tile_the_period_with_rows_only_for_partial_hours(since, length):
    period = Period(since, since + length)
    reads = plan_reads(period)
    assert reads[0].since == period.since
    assert reads[-1].until == period.until
    for before, after in itertools.pairwise(reads):
        assert before.until == after.since
    if period.granularity is Granularity.MINUTE:  # charted per minute: two hours at most, all rows
        assert reads == (Read(None, period.since, period.until),)
        return
    for read in reads:
        assert read.since < read.until
        if read.rollup is None:
            # rows are read only where no whole clock hour fits (at most one partial hour each side)
            hour = read.since.replace(minute=0, second=0, microsecond=0)
            next_whole_hour = hour if hour == read.since else hour + timedelta(hours=1)
            assert read.until < next_whole_hour + timedelta(hours=1)
        elif read.rollup is Rollup.HOURLY:
            assert read.since.minute == read.since.second == read.since.microsecond == 0
            assert read.until.minute == read.until.second == read.until.microsecond == 0
        else:
            assert read.since.hour == read.until.hour == 0
    if period.granularity is Granularity.DAY:  # at most two partial days of hours
        assert sum((r.until - r.since for r in reads if r.rollup is Rollup.HOURLY), timedelta()) < timedelta(
            days=2
        )


CSV = """\
# period
since,until,granularity,target_response_seconds,generated_at
2024-05-01T09:00:00Z,2024-05-01T12:00:00Z,hour,30.0,2024-05-01T13:00:00Z

# totals
requests,forwarded,succeeded,failed,timed_out,pending,rejected,handled_locally,refused_flag_request,success_rate,refused_consumer_choice,within_target_share
14,8,4,1,2,1,2,1,1,0.5714,2,0.5714

# by_category
category,requests,forwarded,succeeded,failed,timed_out,pending,rejected,handled_locally,refused_flag_request,success_rate,refused_consumer_choice,within_target_share
consumer-choice-flag,2,0,0,0,0,0,0,1,1,,0,
consumption,8,5,2,1,1,1,1,0,0,0.5,2,0.75
firmware,2,2,1,0,1,0,0,0,0,0.5,0,0.0
security,1,1,1,0,0,0,0,0,0,1.0,0,1.0
,1,0,0,0,0,0,1,0,0,,0,

# by_srv
srv,category,requests,forwarded,succeeded,failed,timed_out,pending,rejected,handled_locally,refused_flag_request,success_rate,refused_consumer_choice,within_target_share
4.1.1,consumption,3,2,1,1,0,0,0,0,0,0.5,1,1.0
4.8.1,consumption,5,3,1,0,1,1,1,0,0,0.5,1,0.5
6.15.1,security,1,1,1,0,0,0,0,0,0,1.0,0,1.0
8.15.1,consumer-choice-flag,2,0,0,0,0,0,0,1,1,,0,
11.2,firmware,2,2,1,0,1,0,0,0,0,0.5,0,0.0
99.9,,1,0,0,0,0,0,1,0,0,,0,

# by_role
role,requests,forwarded,succeeded,failed,timed_out,pending,rejected,handled_locally,refused_flag_request,success_rate,refused_consumer_choice,within_target_share
GS,3,3,1,0,1,1,0,0,0,0.5,0,0.5
IS,7,5,3,1,1,0,0,0,0,0.6,2,0.6
,4,0,0,0,0,0,2,1,1,,0,

# by_user
user,requests,forwarded,succeeded,failed,timed_out,pending,rejected,handled_locally,refused_flag_request,success_rate,refused_consumer_choice,within_target_share
90-B3-D5-1F-30-01-00-00,8,5,3,1,1,0,0,1,0,0.6,2,0.6
90-B3-D5-1F-30-01-00-01,4,3,1,0,1,1,0,0,1,0.5,0,0.5
90-B3-D5-1F-30-02-00-00,2,0,0,0,0,0,2,0,0,,0,

# installation
supplier,device_type,installed,communicating_normally,reduced_communications
90-B3-D5-1F-30-01-00-00,ESME,2,1,1
90-B3-D5-1F-30-01-00-01,ESME,1,1,0
90-B3-D5-1F-30-01-00-01,GSME,3,2,1

# timeline
start,final,succeeded,refused_consumer_choice,success_rate,success_rate_counting_exceptions
2024-05-01T09:00:00Z,0,0,0,,
2024-05-01T10:00:00Z,7,4,2,0.5714,0.4444
2024-05-01T11:00:00Z,0,0,0,,
"""


async def test_csv_matches_hand_computed_figures(outcome_location):
    tables = csv_tables(await fixture_report(outcome_location))
    assert tuple(tables) == TABLES
    assert "\n".join(f"# {name}\n{text}" for name, text in tables.items()) == CSV


TABLE = """\
MP169 Service Request outcomes  2024-05-01T09:00:00Z to 2024-05-01T12:00:00Z
All Service Requests
┏━━━━━━━━━━┳━━━━━┳━━━━┳━━━━━━━━┳━━━━━━━━━┳━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━┳━━━━━━━━━━━━━━┳━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━━━┓
┃ Requests ┃ Fwd ┃ OK ┃ Failed ┃ Timeout ┃ Pending ┃ Rejected ┃ Local ┃ Flag refused ┃ Success ┃ Excluded ┃ In time ┃
┡━━━━━━━━━━╇━━━━━╇━━━━╇━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━╇━━━━━━━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━┩
│       14 │   8 │  4 │      1 │       2 │       1 │        2 │     1 │            1 │   57.1% │        2 │   57.1% │
└──────────┴─────┴────┴────────┴─────────┴─────────┴──────────┴───────┴──────────────┴─────────┴──────────┴─────────┘
By SRV category
┏━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━┳━━━━━┳━━━━┳━━━━━━━━┳━━━━━━━━━┳━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━┳━━━━━━━━━━━━━━┳━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━━━┓
┃ Category             ┃ Requests ┃ Fwd ┃ OK ┃ Failed ┃ Timeout ┃ Pending ┃ Rejected ┃ Local ┃ Flag refused ┃ Success ┃ Excluded ┃ In time ┃
┡━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━╇━━━━━╇━━━━╇━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━╇━━━━━━━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━┩
│ consumer-choice-flag │        2 │   0 │  0 │      0 │       0 │       0 │        0 │     1 │            1 │       - │        0 │       - │
│ consumption          │        8 │   5 │  2 │      1 │       1 │       1 │        1 │     0 │            0 │   50.0% │        2 │   75.0% │
│ firmware             │        2 │   2 │  1 │      0 │       1 │       0 │        0 │     0 │            0 │   50.0% │        0 │    0.0% │
│ security             │        1 │   1 │  1 │      0 │       0 │       0 │        0 │     0 │            0 │  100.0% │        0 │  100.0% │
│ -                    │        1 │   0 │  0 │      0 │       0 │       0 │        1 │     0 │            0 │       - │        0 │       - │
└──────────────────────┴──────────┴─────┴────┴────────┴─────────┴─────────┴──────────┴───────┴──────────────┴─────────┴──────────┴─────────┘
By SRV
┏━━━━━━━━┳━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━┳━━━━━┳━━━━┳━━━━━━━━┳━━━━━━━━━┳━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━┳━━━━━━━━━━━━━━┳━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━━━┓
┃ SRV    ┃ Category             ┃ Requests ┃ Fwd ┃ OK ┃ Failed ┃ Timeout ┃ Pending ┃ Rejected ┃ Local ┃ Flag refused ┃ Success ┃ Excluded ┃ In time ┃
┡━━━━━━━━╇━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━╇━━━━━╇━━━━╇━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━╇━━━━━━━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━┩
│ 4.1.1  │ consumption          │        3 │   2 │  1 │      1 │       0 │       0 │        0 │     0 │            0 │   50.0% │        1 │  100.0% │
│ 4.8.1  │ consumption          │        5 │   3 │  1 │      0 │       1 │       1 │        1 │     0 │            0 │   50.0% │        1 │   50.0% │
│ 6.15.1 │ security             │        1 │   1 │  1 │      0 │       0 │       0 │        0 │     0 │            0 │  100.0% │        0 │  100.0% │
│ 8.15.1 │ consumer-choice-flag │        2 │   0 │  0 │      0 │       0 │       0 │        0 │     1 │            1 │       - │        0 │       - │
│ 11.2   │ firmware             │        2 │   2 │  1 │      0 │       1 │       0 │        0 │     0 │            0 │   50.0% │        0 │    0.0% │
│ 99.9   │ -                    │        1 │   0 │  0 │      0 │       0 │       0 │        1 │     0 │            0 │       - │        0 │       - │
└────────┴──────────────────────┴──────────┴─────┴────┴────────┴─────────┴─────────┴──────────┴───────┴──────────────┴─────────┴──────────┴─────────┘
By user role
┏━━━━━━┳━━━━━━━━━━┳━━━━━┳━━━━┳━━━━━━━━┳━━━━━━━━━┳━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━┳━━━━━━━━━━━━━━┳━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━━━┓
┃ Role ┃ Requests ┃ Fwd ┃ OK ┃ Failed ┃ Timeout ┃ Pending ┃ Rejected ┃ Local ┃ Flag refused ┃ Success ┃ Excluded ┃ In time ┃
┡━━━━━━╇━━━━━━━━━━╇━━━━━╇━━━━╇━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━╇━━━━━━━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━┩
│ GS   │        3 │   3 │  1 │      0 │       1 │       1 │        0 │     0 │            0 │   50.0% │        0 │   50.0% │
│ IS   │        7 │   5 │  3 │      1 │       1 │       0 │        0 │     0 │            0 │   60.0% │        2 │   60.0% │
│ -    │        4 │   0 │  0 │      0 │       0 │       0 │        2 │     1 │            1 │       - │        0 │       - │
└──────┴──────────┴─────┴────┴────────┴─────────┴─────────┴──────────┴───────┴──────────────┴─────────┴──────────┴─────────┘
By user
┏━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━┳━━━━━┳━━━━┳━━━━━━━━┳━━━━━━━━━┳━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━┳━━━━━━━━━━━━━━┳━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━━━┓
┃ User                    ┃ Requests ┃ Fwd ┃ OK ┃ Failed ┃ Timeout ┃ Pending ┃ Rejected ┃ Local ┃ Flag refused ┃ Success ┃ Excluded ┃ In time ┃
┡━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━╇━━━━━╇━━━━╇━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━╇━━━━━━━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━┩
│ 90-B3-D5-1F-30-01-00-00 │        8 │   5 │  3 │      1 │       1 │       0 │        0 │     1 │            0 │   60.0% │        2 │   60.0% │
│ 90-B3-D5-1F-30-01-00-01 │        4 │   3 │  1 │      0 │       1 │       1 │        0 │     0 │            1 │   50.0% │        0 │   50.0% │
│ 90-B3-D5-1F-30-02-00-00 │        2 │   0 │  0 │      0 │       0 │       0 │        2 │     0 │            0 │       - │        0 │       - │
└─────────────────────────┴──────────┴─────┴────┴────────┴─────────┴─────────┴──────────┴───────┴──────────────┴─────────┴──────────┴─────────┘
Success = OK / (OK + Failed + Timeout), over forwarded requests with a device outcome. Excluded = refused for consumer choice (MP169 exceptions, E169): not
failures, left out of Success and In time. In time = the device answered within 30 s. Rejected = invalid or unauthorised. Local = answered by the gateway itself
(flag set or clear, 8.2 Read Inventory); Flag refused = a flag request the gateway refused (E3, E19, E0815nn). Not counted here, having no trustworthy
originator: spoofed requests (E1, RequestID originator not the topic's user; answered to the topic's user) and unparseable input (dead letters on the
dead-letter topic); the gateway's metrics count both (mp169_requests_total, mp169_deadletters_total).
Installed SMETS2 meters (Commissioned) per responsible supplier
┏━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━┳━━━━━━━━━━━┳━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━┓
┃ Supplier                ┃ Type ┃ Installed ┃ Communicating ┃ Reduced comms ┃
┡━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━╇━━━━━━━━━━━╇━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━┩
│ 90-B3-D5-1F-30-01-00-00 │ ESME │         2 │             1 │             1 │
│ 90-B3-D5-1F-30-01-00-01 │ ESME │         1 │             1 │             0 │
│ 90-B3-D5-1F-30-01-00-01 │ GSME │         3 │             2 │             1 │
│ Total                   │      │         6 │             4 │             2 │
└─────────────────────────┴──────┴───────────┴───────────────┴───────────────┘
Installed = Communicating + Reduced comms (communications reduced by consumer choice, MP169: installed all the same).
"""


async def test_table_matches_hand_computed_figures(outcome_location):
    console = Console(record=True, width=160, color_system=None)
    render_table(await fixture_report(outcome_location), console)
    assert "".join(f"{line.rstrip()}\n" for line in console.export_text().splitlines()) == TABLE


async def test_short_report(outcome_location):
    assert short_report(await fixture_report(outcome_location)) == (
        "Service Requests: 14 (8 forwarded: 4 succeeded, 1 failed, 2 timed out, 1 pending; "
        "2 refused for consumer choice; 2 rejected; 1 handled locally; 1 flag requests refused)\n"
        "Success rate 57.1% of 7 device outcomes, 2 consumer-choice exceptions excluded; within 30 s: 57.1%\n"
        "Installed SMETS2 meters: 6 (4 communicating normally, 2 with reduced communications by consumer choice)"
    )


# -- the MP169 exception rule --------------------------------------------------------------------------

USERS = (S1, S2, ED)
SRVS = (("4.8.1", "consumption"), ("4.1.1", "consumption"), ("11.2", "firmware"), ("99.9", None))


@st.composite
def records(draw: st.DrawFn, *, consumer_choice: bool = False) -> OutcomeRecord:
    user = draw(st.sampled_from(USERS))
    srv, category = draw(st.sampled_from(SRVS))
    minute = draw(st.integers(0, 179))
    received_at = DAY.since + timedelta(minutes=minute)
    if consumer_choice:
        # Refused at once, or forwarded and its answer withheld (the flag was set before it came).
        decision, code, outcome = draw(
            st.sampled_from([("refuse", "E169", None), ("forward", "I99", "withheld")])
        )
    else:
        decision, code = draw(
            st.sampled_from(
                [("forward", "I99"), ("reject", "E4"), ("handle-locally", "I0"), ("refuse", "E169")]
            )
        )
        outcome = (
            draw(st.sampled_from([None, "success", "failure", "timeout", "withheld"]))
            if decision == "forward"
            else None
        )
    delay = draw(st.integers(0, 60))
    return OutcomeRecord(
        request_id=f"{user}:{E2}:{draw(st.integers(0, 10**6))}",
        originator=user,
        role=draw(st.sampled_from(["IS", "GS", None])),
        target=E2,
        srv=srv,
        category=category,
        command_variant=1,
        received_at=received_at,
        decision=decision,
        response_code=code,
        reason="x",
        device_outcome=outcome,
        device_response_code=None,
        answered_at=None if outcome is None else received_at + timedelta(seconds=delay),
        flagged=consumer_choice,
    )


def rates(report) -> dict[tuple[str, tuple[str | None, ...]], tuple[float | None, float | None]]:
    found = {("totals", ()): (report.totals.success_rate, report.totals.within_target_share)}
    for section in report.groups:
        for row in section.rows:
            found[section.name, row.keys] = (row.tally.success_rate, row.tally.within_target_share)
    for point in report.timeline:
        found["timeline", (point.start.isoformat(),)] = (
            point.tally.success_rate,
            point.tally.within_target_share,
        )
    return found


@given(st.lists(records(), max_size=40), records(consumer_choice=True))
def test_a_consumer_choice_refusal_never_lowers_a_success_rate(existing, refusal):
    def report(rows):
        return report_from_records(DAY, rows, (), target_response_seconds=TARGET, generated_at=T0)

    before, after = rates(report(existing)), rates(report([*existing, refusal]))
    for key, (success, within) in before.items():
        new_success, new_within = after[key]
        if success is not None:
            assert new_success is not None, key
            assert new_success >= success, key
        if within is not None:
            assert new_within is not None, key
            assert new_within >= within, key
    # The refusal is counted, as an exception.
    assert (
        report([*existing, refusal]).totals.refused_consumer_choice
        == report(existing).totals.refused_consumer_choice + 1
    )


def test_a_forwarded_request_whose_answer_was_withheld_is_a_consumer_choice_exception():
    forwarded = Tally.of_decision("forward", "I99")
    tally = forwarded + Tally.of_device_outcome("withheld", 0, 2_000, round(TARGET * 1000))
    assert tally == Tally(requests=1, refused_consumer_choice=1)
    assert (tally.final, tally.pending, tally.success_rate) == (0, 0, None)


def test_a_device_flagged_mid_period_counts_on_both_sides_of_the_flag():
    """Before 10:30 the consumption reads were forwarded (2 succeeded, 1 failed); after, refused."""
    flag_at = T0 + timedelta(minutes=30)

    def read(minute: int) -> OutcomeRecord:
        at = T0 + timedelta(minutes=minute)
        forwarded = at < flag_at
        outcome = None if not forwarded else ("failure" if minute == 20 else "success")
        return OutcomeRecord(
            request_id=f"{S1}:{E1}:{minute}",
            originator=S1,
            role="IS",
            target=E1,
            srv="4.8.1",
            category="consumption",
            command_variant=1,
            received_at=at,
            decision="forward" if forwarded else "refuse",
            response_code="I99" if forwarded else "E169",
            reason="forwarded" if forwarded else "consumer-choice",
            device_outcome=outcome,
            device_response_code=None,
            answered_at=None if outcome is None else at + timedelta(seconds=5),
            flagged=not forwarded,
        )

    rows = [
        read(m) for m in (0, 10, 20, 40, 50, 70)
    ]  # 10:00, 10:10, 10:20 | flag 10:30 | 10:40, 10:50, 11:10
    report = report_from_records(DAY, rows, (), target_response_seconds=TARGET, generated_at=T0)
    t = report.totals
    assert (t.requests, t.forwarded, t.succeeded, t.failed, t.refused_consumer_choice) == (6, 3, 2, 1, 3)
    assert t.success_rate == 2 / 3  # not 2/6: the three refusals are exceptions, not failures
    hours = {p.start.hour: p.tally for p in report.timeline}
    assert (hours[10].final, hours[10].succeeded, hours[10].refused_consumer_choice) == (3, 2, 2)
    assert hours[10].success_rate == 2 / 3
    assert hours[10].success_rate_counting_exceptions == 2 / 5
    # 11:00 holds only a refusal: no rate at all, rather than a 0% success rate.
    assert hours[11].success_rate is None
    assert hours[11].success_rate_counting_exceptions == 0.0


# -- installation ---------------------------------------------------------------------------------------


def test_installation_counts_flagged_meters_as_installed():
    rows = installation_rows(
        [
            InstalledMeters("ESME", S1, S2, flagged=False, count=5),
            InstalledMeters("ESME", S1, None, flagged=True, count=2),
            InstalledMeters("GSME", S1, S2, flagged=True, count=1),  # gas supplier is responsible
            InstalledMeters("GSME", None, None, flagged=False, count=4),  # no gas supplier on record
        ]
    )
    assert [
        (r.supplier, r.device_type, r.installed, r.communicating_normally, r.reduced_communications)
        for r in rows
    ] == [
        (S1, "ESME", 7, 5, 2),
        (S2, "GSME", 1, 0, 1),
        (None, "GSME", 4, 4, 0),
    ]


async def test_report_without_outcome_tables_is_empty_but_counts_installations(outcome_location):
    path = outcome_location
    await write_inventory(path)
    report = await load_report(path, DAY, target_response_seconds=TARGET, generated_at=T0)
    assert report.totals == Tally()
    assert sum(r.installed for r in report.installation) == 6


# -- command line ---------------------------------------------------------------------------------------


def test_command_writes_json_and_html(tmp_path, outcome_location, capsys):
    location = fixture_database(outcome_location)
    capsys.readouterr()  # the recorder's own log lines
    config = tmp_path / "config.toml"
    if is_postgres(location):  # as `mp169 run` is configured: the store holds the outcomes
        config.write_text(f'[store]\nurl = "{location}"\n')
    else:  # the fixture keeps outcomes and flags in one file
        config.write_text(f'[store]\npath = "{location}"\n[outcomes]\npath = "{location}"\n')
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    html = tmp_path / "report.html"
    args = parser.parse_args(
        [
            "report",
            "--config",
            str(config),
            "--since",
            "2024-05-01T09:00",
            "--until",
            "2024-05-01T12:00:00Z",
            "--format",
            "json",
            "--html",
            str(html),
        ]
    )
    assert args.handler(args) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["totals"] == figures(TOTALS)
    assert 'id="chart-success-rate"' in html.read_text()


def test_command_refuses_a_missing_database(tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\npath = "{tmp_path / "absent.sqlite3"}"\n')
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["report", "--config", str(config)])
    assert args.handler(args) == 1
    assert "no outcome database" in capsys.readouterr().err


def report_command(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["report", *argv])
    status: int = args.handler(args)
    return status


def fixture_database(location: Location) -> Location:
    """The fixture's database: outcomes, inventory and flags in one SQLite file or PostgreSQL database."""
    asyncio.run(fixture_report(location))
    return location


UNTIL = "2024-05-01T12:00:00Z"


def where(location: Location) -> tuple[str, ...]:
    """The options naming the fixture's database: a SQLite store and its outcome file, or the
    PostgreSQL store's URL alone."""
    if is_postgres(location):
        return ("--store", str(location))
    return ("--store", str(location), "--outcomes", str(location))


def on(location: Location) -> tuple[str, ...]:
    """The report's options for the fixture's database, up to the end of its period."""
    return (*where(location), "--until", UNTIL)


def test_no_figure_is_cut_in_an_80_column_terminal(outcome_location, capsys, monkeypatch):
    database = fixture_database(outcome_location)
    capsys.readouterr()
    for columns in ("80", "60", "40"):
        monkeypatch.setenv("COLUMNS", columns)
        assert report_command(*on(database)) == 0
        out = capsys.readouterr().out
        assert "…" not in out
        assert all(len(line) <= int(columns) for line in out.splitlines())
        for expected in ("14", "57.1%", "Flag refused", "90-B3-D5-1F-30-01-00-01"):
            assert expected in out, (columns, expected)


def test_store_and_outcomes_options_name_the_databases(outcome_location, capsys):
    database = fixture_database(outcome_location)
    capsys.readouterr()
    assert report_command(*on(database), "--format", "json") == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["totals"] == figures(TOTALS)
    if is_postgres(database):
        assert f"outcomes and store: {database} (store.url from command line)" in err
    else:
        assert f"outcomes {database} (outcomes.path from command line)" in err
        assert f"store {database} (store.path from command line)" in err


def test_outcomes_option_is_refused_with_a_postgresql_store(postgres_url, tmp_path, capsys):
    assert report_command("--store", postgres_url, "--outcomes", str(tmp_path / "o.sqlite3")) == 2
    assert "--outcomes is for a SQLite gateway" in capsys.readouterr().err


def test_an_unreachable_postgresql_store_is_named_not_a_traceback(capsys):
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/mp169"
    assert report_command("--store", url, "--since", "2024-05-01", "--until", UNTIL) == 1
    err = capsys.readouterr().err
    assert f"cannot read {url}" in err
    assert "Traceback" not in err


def test_plain_report_after_a_demo_reports_the_demo(tmp_path, capsys, monkeypatch):
    database = fixture_database(tmp_path / "mp169.sqlite3")  # the demo runs on SQLite
    capsys.readouterr()
    demo = tmp_path / "work" / "var" / "demo"
    demo.mkdir(parents=True)
    (demo / "mp169-outcomes.sqlite3").write_bytes(database.read_bytes())
    (demo / "mp169.sqlite3").write_bytes(database.read_bytes())
    monkeypatch.chdir(tmp_path / "work")  # no config.toml, nothing at var/mp169-outcomes.sqlite3
    assert report_command("--until", UNTIL, "--format", "json") == 0
    out, err = capsys.readouterr()
    assert "reporting the last `mp169 demo`" in err
    assert f"store {demo / 'mp169.sqlite3'} (store.path from the last `mp169 demo`)" in err
    document = json.loads(out)
    assert document["totals"] == figures(TOTALS)
    assert document["installation"] == INSTALLATION


def test_without_since_the_period_is_the_recorded_requests_charted_per_minute(outcome_location, capsys):
    database = fixture_database(outcome_location)
    capsys.readouterr()
    assert report_command(*on(database), "--format", "json") == 0
    document = json.loads(capsys.readouterr().out)
    # First request 10:01, last 10:19:50: whole minutes, one either side.
    assert (document["period"]["since"], document["period"]["until"]) == (
        "2024-05-01T10:00:00Z",
        "2024-05-01T10:21:00Z",
    )
    assert document["period"]["granularity"] == "minute"
    timeline = document["timeline"]
    assert len(timeline) == 21
    assert timeline[0]["start"] == "2024-05-01T10:00:00Z"
    assert sum(point["final"] for point in timeline) == 7
    assert [p["refused_consumer_choice"] for p in timeline if p["refused_consumer_choice"]] == [1, 1]


def test_granularity_follows_the_period():
    def granularity(length: timedelta) -> Granularity:
        return Period(T0, T0 + length).granularity

    assert granularity(timedelta(minutes=3)) is Granularity.MINUTE
    assert granularity(timedelta(hours=2)) is Granularity.MINUTE
    assert granularity(timedelta(days=1)) is Granularity.HOUR
    assert granularity(timedelta(days=3)) is Granularity.DAY
    assert plan_reads(Period(T0, T0 + timedelta(hours=2))) == (Read(None, T0, T0 + timedelta(hours=2)),)


def test_csv_writes_one_file_per_table_or_the_table_named(tmp_path, outcome_location, capsys):
    database = fixture_database(outcome_location)
    capsys.readouterr()
    common = (*on(database), "--since", "2024-05-01T09:00")
    out_dir = tmp_path / "csv" / "new"
    assert report_command(*common, "--format", "csv", "--out", str(out_dir)) == 0
    written = {path.stem: path.read_text() for path in out_dir.glob("*.csv")}
    assert set(written) == set(TABLES)
    # The same tables as the fixture's CSV, but for the period's generated_at (now).
    assert "\n".join(f"# {name}\n{written[name]}" for name in TABLES[1:]) == CSV[CSV.index("# totals") :]
    assert written["period"].startswith("since,until,granularity,target_response_seconds,generated_at\n")
    capsys.readouterr()
    assert report_command(*common, "--format", "csv", "--table", "by_user") == 0
    assert capsys.readouterr().out == written["by_user"]
    assert report_command(*common, "--format", "csv") == 2
    assert "--out DIR, or --table NAME" in capsys.readouterr().err
    assert report_command(*common, "--table", "by_user") == 2


def test_html_into_a_missing_directory_creates_it(tmp_path, outcome_location, capsys):
    on_fixture = on(fixture_database(outcome_location))
    capsys.readouterr()
    html = tmp_path / "reports" / "2024" / "report.html"
    assert report_command(*on_fixture, "--html", str(html), "--format", "json") == 0
    assert 'id="chart-success-rate"' in html.read_text()
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert report_command(*on_fixture, "--html", str(blocked / "r.html"), "--format", "json") == 1
    assert f"cannot write {blocked / 'r.html'}" in capsys.readouterr().err


def test_an_outcome_database_of_an_older_schema_is_named_not_a_traceback(outcome_location, capsys):
    path = outcome_location
    asyncio.run(migrate_to_first_version(path))
    assert report_command(*where(path), "--since", "2024-05-01", "--until", UNTIL) == 1
    assert "schema version 1, this report needs 2" in capsys.readouterr().err


def test_a_sqlite_store_given_wins_over_a_configured_postgresql_group(tmp_path, capsys):
    database = fixture_database(tmp_path / "mp169.sqlite3")
    capsys.readouterr()
    config = tmp_path / "config.toml"
    config.write_text(
        '[store]\nurl = "postgresql://mp169@127.0.0.1:1/absent"\n[topics]\nshared_group = "gw"\n'
    )
    assert report_command("--config", str(config), *on(database), "--format", "json") == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["totals"] == figures(TOTALS)
    assert f"store {database} (store.path from command line)" in err
