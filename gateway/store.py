"""The durable store: Smart Metering Inventory, users, MP169 flags, flag history and RequestID counters.

`FlagStore` is the small async interface the gateway uses; `SqliteStore` implements it over one
SQLite file through aiosqlite (WAL, so the outcome recorder's connection and `mp169 inventory
import` from another process work beside the daemon); `gateway.postgres.PostgresStore` implements it
over PostgreSQL for several gateway instances (docs/multi-instance.md); `gateway.storage.open_store`
picks the one the configuration names. Both have the same schema versions and semantics, and every
store test runs against both.

Writes are explicit transactions (`BEGIN IMMEDIATE`): an inventory upsert is all or nothing, and
`commit` applies one batch of flag events and RequestID counters in one transaction. Every inventory
and user upsert stamps the rows it changes with the next value of one rising sequence (`change_seq`),
so a running gateway fetches only what changed since it last looked (`devices_changed_since`,
`users_changed_since`).

Schema migrations are versioned per component in `schema_migrations(component, version)`:
`migrate()` applies a component's ordered list of SQL scripts, each with its version row, in one
transaction; this module's tables are component "core", gateway.outcomes registers "outcomes".
Times are ISO-8601 UTC text, EUIs DUIS upper-case text, RequestID counters (u64) decimal text
zero-padded to 20 digits (so text order is number order and one statement can compare them).
"""

from __future__ import annotations

import asyncio
import sqlite3
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar, cast

import aiosqlite

from rules.domain import (
    ANSWER_RESPONSE,
    ANSWER_TIMEOUT,
    MAX_COUNTER,
    NOT_A_DEVICE,
    OUTCOME_ACCEPTED,
    Claim,
    DeviceRecord,
    DeviceStatus,
    DeviceType,
    Eui,
    FlagEvent,
    ForwardedRequest,
    RequestId,
    Role,
    Tariff,
    UserRecord,
    utc_now,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
    from pathlib import Path
    from types import TracebackType

CORE = "core"

# Component "core": each entry is one migration; its version is its position + 1.
# Append new migrations; never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        device_type TEXT NOT NULL,
        smets INTEGER NOT NULL,
        status TEXT NOT NULL,
        comms_hub_id TEXT,
        mpxn TEXT,
        import_supplier TEXT,
        export_supplier TEXT,
        gas_supplier TEXT,
        network_operator TEXT,
        tariff TEXT NOT NULL,
        wan INTEGER NOT NULL,
        updated_seq INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX devices_updated ON devices (updated_seq);
    -- updated_seq: as for devices, so a running gateway picks up role changes.
    CREATE TABLE users (
        user_id TEXT PRIMARY KEY,
        roles TEXT NOT NULL,
        updated_seq INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX users_updated ON users (updated_seq);
    -- One row per currently flagged device.
    CREATE TABLE flags (
        device_id TEXT PRIMARY KEY REFERENCES devices (device_id),
        set_by TEXT NOT NULL,
        set_at TEXT NOT NULL,
        request_id TEXT NOT NULL,
        consumer_reference TEXT
    ) WITHOUT ROWID;
    -- Every flag Service Request, refused ones too (for unknown devices as well: no foreign key).
    CREATE TABLE flag_history (
        id INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL,
        action TEXT NOT NULL CHECK (action IN ('set', 'clear')),
        requester TEXT NOT NULL,
        request_id TEXT NOT NULL,
        declaration INTEGER,
        consumer_reference TEXT,
        outcome TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE INDEX flag_history_device ON flag_history (device_id, id);
    CREATE TABLE request_counters (
        originator TEXT PRIMARY KEY,
        counter TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
    # 2: counters checked and advanced in one statement (`commit` returns what it advanced): padded to
    # 20 digits so SQL compares them as numbers; `previous` is the counter an advance replaced.
    """
    ALTER TABLE request_counters ADD COLUMN previous TEXT;
    UPDATE request_counters SET counter = substr('00000000000000000000' || counter, -20);
    """,
    # 3: every RequestID acted on, once: instances sharing a store (round-robin delivery, so counters
    # arrive out of order between them) act on a RequestID only if their commit recorded it first.
    """
    CREATE TABLE request_ids (
        originator TEXT NOT NULL,
        counter TEXT NOT NULL,
        accepted_at TEXT NOT NULL,
        PRIMARY KEY (originator, counter)
    ) WITHOUT ROWID;
    CREATE INDEX request_ids_accepted ON request_ids (accepted_at);
    """,
    # 4: forwarded requests waiting for their device's answer (issue 15: durable pending).
    """
    -- Forwarded requests waiting for their device's answer (written with the forward's commit,
    -- deleted once the request has its final answer: the device's, or E21 at the deadline).
    CREATE TABLE pending_requests (
        request_id TEXT PRIMARY KEY,
        originator TEXT NOT NULL,
        target TEXT NOT NULL,
        counter TEXT NOT NULL,
        srv TEXT NOT NULL,
        service_reference TEXT NOT NULL,
        deadline TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
    # 5: the gas transporter of the device's MPRN (DUIS E4: the GT's relationship to gas devices); the
    # not-responsible-supplier refusal's code is E081509, no longer DUIS's E3 (which means user status).
    """
    ALTER TABLE devices ADD COLUMN gas_transporter TEXT;
    UPDATE flag_history SET outcome = 'E081509' WHERE outcome = 'E3';
    """,
    # 6: a forward keeps its row once answered, with the answer it got (issue 12: the final answer is
    # claimed, once, by whichever instance or process gives it; a later response is known late).
    """
    ALTER TABLE pending_requests ADD COLUMN answer TEXT;
    ALTER TABLE pending_requests ADD COLUMN answered_at TEXT;
    ALTER TABLE pending_requests ADD COLUMN settled INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE pending_requests ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE pending_requests ADD COLUMN sent INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE pending_requests ADD COLUMN answered_by TEXT NOT NULL DEFAULT '';
    CREATE INDEX pending_requests_waiting ON pending_requests (deadline) WHERE answer IS NULL;
    CREATE INDEX pending_requests_answered ON pending_requests (answered_at) WHERE answer IS NOT NULL;
    """,
    # 7: a stored forward counts as sent (its command may have left): no separate sent mark.
    """
    ALTER TABLE pending_requests DROP COLUMN sent;
    """,
)

DEVICE_COLUMNS = (
    "device_id",
    "device_type",
    "smets",
    "status",
    "comms_hub_id",
    "mpxn",
    "import_supplier",
    "export_supplier",
    "gas_supplier",
    "tariff",
    "wan",
    "network_operator",
    "gas_transporter",
)
"""The devices table's columns in DeviceRecord order: both stores build their device SQL from it."""
DEVICE_COLUMN_LIST = ", ".join(DEVICE_COLUMNS)
DEVICE_UPDATES = ", ".join(f"{column} = excluded.{column}" for column in DEVICE_COLUMNS[1:])
"""The upsert's SET list: every column but the key."""
_UPSERT_DEVICE = f"""
    INSERT INTO devices ({DEVICE_COLUMN_LIST}, updated_seq)
    VALUES ({", ".join("?" * (len(DEVICE_COLUMNS) + 1))})
    ON CONFLICT (device_id) DO UPDATE SET {DEVICE_UPDATES}, updated_seq = excluded.updated_seq
    -- An unchanged row keeps its sequence number: re-importing a file costs a running gateway nothing.
    WHERE ({DEVICE_COLUMN_LIST}) IS NOT ({", ".join(f"excluded.{column}" for column in DEVICE_COLUMNS)})
"""  # noqa: S608 - the column list is this module's constant
_UPSERT_USER = """
    INSERT INTO users (user_id, roles, updated_seq) VALUES (?, ?, ?)
    ON CONFLICT (user_id) DO UPDATE SET roles = excluded.roles, updated_seq = excluded.updated_seq
    WHERE users.roles IS NOT excluded.roles
"""
_LATEST_SEQ = (
    "SELECT max(coalesce((SELECT max(updated_seq) FROM devices), 0),"
    " coalesce((SELECT max(updated_seq) FROM users), 0))"
)
_SELECT_DEVICES = f"SELECT {DEVICE_COLUMN_LIST} FROM devices"  # noqa: S608 - constant column list
# A device naming a comms hub not in the inventory, or a supplier not in the user registry: the same
# SQL on both stores.
DANGLING_REFERENCES = " UNION ALL ".join(
    [
        (
            "SELECT device_id, 'comms_hub_id', comms_hub_id FROM devices WHERE comms_hub_id IS NOT NULL"
            " AND comms_hub_id NOT IN (SELECT device_id FROM devices)"
        ),
        *(
            f"SELECT device_id, '{column}', {column} FROM devices WHERE {column} IS NOT NULL"  # noqa: S608 - fixed column names
            f" AND {column} NOT IN (SELECT user_id FROM users)"
            for column in ("import_supplier", "export_supplier", "gas_supplier")
        ),
    ]
)
_BATCH = 2_000  # rows per query when loading: small batches leave less garbage in the heap
_BUSY_TIMEOUT_MS = 30_000
_COUNTER_DIGITS = len(str(MAX_COUNTER))
T = TypeVar("T")
_COUNTER_ROWS = 5_000  # originators per counter statement (SQLite's limit is 32,766 parameters)
_RECORD_REQUEST_IDS = """
    INSERT INTO request_ids (originator, counter, accepted_at) VALUES {rows}
    ON CONFLICT (originator, counter) DO NOTHING
    RETURNING originator, counter
"""
_ADVANCE_COUNTERS = """
    INSERT INTO request_counters (originator, counter) VALUES {rows}
    ON CONFLICT (originator) DO UPDATE SET previous = request_counters.counter, counter = excluded.counter
    WHERE excluded.counter > request_counters.counter
    RETURNING originator, previous
"""

# A forward's final answer is claimed by one UPDATE, which holds only while the row is unanswered
# (or, for E21, answered E21 by a claim that was never settled and is older than the grace).
_FORWARD_COLUMNS = "originator, target, counter, srv, service_reference, deadline"
_INSERT_FORWARDS = f"""
    INSERT INTO pending_requests (request_id, {_FORWARD_COLUMNS}, owner) VALUES {{rows}}
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id
"""  # noqa: S608 - constant column list
_CLAIM_RESPONSE = f"""
    UPDATE pending_requests SET answer = ?, answered_at = ?, answered_by = ?
    WHERE request_id IN ({{marks}}) AND answer IS NULL
    RETURNING {_FORWARD_COLUMNS}
"""  # noqa: S608 - constant column list
_CLAIM_TIMEOUT = f"""
    UPDATE pending_requests SET answer = ?, answered_at = ?, answered_by = ?, settled = 0
    WHERE request_id IN ({{marks}})
        AND (answer IS NULL OR (answer = 'timeout' AND settled = 0 AND answered_at < ?))
    RETURNING {_FORWARD_COLUMNS}
"""  # noqa: S608 - constant column list
_ANSWERS = (
    "SELECT originator, target, counter, answer, answered_by FROM pending_requests"
    " WHERE request_id IN ({marks})"
)
_SETTLE = "UPDATE pending_requests SET settled = 1 WHERE request_id IN ({marks}) AND answer = 'timeout'"
_WAITING = f"""
    SELECT {_FORWARD_COLUMNS} FROM pending_requests WHERE answer IS NULL AND owner = ? ORDER BY deadline
"""  # noqa: S608 - constant column list
_OVERDUE = f"""
    SELECT {_FORWARD_COLUMNS} FROM pending_requests
    WHERE (answer IS NULL AND deadline < ?) OR (answer = 'timeout' AND settled = 0 AND answered_at < ?)
    ORDER BY deadline LIMIT ?
"""  # noqa: S608 - constant column list
_WITHDRAW = """
    DELETE FROM pending_requests WHERE request_id IN ({marks}) AND answer IS NULL AND owner = ?
    RETURNING originator, counter
"""
_PURGE_ANSWERED = (
    "DELETE FROM pending_requests WHERE answer IS NOT NULL AND answered_at < ?"
    " AND (answer = 'response' OR settled = 1)"
)
_CLAIM_ROWS = 500  # request ids (or forwards, of 8 columns) per statement


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CLAIM_ROWS):
        yield items[start : start + _CLAIM_ROWS]


def _request_id(row: Row) -> RequestId:
    return RequestId(Eui(row[0]), Eui(row[1]), int(row[2]))


def _forward_row(entry: ForwardedRequest) -> tuple[str, ...]:
    request_id = entry.request_id
    return (
        str(request_id),
        request_id.originator,
        request_id.target,
        str(request_id.counter),
        entry.srv,
        entry.service_reference,
        _time_text(entry.deadline),
    )


def _forward_from_row(row: Row) -> ForwardedRequest:
    return ForwardedRequest(_request_id(row), row[3], row[4], datetime.fromisoformat(row[5]))


# SQLite's primary result codes for "another connection holds the lock": worth trying again.
_RETRYABLE_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


class StoreCorruptError(RuntimeError):
    """The store file failed SQLite's integrity check (or is not a database): the gateway must not start."""


def retryable(exc: BaseException) -> bool:
    """A store error that may pass if tried again: the database is busy or locked by another process."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.OperationalError) and code is not None and code & 0xFF in _RETRYABLE_CODES


# -- values ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommitBatch:
    """What one transaction makes durable: flag events in order, and RequestID counters."""

    flag_events: Sequence[FlagEvent] = ()
    counters: Mapping[Eui, int] = field(default_factory=dict)
    """Highest accepted RequestID counter per originator; stored only if above the stored one."""
    request_ids: Sequence[tuple[Eui, int]] = ()
    """(originator, counter) of every request the batch acts on, each recorded once (`CommitResult.first`)."""
    forwarded: Sequence[ForwardedRequest] = ()
    """Requests forwarded to their device, now waiting for its answer (one stored already is left as it
    is: `CommitResult.stored_forwards`)."""
    answered: Sequence[RequestId] = ()
    """Forwards to claim for their device's response: claimed only if still unanswered."""
    timed_out: Sequence[RequestId] = ()
    """Forwards to claim for E21: claimed if still unanswered, or answered E21 by a claim not settled
    for `timeout_grace_seconds` (its claimer died before it could know its E21 was out)."""
    settled: Sequence[RequestId] = ()
    """Claimed E21s that have left: no sweep gives them again."""
    withdrawn: Sequence[RequestId] = ()
    """Forwards of `owner` whose commit failed and were answered STORE_FAILED (send again): if that
    commit stored them after all, they and their RequestIDs are removed (applied first)."""
    timeout_grace_seconds: float = 0.0
    owner: str = ""
    """The instance whose forwards `forwarded` are (its client id; "" for one instance alone): a
    restarted instance takes back only its own, the sweep the others' once their holder is gone."""


NO_COUNTER = -1
"""The previous counter of an originator that had none stored."""


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What a commit made of its batch's RequestID counters and flag changes.

    The counters are checked and advanced in one statement per batch, each originator's row locked by
    the store, so concurrent commits (other gateway instances, with PostgreSQL) never both take a
    counter: a request in the batch may be forwarded only if `fresh` says so.
    """

    advanced: Mapping[Eui, int]
    """Each originator whose stored counter this commit raised, with the counter stored before it
    (NO_COUNTER: none). An originator of the batch that is missing was not advanced: another commit
    already stored its counter or a higher one."""
    flag_epoch: int | None = None
    """The flag epoch this commit's flag changes made (PostgreSQL); None: it changed no flag, or the
    store has no epochs (SQLite: one instance, nothing to wait for)."""
    recorded: frozenset[tuple[Eui, int]] = frozenset()
    """The batch's `request_ids` this commit recorded; the others were recorded before, by another
    instance (or by this process before a restart)."""
    claimed: Mapping[RequestId, Claim] = field(default_factory=dict)
    """The batch's `answered` and `timed_out` forwards whose final answer this commit claimed."""
    answers: Mapping[RequestId, str] = field(default_factory=dict)
    """The others' final answer, given already (ANSWER_RESPONSE, ANSWER_TIMEOUT); missing: no such
    forward is stored."""
    answered_here: frozenset[RequestId] = frozenset()
    """Of `answers`: those this commit's owner claimed, in an earlier commit (whose outcome it may not
    have heard: the connection dropped as it committed)."""
    stored_forwards: frozenset[RequestId] = frozenset()
    """The batch's `forwarded` that were stored before it (by an earlier process or another instance):
    their command may have left, so it is not sent again (at most once to the device). The stored one
    keeps its deadline and owner."""

    def first(self, originator: Eui, counter: int) -> bool:
        """Whether this commit recorded the RequestID, so no other commit acts on it (exact, whatever
        order the instances received the counters in)."""
        return (originator, counter) in self.recorded

    def fresh(self, originator: Eui, counter: int) -> bool:
        """Whether a request of the batch with this counter was above every counter stored before the
        commit, so no other commit took it (at most once across instances)."""
        before = self.advanced.get(originator)
        return before is not None and counter > before


@dataclass(frozen=True, slots=True)
class FlagState:
    """A currently set flag: who set it, when, with which request."""

    device_id: Eui
    set_by: Eui
    set_at: datetime
    request_id: str
    consumer_reference: str | None


@dataclass(frozen=True, slots=True)
class UpsertCounts:
    received: int
    inserted: int
    updated: int

    @property
    def unchanged(self) -> int:
        return self.received - self.inserted - self.updated


class FlagStore(Protocol):
    """What the gateway needs from durable storage: SqliteStore and PostgresStore implement it."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def __aenter__(self) -> Self: ...
    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...
    async def upsert_devices(self, records: Iterable[DeviceRecord]) -> UpsertCounts: ...
    async def upsert_users(self, records: Iterable[UserRecord]) -> UpsertCounts: ...
    async def get_device(self, device_id: Eui) -> DeviceRecord | None: ...
    def load_devices(self, batch_size: int = _BATCH) -> AsyncIterator[list[DeviceRecord]]: ...
    async def device_count(self) -> int: ...
    async def load_users(self) -> list[UserRecord]: ...
    async def load_flags(self) -> dict[Eui, FlagState]: ...
    async def flag_history(self, device: Eui | None = None, limit: int | None = None) -> list[FlagEvent]: ...
    async def commit(self, batch: CommitBatch) -> CommitResult: ...
    async def load_request_counters(self) -> dict[Eui, int]: ...
    async def purge_request_ids(self, before: datetime) -> int: ...
    async def dangling_references(self, limit: int = 100) -> tuple[list[tuple[Eui, str, Eui]], int]: ...
    async def load_pending(self, owner: str = "") -> list[ForwardedRequest]: ...

    async def overdue_pending(self, grace_seconds: float, limit: int) -> list[ForwardedRequest]: ...
    async def change_seq(self) -> int: ...
    def devices_changed_since(
        self, seq: int, batch_size: int = _BATCH
    ) -> AsyncIterator[list[DeviceRecord]]: ...
    async def users_changed_since(self, seq: int) -> list[UserRecord]: ...


# -- migrations -------------------------------------------------------------------------------------

_MIGRATIONS_TABLE = """
    CREATE TABLE IF NOT EXISTS schema_migrations (
        component TEXT NOT NULL,
        version INTEGER NOT NULL,
        PRIMARY KEY (component, version)
    )
"""


def _statements(script: str) -> Iterable[str]:
    """Split an SQL script into statements (semicolons in strings, comments and triggers kept)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\r\n;"):
                yield pending
            pending = ""


async def _applied_version(db: aiosqlite.Connection, component: str, known: int) -> int:
    async with db.execute(
        "SELECT coalesce(max(version), 0) FROM schema_migrations WHERE component = ?", (component,)
    ) as cursor:
        row = await cursor.fetchone()
    done = int(row[0]) if row is not None else 0
    if done > known:
        raise RuntimeError(
            f"database schema of {component!r} is at version {done}, newer than this gateway's "
            f"{known}: upgrade the gateway"
        )
    return done


async def migrate(db: aiosqlite.Connection, component: str, migrations: Sequence[str]) -> int:
    """Apply `component`'s migrations not applied yet, in order; returns the version reached.

    `db` is in autocommit mode (isolation_level=None). All pending migrations and their version rows
    are one transaction, under SQLite's write lock, so two processes starting together cannot apply
    one twice and a failing migration leaves the database as it was.
    """
    await db.execute(_MIGRATIONS_TABLE)
    await db.execute("BEGIN IMMEDIATE")
    try:
        done = await _applied_version(db, component, len(migrations))
        for version, script in enumerate(migrations[done:], start=done + 1):
            for statement in _statements(script):
                await db.execute(statement)
            await db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (component, version))
        await db.execute("COMMIT")
    except BaseException:
        await _rollback(db)
        raise
    return len(migrations)


async def in_thread(db: aiosqlite.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    """`work(connection)` run in the connection's own thread, in turn with its other operations: one
    hop for what would be a hop per statement through aiosqlite's API. aiosqlite has no public call
    for it: `_execute` queues a function to that thread and `_conn` is the sqlite3 connection
    (aiosqlite is pinned below 0.23; the store tests run every commit through here)."""
    connection = db._conn  # noqa: SLF001
    return cast("T", await db._execute(work, connection))  # type: ignore[no-untyped-call]  # noqa: SLF001


async def _rollback(db: aiosqlite.Connection) -> None:
    """Undo the open transaction, if SQLite has not already (a failed COMMIT on a full disk rolls back
    by itself): the caller re-raises the real error, never "cannot rollback"."""
    if db.in_transaction:
        await db.execute("ROLLBACK")


async def quick_check(db: aiosqlite.Connection, path: Path) -> None:
    """`PRAGMA quick_check`; StoreCorruptError naming the file and SQLite's first findings."""
    try:
        async with db.execute("PRAGMA quick_check") as cursor:
            findings = [str(row[0]) for row in await cursor.fetchall()]
    except sqlite3.DatabaseError as exc:  # "file is not a database" and the like
        raise StoreCorruptError(f"{path}: {exc}") from exc
    if findings != ["ok"]:
        raise StoreCorruptError(f"{path}: integrity check failed: {'; '.join(findings[:5])}")


def _read_only_uri(path: Path) -> str:
    return f"{path.absolute().as_uri()}?mode=ro"


def _pragmas(*, read_only: bool, busy_timeout_ms: int = _BUSY_TIMEOUT_MS) -> list[str]:
    writer = [
        "PRAGMA journal_mode = WAL",
        # NORMAL in WAL: a commit survives a process crash; only an OS crash or power cut can lose the last.
        "PRAGMA synchronous = NORMAL",
    ]
    return [
        *([] if read_only else writer),
        "PRAGMA foreign_keys = ON",
        # Another process may hold the write lock for a whole inventory import: wait rather than fail.
        f"PRAGMA busy_timeout = {int(busy_timeout_ms)}",
    ]


async def connect(
    path: Path, *, read_only: bool = False, busy_timeout_ms: int = _BUSY_TIMEOUT_MS
) -> aiosqlite.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, foreign keys on; `read_only`
    for readers such as `mp169 report`, which must never write a production database."""
    if read_only:
        db = await aiosqlite.connect(_read_only_uri(path), uri=True, isolation_level=None)
    else:
        db = await aiosqlite.connect(path, isolation_level=None)
    try:
        for pragma in _pragmas(read_only=read_only, busy_timeout_ms=busy_timeout_ms):
            await db.execute(pragma)
    except BaseException:
        await db.close()  # its worker thread would keep the process from exiting
        raise
    return db


def open_connection(path: Path) -> sqlite3.Connection:
    """The blocking counterpart of `connect` (read-write), for a worker thread that owns its connection."""
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in _pragmas(read_only=False):
        db.execute(pragma)
    return db


# -- conversions ------------------------------------------------------------------------------------


class Row(Protocol):
    """A result row of either driver: its columns by position."""

    def __getitem__(self, index: int, /) -> Any: ...


_DEVICE_TYPES = {member.value: member for member in DeviceType}
_STATUSES = {member.value: member for member in DeviceStatus}
_TARIFFS = {member.value: member for member in Tariff}


def _device_row(record: DeviceRecord, seq: int) -> tuple[Any, ...]:
    return (
        record.device_id,
        record.device_type.value,
        record.smets,
        record.status.value,
        record.comms_hub_id,
        record.mpxn,
        record.import_supplier,
        record.export_supplier,
        record.gas_supplier,
        record.tariff.value,
        int(record.wan),
        record.network_operator,
        record.gas_transporter,
        seq,
    )


def device_from_row(row: Row) -> DeviceRecord:
    return DeviceRecord(
        device_id=row[0],
        device_type=_DEVICE_TYPES[row[1]],
        smets=row[2],
        status=_STATUSES[row[3]],
        comms_hub_id=row[4],
        mpxn=row[5],
        import_supplier=row[6],
        export_supplier=row[7],
        gas_supplier=row[8],
        tariff=_TARIFFS[row[9]],
        wan=bool(row[10]),
        network_operator=row[11],
        gas_transporter=row[12],
    )


def roles_text(roles: frozenset[Role]) -> str:
    return " ".join(sorted(role.value for role in roles))


def user_from_row(row: Row) -> UserRecord:
    return UserRecord(row[0], frozenset(Role(name) for name in str(row[1]).split()))


def _time_text(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def flag_event_from_row(row: Row, at: datetime) -> FlagEvent:
    """A flag_history row (its columns in FlagEvent's order); `at` converted by the caller."""
    return FlagEvent(
        device_id=row[0],
        set=row[1] == "set",
        requester=row[2],
        request_id=row[3],
        declaration=None if row[4] is None else bool(row[4]),
        consumer_reference=row[5],
        outcome=row[6],
        at=at,
    )


def dangling_from_rows(rows: Iterable[Row]) -> list[tuple[Eui, str, Eui]]:
    return [(Eui(row[0]), str(row[1]), Eui(row[2])) for row in rows]


def _check_counter(value: int) -> None:
    if not 0 <= value <= MAX_COUNTER:
        raise ValueError(f"RequestID counter {value} is not an unsigned 64-bit integer")


def checked_counters(counters: Mapping[Eui, int]) -> list[tuple[Eui, int]]:
    """The batch's counters, range-checked, in originator order: concurrent commits lock the rows in
    one order and so never deadlock."""
    for value in counters.values():
        _check_counter(value)
    return sorted(counters.items())


def checked_request_ids(request_ids: Iterable[tuple[Eui, int]]) -> list[tuple[Eui, int]]:
    """The batch's RequestIDs, range-checked, once each, in order (as for counters: no deadlock)."""
    unique = sorted(set(request_ids))
    for _, counter in unique:
        _check_counter(counter)
    return unique


# -- SQLite -------------------------------------------------------------------------------------------


class Opened(ABC):
    """`async with store:` opens the store and closes it, whatever happens inside."""

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class SqliteStore(Opened):
    """FlagStore over one SQLite file. One connection; its transactions are serialised by a lock."""

    def __init__(self, path: Path, *, busy_timeout_ms: int = _BUSY_TIMEOUT_MS) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self, *, check: bool = False) -> None:
        """Connect (creating the file and its folder if needed) and bring the schema up to date;
        `check`: first run SQLite's quick integrity check (StoreCorruptError: refuse the file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = await connect(self.path, busy_timeout_ms=self.busy_timeout_ms)
        except sqlite3.DatabaseError as exc:
            raise StoreCorruptError(f"{self.path}: {exc}") from exc
        try:
            if check:
                await quick_check(db, self.path)
            await migrate(db, CORE, MIGRATIONS)
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            async with self._lock:
                await db.close()

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError(f"store {self.path} is not open")
        return self._db

    async def _fetchall(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        async with self._lock, self._conn.execute(sql, parameters) as cursor:
            return list(await cursor.fetchall())

    async def _next_seq(self, db: aiosqlite.Connection) -> int:
        # Called inside the write transaction: no other writer can take the same number.
        async with db.execute(_LATEST_SEQ) as cursor:
            row = await cursor.fetchone()
        return (int(row[0]) if row is not None else 0) + 1

    async def _upsert(
        self, table: str, sql: str, received: int, rows: Callable[[int], list[tuple[Any, ...]]]
    ) -> UpsertCounts:
        """One transaction; `rows(seq)` stamps the rows with the next sequence number."""
        async with self._lock:
            db = self._conn
            await db.execute("BEGIN IMMEDIATE")
            try:
                stamped = rows(await self._next_seq(db))
                count = f"SELECT count(*), total_changes() FROM {table}"  # noqa: S608 - table is ours
                async with db.execute(count) as cursor:
                    before, changes_before = await cursor.fetchone() or (0, 0)
                await db.executemany(sql, stamped)
                async with db.execute(count) as cursor:
                    after, changes_after = await cursor.fetchone() or (0, 0)
                await db.execute("COMMIT")
            except BaseException:
                await _rollback(db)
                raise
        inserted = after - before
        updated = changes_after - changes_before - inserted
        return UpsertCounts(received=received, inserted=inserted, updated=updated)

    async def upsert_devices(self, records: Iterable[DeviceRecord]) -> UpsertCounts:
        """Insert new devices, update known ones (Change of Supplier, tariff, status): all or nothing."""
        devices = list(records)
        if any(device.device_id == NOT_A_DEVICE for device in devices):
            raise ValueError(f"{NOT_A_DEVICE} is not a Device ID")
        return await self._upsert(
            "devices", _UPSERT_DEVICE, len(devices), lambda seq: [_device_row(r, seq) for r in devices]
        )

    async def upsert_users(self, records: Iterable[UserRecord]) -> UpsertCounts:
        users = list(records)
        return await self._upsert(
            "users",
            _UPSERT_USER,
            len(users),
            lambda seq: [(user.user_id, roles_text(user.roles), seq) for user in users],
        )

    async def get_device(self, device_id: Eui) -> DeviceRecord | None:
        rows = await self._fetchall(f"{_SELECT_DEVICES} WHERE device_id = ?", (device_id,))
        return device_from_row(rows[0]) if rows else None

    async def load_devices(self, batch_size: int = _BATCH) -> AsyncIterator[list[DeviceRecord]]:
        """Every device, in batches (each batch its own query, so the lock is never held across a yield)."""
        last = ""
        while True:
            rows = await self._fetchall(
                f"{_SELECT_DEVICES} WHERE device_id > ? ORDER BY device_id LIMIT ?", (last, batch_size)
            )
            if not rows:
                return
            yield [device_from_row(row) for row in rows]
            last = rows[-1][0]

    async def device_count(self) -> int:
        rows = await self._fetchall("SELECT count(*) FROM devices")
        return int(rows[0][0])

    async def load_users(self) -> list[UserRecord]:
        return [user_from_row(row) for row in await self._fetchall("SELECT user_id, roles FROM users")]

    async def load_flags(self) -> dict[Eui, FlagState]:
        rows = await self._fetchall(
            "SELECT device_id, set_by, set_at, request_id, consumer_reference FROM flags ORDER BY device_id"
        )
        return {
            row[0]: FlagState(row[0], row[1], datetime.fromisoformat(row[2]), row[3], row[4]) for row in rows
        }

    async def flag_history(self, device: Eui | None = None, limit: int | None = None) -> list[FlagEvent]:
        """Flag events, oldest first: of one device or of all; with `limit`, the most recent ones."""
        where = "" if device is None else "WHERE device_id = ?"
        parameters: tuple[Any, ...] = () if device is None else (device,)
        sql = (
            "SELECT device_id, action, requester, request_id, declaration, consumer_reference, outcome, at"  # noqa: S608 - constant fragments
            f" FROM flag_history {where} ORDER BY id DESC LIMIT ?"
        )
        rows = await self._fetchall(sql, (*parameters, -1 if limit is None else limit))
        return [flag_event_from_row(row, datetime.fromisoformat(row[7])) for row in reversed(rows)]

    async def commit(self, batch: CommitBatch) -> CommitResult:
        """One durable transaction: history for every event, the flags of accepted changes, counters.

        The whole transaction is one function run in the connection's thread: one hop from the event
        loop per batch, where a statement each through aiosqlite's API costs a hop (and a wake-up of
        the loop) per statement. A commit whose caller is cancelled meanwhile still ends, committed or
        rolled back, before the connection's next operation (its thread runs them in turn)."""
        counters = checked_counters(batch.counters)
        request_ids = checked_request_ids(batch.request_ids)
        async with self._lock:
            advanced, recorded, claimed, answers, here, known = await in_thread(
                self._conn,
                partial(self._commit_in_thread, batch=batch, counters=counters, request_ids=request_ids),
            )
        return CommitResult(
            advanced,
            recorded=recorded,
            claimed=claimed,
            answers=answers,
            answered_here=here,
            stored_forwards=known,
        )

    @classmethod
    def _commit_in_thread(
        cls,
        db: sqlite3.Connection,
        *,
        batch: CommitBatch,
        counters: list[tuple[Eui, int]],
        request_ids: list[tuple[Eui, int]],
    ) -> tuple[
        dict[Eui, int],
        frozenset[tuple[Eui, int]],
        dict[RequestId, Claim],
        dict[RequestId, str],
        frozenset[RequestId],
        frozenset[RequestId],
    ]:
        db.execute("BEGIN IMMEDIATE")
        try:
            if batch.flag_events:
                cls._apply_flag_events(db, batch.flag_events)
            cls._withdraw(db, batch)
            advanced = cls._advance_counters(db, counters)
            recorded = cls._record_request_ids(db, request_ids)
            claimed, answers, here, known = cls._apply_forwards(db, batch)
            db.execute("COMMIT")
        except BaseException:
            # As _rollback: a failed COMMIT on a full disk has rolled back already.
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return advanced, recorded, claimed, answers, here, known

    @staticmethod
    def _apply_flag_events(db: sqlite3.Connection, events: Sequence[FlagEvent]) -> None:
        db.executemany(
            "INSERT INTO flag_history (device_id, action, requester, request_id, declaration,"
            " consumer_reference, outcome, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    event.device_id,
                    "set" if event.set else "clear",
                    event.requester,
                    event.request_id,
                    None if event.declaration is None else int(event.declaration),
                    event.consumer_reference,
                    event.outcome,
                    _time_text(event.at),
                )
                for event in events
            ],
        )
        # In order: a batch may set and clear the same device.
        for event in events:
            if event.outcome != OUTCOME_ACCEPTED:
                continue
            if event.set:
                db.execute(
                    "INSERT INTO flags (device_id, set_by, set_at, request_id, consumer_reference)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET set_by = excluded.set_by,"
                    " set_at = excluded.set_at, request_id = excluded.request_id,"
                    " consumer_reference = excluded.consumer_reference",
                    (
                        event.device_id,
                        event.requester,
                        _time_text(event.at),
                        event.request_id,
                        event.consumer_reference,
                    ),
                )
            else:
                db.execute("DELETE FROM flags WHERE device_id = ?", (event.device_id,))

    @staticmethod
    def _advance_counters(db: sqlite3.Connection, counters: list[tuple[Eui, int]]) -> dict[Eui, int]:
        advanced: dict[Eui, int] = {}
        for start in range(0, len(counters), _COUNTER_ROWS):
            chunk = counters[start : start + _COUNTER_ROWS]
            sql = _ADVANCE_COUNTERS.format(rows=", ".join(["(?, ?)"] * len(chunk)))
            parameters = [part for name, value in chunk for part in (name, f"{value:0{_COUNTER_DIGITS}d}")]
            advanced.update(
                (row[0], NO_COUNTER if row[1] is None else int(row[1]))
                for row in db.execute(sql, parameters).fetchall()
            )
        return advanced

    async def dangling_references(self, limit: int = 100) -> tuple[list[tuple[Eui, str, Eui]], int]:
        """Up to `limit` (device, column, value) where a device names a comms hub that is not in the
        inventory or a supplier that is not in the user registry, and how many there are in all."""
        rows = await self._fetchall(f"{DANGLING_REFERENCES} ORDER BY 1, 2 LIMIT ?", (limit,))
        [(total,)] = await self._fetchall(f"SELECT count(*) FROM ({DANGLING_REFERENCES}) AS dangling")  # noqa: S608 - no input in it
        return dangling_from_rows(rows), int(total)

    @staticmethod
    def _record_request_ids(
        db: sqlite3.Connection, request_ids: list[tuple[Eui, int]]
    ) -> frozenset[tuple[Eui, int]]:
        recorded: set[tuple[Eui, int]] = set()
        at = _time_text(utc_now())
        for start in range(0, len(request_ids), _COUNTER_ROWS):
            chunk = request_ids[start : start + _COUNTER_ROWS]
            sql = _RECORD_REQUEST_IDS.format(rows=", ".join(["(?, ?, ?)"] * len(chunk)))
            parameters = [
                part for name, value in chunk for part in (name, f"{value:0{_COUNTER_DIGITS}d}", at)
            ]
            recorded.update((row[0], int(row[1])) for row in db.execute(sql, parameters).fetchall())
        return frozenset(recorded)

    async def purge_request_ids(self, before: datetime) -> int:
        """Forget RequestIDs recorded, and forwards answered, before `before` (older than any redelivery
        or late device response can be); how many RequestIDs."""
        async with self._lock:
            cursor = await self._conn.execute(
                "DELETE FROM request_ids WHERE accepted_at < ?", (_time_text(before),)
            )
            await self._conn.execute(_PURGE_ANSWERED, (_time_text(before),))
            return cursor.rowcount

    @staticmethod
    def _withdraw(db: sqlite3.Connection, batch: CommitBatch) -> None:
        """First: a retry in the same batch is then recorded afresh."""
        for chunk in _chunks([str(rid) for rid in batch.withdrawn]):
            statement = _WITHDRAW.format(marks=", ".join("?" * len(chunk)))
            cursor = db.execute(statement, (*chunk, batch.owner))
            rows = cursor.fetchall()
            db.executemany(
                "DELETE FROM request_ids WHERE originator = ? AND counter = ?",
                [(row[0], f"{int(row[1]):0{_COUNTER_DIGITS}d}") for row in rows],
            )

    @staticmethod
    def _apply_forwards(
        db: sqlite3.Connection, batch: CommitBatch
    ) -> tuple[dict[RequestId, Claim], dict[RequestId, str], frozenset[RequestId], frozenset[RequestId]]:
        """Forwards in, then claims (responses before timeouts), then settlements."""
        inserted: set[str] = set()
        for start in range(0, len(batch.forwarded), _CLAIM_ROWS):
            forwards = batch.forwarded[start : start + _CLAIM_ROWS]
            statement = _INSERT_FORWARDS.format(rows=", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * len(forwards)))
            parameters = [part for entry in forwards for part in (*_forward_row(entry), batch.owner)]
            cursor = db.execute(statement, parameters)
            inserted.update(row[0] for row in cursor.fetchall())
        known = frozenset(
            entry.request_id for entry in batch.forwarded if str(entry.request_id) not in inserted
        )
        now = utc_now()
        at = _time_text(now)
        unsettled_before = _time_text(now - timedelta(seconds=batch.timeout_grace_seconds))
        claimed: dict[RequestId, Claim] = {}
        for answer, sql, request_ids, extra in (
            (ANSWER_RESPONSE, _CLAIM_RESPONSE, batch.answered, ()),
            (ANSWER_TIMEOUT, _CLAIM_TIMEOUT, batch.timed_out, (unsettled_before,)),
        ):
            for chunk in _chunks([str(rid) for rid in request_ids if rid not in claimed]):
                statement = sql.format(marks=", ".join("?" * len(chunk)))
                cursor = db.execute(statement, (answer, at, batch.owner, *chunk, *extra))
                for row in cursor.fetchall():
                    forward = _forward_from_row(row)
                    claimed[forward.request_id] = Claim(answer, forward)
        answers: dict[RequestId, str] = {}
        answered_here: set[RequestId] = set()
        unclaimed = [str(rid) for rid in (*batch.answered, *batch.timed_out) if rid not in claimed]
        for chunk in _chunks(unclaimed):
            statement = _ANSWERS.format(marks=", ".join("?" * len(chunk)))
            cursor = db.execute(statement, chunk)
            for row in cursor.fetchall():
                answers[_request_id(row)] = row[3]
                if row[4] == batch.owner:
                    answered_here.add(_request_id(row))
        for chunk in _chunks([str(rid) for rid in batch.settled]):
            db.execute(_SETTLE.format(marks=", ".join("?" * len(chunk))), chunk)
        return claimed, answers, frozenset(answered_here), known

    async def load_pending(self, owner: str = "") -> list[ForwardedRequest]:
        """`owner`'s forwarded requests still waiting for their device's answer, earliest deadline first."""
        rows = await self._fetchall(_WAITING, (owner,))
        return [_forward_from_row(row) for row in rows]

    async def overdue_pending(self, grace_seconds: float, limit: int) -> list[ForwardedRequest]:
        """Forwards unanswered more than `grace_seconds` past their deadline, and E21 claims not settled
        that long after they were made (their claimer died before it knew its E21 was out)."""
        before = _time_text(utc_now() - timedelta(seconds=grace_seconds))
        rows = await self._fetchall(_OVERDUE, (before, before, limit))
        return [_forward_from_row(row) for row in rows]

    async def load_request_counters(self) -> dict[Eui, int]:
        rows = await self._fetchall("SELECT originator, counter FROM request_counters")
        return {row[0]: int(row[1]) for row in rows}

    async def change_seq(self) -> int:
        """The sequence number of the latest inventory or user upsert (0: none yet)."""
        rows = await self._fetchall(_LATEST_SEQ)
        return int(rows[0][0])

    async def devices_changed_since(
        self, seq: int, batch_size: int = _BATCH
    ) -> AsyncIterator[list[DeviceRecord]]:
        """Devices upserted after `seq`, in batches (a whole re-imported estate does not fill memory)."""
        last = (seq, "")
        while True:
            rows = await self._fetchall(
                f"SELECT {DEVICE_COLUMN_LIST}, updated_seq FROM devices"  # noqa: S608 - constant column list
                " WHERE updated_seq > ? AND (updated_seq, device_id) > (?, ?)"
                " ORDER BY updated_seq, device_id LIMIT ?",
                (seq, *last, batch_size),
            )
            if not rows:
                return
            yield [device_from_row(row) for row in rows]
            last = (rows[-1][-1], rows[-1][0])

    async def users_changed_since(self, seq: int) -> list[UserRecord]:
        rows = await self._fetchall("SELECT user_id, roles FROM users WHERE updated_seq > ?", (seq,))
        return [user_from_row(row) for row in rows]
