"""The outcome database's schema: migrations, the stored record, and how values are encoded.

Storage (component "outcomes" of the shared migrations table):
- `outcomes`: one row per request. EUIs are stored as small integer ids (`outcome_parties`) and
  times as integer milliseconds since the Unix epoch (UTC): a year of 100,000 devices is tens of
  millions of rows, and this keeps each row and its indexes small. The view `outcome_records` shows
  the rows with EUIs, the RequestID and ISO-8601 times for people and ad-hoc queries.
- `outcome_hourly`, `outcome_daily`: counts per UTC hour and per UTC day of the requests' arrival,
  user, role, SRV and category, maintained in the same transaction as the rows, so a report reads
  rows only for the partial hours at the ends of its period.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

COMPONENT = "outcomes"

# Each entry is one migration (a SQL script) of component "outcomes"; its version is its position + 1.
# Append new migrations; never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE outcome_parties (
        party_id INTEGER PRIMARY KEY,
        eui TEXT NOT NULL UNIQUE
    );
    CREATE TABLE outcomes (
        id INTEGER PRIMARY KEY,
        originator_id INTEGER NOT NULL REFERENCES outcome_parties (party_id),
        target_id INTEGER NOT NULL REFERENCES outcome_parties (party_id),
        counter INTEGER NOT NULL,  -- RequestID counter; u64 stored as its signed 64-bit pattern
        role TEXT,
        srv TEXT,
        category TEXT,
        command_variant INTEGER,
        received_at INTEGER NOT NULL,  -- ms since the Unix epoch, UTC
        decision TEXT NOT NULL,  -- forward | refuse | reject | handle-locally
        response_code TEXT NOT NULL,
        reason TEXT NOT NULL,
        device_outcome TEXT,  -- success | failure | timeout; NULL while pending or not forwarded
        device_response_code TEXT,
        answered_at INTEGER,
        flagged INTEGER NOT NULL  -- a concerned device was flagged at decision time
    );
    -- Device outcomes find their request by RequestID; the target and counter nearly identify it.
    CREATE INDEX outcomes_request ON outcomes (target_id, counter);
    CREATE INDEX outcomes_received ON outcomes (received_at);
    -- Small: only forwarded requests still waiting for their device.
    CREATE INDEX outcomes_pending ON outcomes (received_at)
        WHERE decision = 'forward' AND device_outcome IS NULL;
    -- Counts of the requests that arrived in each UTC hour / day (the rollups), kept with the rows.
    CREATE TABLE outcome_hourly (
        start TEXT NOT NULL,  -- YYYY-MM-DDTHH:00
        originator TEXT NOT NULL,
        role TEXT NOT NULL,  -- '' when none
        srv TEXT NOT NULL,  -- '' when unknown
        category TEXT NOT NULL,  -- '' when unknown
        requests INTEGER NOT NULL DEFAULT 0,
        forwarded INTEGER NOT NULL DEFAULT 0,
        succeeded INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        timed_out INTEGER NOT NULL DEFAULT 0,
        refused_consumer_choice INTEGER NOT NULL DEFAULT 0,
        rejected INTEGER NOT NULL DEFAULT 0,
        handled_locally INTEGER NOT NULL DEFAULT 0,
        within_target INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (start, originator, role, srv, category)
    ) WITHOUT ROWID;
    CREATE TABLE outcome_daily (
        start TEXT NOT NULL,  -- YYYY-MM-DD
        originator TEXT NOT NULL,
        role TEXT NOT NULL,
        srv TEXT NOT NULL,
        category TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        forwarded INTEGER NOT NULL DEFAULT 0,
        succeeded INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        timed_out INTEGER NOT NULL DEFAULT 0,
        refused_consumer_choice INTEGER NOT NULL DEFAULT 0,
        rejected INTEGER NOT NULL DEFAULT 0,
        handled_locally INTEGER NOT NULL DEFAULT 0,
        within_target INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (start, originator, role, srv, category)
    ) WITHOUT ROWID;
    CREATE VIEW outcome_records AS
    SELECT o.id,
           printf('%s:%s:%llu', op.eui, tp.eui, o.counter) AS request_id,
           op.eui AS originator, o.role, tp.eui AS target, o.srv, o.category, o.command_variant,
           strftime('%Y-%m-%dT%H:%M:%fZ', o.received_at / 1000.0, 'unixepoch') AS received_at,
           o.decision, o.response_code, o.reason, o.device_outcome, o.device_response_code,
           strftime('%Y-%m-%dT%H:%M:%fZ', o.answered_at / 1000.0, 'unixepoch') AS answered_at,
           o.flagged
    FROM outcomes AS o
    JOIN outcome_parties AS op ON op.party_id = o.originator_id
    JOIN outcome_parties AS tp ON tp.party_id = o.target_id;
    """,
    # 2: refused flag requests get their own count; they were counted as handled locally. Rows and
    # count tables are purged together, so the rows still present correct every count left.
    """
    ALTER TABLE outcome_hourly ADD COLUMN refused_flag_request INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE outcome_daily ADD COLUMN refused_flag_request INTEGER NOT NULL DEFAULT 0;
    CREATE TEMP TABLE refused_flag_cells AS
    SELECT strftime('%Y-%m-%dT%H:00', o.received_at / 1000, 'unixepoch') AS start, p.eui AS originator,
           coalesce(o.role, '') AS role, coalesce(o.srv, '') AS srv, coalesce(o.category, '') AS category,
           count(*) AS refused
    FROM outcomes AS o JOIN outcome_parties AS p ON p.party_id = o.originator_id
    WHERE o.decision = 'handle-locally' AND o.response_code <> 'I0'
    GROUP BY 1, 2, 3, 4, 5;
    UPDATE outcome_hourly SET refused_flag_request = r.refused, handled_locally = handled_locally - r.refused
    FROM refused_flag_cells AS r
    WHERE outcome_hourly.start = r.start AND outcome_hourly.originator = r.originator
      AND outcome_hourly.role = r.role AND outcome_hourly.srv = r.srv
      AND outcome_hourly.category = r.category;
    UPDATE outcome_daily SET refused_flag_request = r.refused, handled_locally = handled_locally - r.refused
    FROM (SELECT substr(start, 1, 10) AS day, originator, role, srv, category, sum(refused) AS refused
          FROM refused_flag_cells GROUP BY 1, 2, 3, 4, 5) AS r
    WHERE outcome_daily.start = r.day AND outcome_daily.originator = r.originator
      AND outcome_daily.role = r.role AND outcome_daily.srv = r.srv
      AND outcome_daily.category = r.category;
    DROP TABLE refused_flag_cells;
    """,
)

# The same schema in PostgreSQL (gateway/postgres.py's database, component "outcomes"), version for
# version: several gateway instances record into it. Its own types (bigint ids by identity, boolean
# flagged); times and counters encoded as in SQLite, so one codec serves both. Append; never edit.
_PG_COUNTS = """
        requests integer NOT NULL DEFAULT 0,
        forwarded integer NOT NULL DEFAULT 0,
        succeeded integer NOT NULL DEFAULT 0,
        failed integer NOT NULL DEFAULT 0,
        timed_out integer NOT NULL DEFAULT 0,
        refused_consumer_choice integer NOT NULL DEFAULT 0,
        rejected integer NOT NULL DEFAULT 0,
        handled_locally integer NOT NULL DEFAULT 0,
        within_target integer NOT NULL DEFAULT 0,"""
_PG_HOUR = "to_char(to_timestamp(o.received_at / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:00')"
_PG_ISO = "to_char(to_timestamp({} / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
PG_MIGRATIONS: tuple[str, ...] = (
    f"""
    CREATE TABLE outcome_parties (
        party_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        eui text NOT NULL UNIQUE
    );
    CREATE TABLE outcomes (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        originator_id bigint NOT NULL REFERENCES outcome_parties (party_id),
        target_id bigint NOT NULL REFERENCES outcome_parties (party_id),
        counter bigint NOT NULL,
        role text,
        srv text,
        category text,
        command_variant integer,
        received_at bigint NOT NULL,
        decision text NOT NULL,
        response_code text NOT NULL,
        reason text NOT NULL,
        device_outcome text,
        device_response_code text,
        answered_at bigint,
        flagged boolean NOT NULL
    );
    CREATE INDEX outcomes_request ON outcomes (target_id, counter);
    CREATE INDEX outcomes_received ON outcomes (received_at);
    CREATE INDEX outcomes_pending ON outcomes (received_at)
        WHERE decision = 'forward' AND device_outcome IS NULL;
    CREATE TABLE outcome_hourly (
        start text NOT NULL,
        originator text NOT NULL,
        role text NOT NULL,
        srv text NOT NULL,
        category text NOT NULL,{_PG_COUNTS}
        PRIMARY KEY (start, originator, role, srv, category)
    );
    CREATE TABLE outcome_daily (
        start text NOT NULL,
        originator text NOT NULL,
        role text NOT NULL,
        srv text NOT NULL,
        category text NOT NULL,{_PG_COUNTS}
        PRIMARY KEY (start, originator, role, srv, category)
    );
    -- PostgreSQL only: with several instances, a device's answer can reach one instance before the
    -- instance that forwarded the request has written its decision. It waits here for that row.
    CREATE TABLE outcome_early_answers (
        originator_id bigint NOT NULL,
        target_id bigint NOT NULL,
        counter bigint NOT NULL,
        outcome text NOT NULL,
        code text,
        answered_at bigint NOT NULL,
        PRIMARY KEY (target_id, counter, originator_id)
    );
    CREATE VIEW outcome_records AS
    SELECT o.id,
           op.eui || ':' || tp.eui || ':'
               || (CASE WHEN o.counter < 0 THEN o.counter + 18446744073709551616::numeric
                        ELSE o.counter END)::text AS request_id,
           op.eui AS originator, o.role, tp.eui AS target, o.srv, o.category, o.command_variant,
           {_PG_ISO.format("o.received_at")} AS received_at,
           o.decision, o.response_code, o.reason, o.device_outcome, o.device_response_code,
           {_PG_ISO.format("o.answered_at")} AS answered_at,
           o.flagged
    FROM outcomes AS o
    JOIN outcome_parties AS op ON op.party_id = o.originator_id
    JOIN outcome_parties AS tp ON tp.party_id = o.target_id;
    """,  # noqa: S608 - constant expressions
    f"""
    ALTER TABLE outcome_hourly ADD COLUMN refused_flag_request integer NOT NULL DEFAULT 0;
    ALTER TABLE outcome_daily ADD COLUMN refused_flag_request integer NOT NULL DEFAULT 0;
    CREATE TEMP TABLE refused_flag_cells ON COMMIT DROP AS
    SELECT {_PG_HOUR} AS start, p.eui AS originator,
           coalesce(o.role, '') AS role, coalesce(o.srv, '') AS srv, coalesce(o.category, '') AS category,
           count(*)::integer AS refused
    FROM outcomes AS o JOIN outcome_parties AS p ON p.party_id = o.originator_id
    WHERE o.decision = 'handle-locally' AND o.response_code <> 'I0'
    GROUP BY 1, 2, 3, 4, 5;
    UPDATE outcome_hourly AS h
    SET refused_flag_request = r.refused, handled_locally = h.handled_locally - r.refused
    FROM refused_flag_cells AS r
    WHERE h.start = r.start AND h.originator = r.originator AND h.role = r.role AND h.srv = r.srv
      AND h.category = r.category;
    UPDATE outcome_daily AS d
    SET refused_flag_request = r.refused, handled_locally = d.handled_locally - r.refused
    FROM (SELECT substr(start, 1, 10) AS day, originator, role, srv, category,
                 sum(refused)::integer AS refused
          FROM refused_flag_cells GROUP BY 1, 2, 3, 4, 5) AS r
    WHERE d.start = r.day AND d.originator = r.originator AND d.role = r.role AND d.srv = r.srv
      AND d.category = r.category;
    """,  # noqa: S608 - constant expressions
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_U64 = 2**64
_I64_MAX = 2**63 - 1


class DeviceOutcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    TIMEOUT = "timeout"
    WITHHELD = "withheld"
    """The device answered a consumption SRV for a meter flagged meanwhile: the user got E169, not
    the data; counted as a consumer-choice exception, as the user experienced it."""


def to_ms(at: datetime) -> int:
    """Milliseconds since the Unix epoch of an aware datetime."""
    if at.tzinfo is None:
        raise ValueError(f"naive datetime {at.isoformat()}: outcome times must be timezone-aware")
    return (at - _EPOCH) // _MS


def from_ms(ms: int) -> datetime:
    return _EPOCH + ms * _MS


class Rollup(StrEnum):
    """The count tables: per UTC hour and per UTC day of the requests' arrival."""

    HOURLY = "outcome_hourly"
    DAILY = "outcome_daily"

    def key(self, at: datetime) -> str:
        """The `start` of the bucket holding `at`."""
        at = at.astimezone(UTC)
        return at.strftime("%Y-%m-%dT%H:00") if self is Rollup.HOURLY else at.date().isoformat()

    @staticmethod
    def start_of(key: str) -> datetime:
        return datetime.fromisoformat(key).replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class OutcomeRecord:
    """One request's lifecycle, as recorded and as read back for reports."""

    request_id: str
    originator: str
    role: str | None
    target: str
    srv: str | None
    category: str | None
    command_variant: int | None
    received_at: datetime
    decision: str
    response_code: str
    reason: str
    device_outcome: str | None
    device_response_code: str | None
    answered_at: datetime | None
    flagged: bool


def split_request_id(request_id: str) -> tuple[str, str, int]:
    originator, target, counter = request_id.split(":")
    return originator, target, int(counter)


def signed_counter(counter: int) -> int:
    """SQLite integers are signed 64-bit: store a u64 counter above 2**63 - 1 as its bit pattern."""
    return counter - _U64 if counter > _I64_MAX else counter


def unsigned_counter(stored: int) -> int:
    """The u64 RequestID counter of a stored one."""
    return stored + _U64 if stored < 0 else stored
