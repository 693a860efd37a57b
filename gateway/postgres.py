"""PostgresStore: the FlagStore over PostgreSQL, shared by several gateway instances.

Same schema versions and semantics as `SqliteStore` (component "core"), in PostgreSQL's own types
(timestamptz, boolean, numeric(20,0) for the u64 RequestID counters). What several instances need
on top is component "cluster" (docs/multi-instance.md):

- a **flag epoch**: every commit that changes a flag takes the next epoch, under the row lock of
  `cluster_state`, stamps its flag_history rows with it and sends `NOTIFY mp169_flags, '<epoch>'`
  (delivered at commit), so `flag_changes_since(epoch)` gives an instance every change it has not
  applied, in commit order;
- **leases** (`instance_leases`): each live instance renews its lease with the epoch it has applied;
  `unapplied(epoch)` names the live instances that have not applied an epoch yet (an I0 to a flag
  request waits until none is left); an instance whose lease lapsed rejoins only with the current
  epoch applied (`join`);
- **claims** on the shared pending forwards (core `pending_requests`): a device's answer or a
  timeout claims a forward in its commit with an UPDATE that holds only while the forward is
  unanswered, so of all the instances exactly one gives it its final answer.

Connections come from a pool; the listener has a connection of its own. The inventory's change
sequence is one row of `cluster_state` too, locked by each upsert until it commits, so sequence
numbers commit in order and `devices_changed_since` never misses a row committed late.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from gateway.store import (
    CORE,
    DANGLING_REFERENCES,
    DEVICE_COLUMN_LIST,
    DEVICE_COLUMNS,
    DEVICE_UPDATES,
    NO_COUNTER,
    CommitBatch,
    CommitResult,
    FlagState,
    Opened,
    Row,
    UpsertCounts,
    checked_counters,
    checked_request_ids,
    dangling_from_rows,
    device_from_row,
    flag_event_from_row,
    roles_text,
    user_from_row,
)
from rules.domain import (
    ANSWER_RESPONSE,
    ANSWER_TIMEOUT,
    NOT_A_DEVICE,
    OUTCOME_ACCEPTED,
    Claim,
    DeviceRecord,
    Eui,
    FlagEvent,
    ForwardedRequest,
    RequestId,
    UserRecord,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable, Sequence
    from datetime import datetime

    from asyncpg.pool import PoolConnectionProxy

    _Connection = PoolConnectionProxy[asyncpg.Record]
    _Deliver = Callable[[object, int, str, object], None]

CLUSTER = "cluster"
FLAGS_CHANNEL = "mp169_flags"
"""NOTIFY channel: the payload is the flag epoch a commit made."""
ACKS_CHANNEL = "mp169_acks"
"""NOTIFY channel: the payload is an instance that acknowledged a flag epoch."""

_BATCH = 2_000
_UPSERT_ROWS = 10_000  # rows per upsert statement (one transaction for the whole import)
_POOL_MIN, _POOL_MAX = 1, 4

# Component "core", version for version the schema of SqliteStore's MIGRATIONS. Append; never edit.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE devices (
        device_id text PRIMARY KEY,
        device_type text NOT NULL,
        smets integer NOT NULL,
        status text NOT NULL,
        comms_hub_id text,
        mpxn text,
        import_supplier text,
        export_supplier text,
        gas_supplier text,
        network_operator text,
        tariff text NOT NULL,
        wan boolean NOT NULL,
        updated_seq bigint NOT NULL
    );
    CREATE INDEX devices_updated ON devices (updated_seq, device_id);
    CREATE TABLE users (
        user_id text PRIMARY KEY,
        roles text NOT NULL,
        updated_seq bigint NOT NULL
    );
    CREATE INDEX users_updated ON users (updated_seq);
    CREATE TABLE flags (
        device_id text PRIMARY KEY REFERENCES devices (device_id),
        set_by text NOT NULL,
        set_at timestamptz NOT NULL,
        request_id text NOT NULL,
        consumer_reference text
    );
    CREATE TABLE flag_history (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        device_id text NOT NULL,
        action text NOT NULL CHECK (action IN ('set', 'clear')),
        requester text NOT NULL,
        request_id text NOT NULL,
        declaration boolean,
        consumer_reference text,
        outcome text NOT NULL,
        at timestamptz NOT NULL
    );
    CREATE INDEX flag_history_device ON flag_history (device_id, id);
    CREATE TABLE request_counters (
        originator text PRIMARY KEY,
        counter numeric(20, 0) NOT NULL CHECK (counter BETWEEN 0 AND 18446744073709551615)
    );
    -- The inventory's change sequence (SQLite takes max(updated_seq) under its write lock instead).
    CREATE TABLE cluster_state (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        change_seq bigint NOT NULL
    );
    INSERT INTO cluster_state (change_seq) VALUES (0);
    """,
    """
    ALTER TABLE request_counters ADD COLUMN previous numeric(20, 0);
    """,
    """
    CREATE TABLE request_ids (
        originator text NOT NULL,
        counter numeric(20, 0) NOT NULL,
        accepted_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (originator, counter)
    );
    CREATE INDEX request_ids_accepted ON request_ids (accepted_at);
    """,
    """
    CREATE TABLE pending_requests (
        request_id text PRIMARY KEY,
        originator text NOT NULL,
        target text NOT NULL,
        counter numeric(20, 0) NOT NULL,
        srv text NOT NULL,
        service_reference text NOT NULL,
        deadline timestamptz NOT NULL
    );
    """,
    # 5: the gas transporter of the MPRN; the not-responsible-supplier refusal is E081509, not E3.
    """
    ALTER TABLE devices ADD COLUMN gas_transporter text;
    UPDATE flag_history SET outcome = 'E081509' WHERE outcome = 'E3';
    """,
    # 6: an answered forward keeps its row with its answer (its claim), as SQLite's migration 6.
    """
    ALTER TABLE pending_requests ADD COLUMN answer text;
    ALTER TABLE pending_requests ADD COLUMN answered_at timestamptz;
    ALTER TABLE pending_requests ADD COLUMN settled boolean NOT NULL DEFAULT false;
    ALTER TABLE pending_requests ADD COLUMN owner text NOT NULL DEFAULT '';
    ALTER TABLE pending_requests ADD COLUMN sent boolean NOT NULL DEFAULT false;
    ALTER TABLE pending_requests ADD COLUMN answered_by text NOT NULL DEFAULT '';
    CREATE INDEX pending_requests_waiting ON pending_requests (deadline) WHERE answer IS NULL;
    CREATE INDEX pending_requests_answered ON pending_requests (answered_at) WHERE answer IS NOT NULL;
    """,
    # 7: a stored forward counts as sent, as SQLite's migration 7.
    """
    ALTER TABLE pending_requests DROP COLUMN sent;
    """,
)

# Component "cluster": what several instances over one database need. Append; never edit.
CLUSTER_MIGRATIONS: tuple[str, ...] = (
    """
    ALTER TABLE cluster_state ADD COLUMN flag_epoch bigint NOT NULL DEFAULT 0;
    ALTER TABLE flag_history ADD COLUMN epoch bigint;
    CREATE INDEX flag_history_epoch ON flag_history (epoch) WHERE epoch IS NOT NULL;
    CREATE TABLE instance_leases (
        instance text PRIMARY KEY,
        applied_epoch bigint NOT NULL,
        expires_at timestamptz NOT NULL
    );
    CREATE TABLE pending_forwards (
        request_id text PRIMARY KEY,
        owner text NOT NULL,
        srv text NOT NULL,
        service_reference text NOT NULL,
        forwarded_at timestamptz NOT NULL DEFAULT now(),
        deadline timestamptz NOT NULL
    );
    CREATE INDEX pending_forwards_deadline ON pending_forwards (deadline);
    """,
    # 2: the claims live on core's pending_requests, which every instance shares.
    """
    DROP TABLE pending_forwards;
    """,
)

_MIGRATIONS_TABLE = """
    CREATE TABLE IF NOT EXISTS schema_migrations (
        component text NOT NULL,
        version integer NOT NULL,
        PRIMARY KEY (component, version)
    )
"""
_MIGRATION_LOCK = 0x6D703136  # pg_advisory_xact_lock key: one migrating process at a time

_DEVICE_TYPES = (
    "text[], text[], integer[], text[], text[], text[], text[], text[], text[], text[], boolean[], text[],"
    " text[]"
)
_DEVICE_ARRAYS = ", ".join(f"${n}::{kind}" for n, kind in enumerate(_DEVICE_TYPES.split(", "), 1))
_UPSERT_DEVICES = f"""
    INSERT INTO devices ({DEVICE_COLUMN_LIST}, updated_seq)
    SELECT *, ${len(DEVICE_COLUMNS) + 1}::bigint FROM unnest({_DEVICE_ARRAYS})
    ON CONFLICT (device_id) DO UPDATE SET {DEVICE_UPDATES}, updated_seq = excluded.updated_seq
    WHERE ({", ".join(f"devices.{column}" for column in DEVICE_COLUMNS[1:])})
        IS DISTINCT FROM ({", ".join(f"excluded.{column}" for column in DEVICE_COLUMNS[1:])})
    RETURNING xmax = 0
"""  # noqa: S608 - constant column lists; xmax = 0: the row was inserted, not updated
_UPSERT_USERS = """
    INSERT INTO users (user_id, roles, updated_seq) SELECT *, $3::bigint FROM unnest($1::text[], $2::text[])
    ON CONFLICT (user_id) DO UPDATE SET roles = excluded.roles, updated_seq = excluded.updated_seq
    WHERE users.roles IS DISTINCT FROM excluded.roles
    RETURNING xmax = 0
"""
_NEXT_SEQ = "UPDATE cluster_state SET change_seq = change_seq + 1 RETURNING change_seq"
_SELECT_DEVICES = f"SELECT {DEVICE_COLUMN_LIST} FROM devices"  # noqa: S608 - constant column list
_HISTORY_COLUMNS = "device_id, action, requester, request_id, declaration, consumer_reference, outcome, at"
_INSERT_HISTORY = f"""
    INSERT INTO flag_history ({_HISTORY_COLUMNS}, epoch)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::boolean[], $6::text[],
                         $7::text[], $8::timestamptz[], $9::bigint[])
"""  # noqa: S608 - constant column list
# One statement checks and advances every counter of the batch (rows locked in originator order):
# `previous` is the value an advance replaced, so the caller learns which requests were fresh.
_ADVANCE_COUNTERS = """
    INSERT INTO request_counters (originator, counter) SELECT * FROM unnest($1::text[], $2::numeric[])
    ON CONFLICT (originator) DO UPDATE SET previous = request_counters.counter, counter = excluded.counter
    WHERE excluded.counter > request_counters.counter
    RETURNING originator, previous
"""
_RECORD_REQUEST_IDS = """
    INSERT INTO request_ids (originator, counter) SELECT * FROM unnest($1::text[], $2::numeric[])
    ON CONFLICT (originator, counter) DO NOTHING
    RETURNING originator, counter
"""
_NEXT_EPOCH = f"""
    UPDATE cluster_state SET flag_epoch = flag_epoch + 1
    RETURNING flag_epoch, pg_notify('{FLAGS_CHANNEL}', flag_epoch::text)
"""  # noqa: S608 - constant channel name
# One snapshot: the epoch read and the changes up to it agree.
_FLAG_CHANGES = """
    WITH state AS (SELECT flag_epoch FROM cluster_state)
    SELECT (SELECT flag_epoch FROM state), device_id, action FROM (
        SELECT DISTINCT ON (device_id) device_id, action FROM flag_history
        WHERE outcome = 'accepted' AND epoch > $1 AND epoch <= (SELECT flag_epoch FROM state)
        ORDER BY device_id, id DESC
    ) AS latest
    UNION ALL SELECT (SELECT flag_epoch FROM state), NULL, NULL
"""
_RENEW = f"""
    WITH renewed AS (
        UPDATE instance_leases SET applied_epoch = greatest(applied_epoch, $2),
            expires_at = now() + make_interval(secs => $3)
        WHERE instance = $1 AND expires_at > now()
        RETURNING instance, applied_epoch
    )
    SELECT instance, pg_notify('{ACKS_CHANNEL}', instance) FROM renewed
"""  # noqa: S608 - constant channel name
# FOR SHARE waits for a commit that is taking the next epoch: a join either commits before that
# commit (which then sees the new lease and waits for it) or sees its epoch and fails.
_JOIN = """
    INSERT INTO instance_leases (instance, applied_epoch, expires_at)
    SELECT $1, flag_epoch, now() + make_interval(secs => $3) FROM cluster_state
    WHERE flag_epoch = $2 FOR SHARE
    ON CONFLICT (instance) DO UPDATE SET applied_epoch = excluded.applied_epoch,
        expires_at = excluded.expires_at
    RETURNING instance
"""
_UNAPPLIED = (
    "SELECT instance FROM instance_leases WHERE expires_at > now() AND applied_epoch < $1 ORDER BY instance"
)
_FORWARD_COLUMNS = "originator, target, counter, srv, service_reference, deadline"
_INSERT_FORWARDS = f"""
    INSERT INTO pending_requests (request_id, {_FORWARD_COLUMNS}, owner)
    SELECT *, $8 FROM unnest($1::text[], $2::text[], $3::text[], $4::numeric[], $5::text[], $6::text[],
                             $7::timestamptz[])
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id
"""  # noqa: S608 - constant column list
# Row locks make the claims exact across instances: a second UPDATE of the same row waits for the
# first to commit, then re-checks its WHERE against the committed row.
_CLAIM_RESPONSE = f"""
    UPDATE pending_requests SET answer = 'response', answered_at = now(), answered_by = $2
    WHERE request_id = ANY($1::text[]) AND answer IS NULL
    RETURNING {_FORWARD_COLUMNS}
"""  # noqa: S608 - constant column list
_CLAIM_TIMEOUT = f"""
    UPDATE pending_requests SET answer = 'timeout', answered_at = now(), answered_by = $3, settled = false
    WHERE request_id = ANY($1::text[]) AND (answer IS NULL
        OR (answer = 'timeout' AND NOT settled AND answered_at < now() - make_interval(secs => $2)))
    RETURNING {_FORWARD_COLUMNS}
"""  # noqa: S608 - constant column list
_ANSWERS = (
    "SELECT originator, target, counter, answer, answered_by FROM pending_requests"
    " WHERE request_id = ANY($1::text[])"
)
_SETTLE = (
    "UPDATE pending_requests SET settled = true WHERE request_id = ANY($1::text[]) AND answer = 'timeout'"
)
# SKIP LOCKED: a row another instance is claiming right now is not overdue for this one.
_OVERDUE = f"""
    SELECT {_FORWARD_COLUMNS} FROM pending_requests
    WHERE (answer IS NULL AND deadline < now() - make_interval(secs => $1))
        OR (answer = 'timeout' AND NOT settled AND answered_at < now() - make_interval(secs => $1))
    ORDER BY deadline LIMIT $2 FOR UPDATE SKIP LOCKED
"""  # noqa: S608 - constant column list
_WITHDRAW = """
    WITH withdrawn AS (
        DELETE FROM pending_requests WHERE request_id = ANY($1::text[]) AND answer IS NULL AND owner = $2
        RETURNING originator, counter
    )
    DELETE FROM request_ids USING withdrawn
    WHERE request_ids.originator = withdrawn.originator AND request_ids.counter = withdrawn.counter
"""
_PURGE_ANSWERED = """
    DELETE FROM pending_requests WHERE answer IS NOT NULL AND answered_at < $1
        AND (answer = 'response' OR settled)
"""


@dataclass(frozen=True, slots=True)
class FlagChanges:
    """The flags changed after an epoch: each device's state as of `epoch`."""

    epoch: int
    flagged: dict[Eui, bool]


def _request_id(row: Row) -> RequestId:
    return RequestId(Eui(row[0]), Eui(row[1]), int(row[2]))


def _forward(row: Row) -> ForwardedRequest:
    return ForwardedRequest(_request_id(row), row[3], row[4], row[5])


async def migrate_component(db: _Connection, component: str, migrations: Sequence[str]) -> None:
    """Apply `component`'s migrations not applied yet, in one transaction under an advisory lock."""
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await db.execute(_MIGRATIONS_TABLE)
        done = await db.fetchval(
            "SELECT coalesce(max(version), 0) FROM schema_migrations WHERE component = $1", component
        )
        if done > len(migrations):
            raise RuntimeError(
                f"database schema of {component!r} is at version {done}, newer than this gateway's "
                f"{len(migrations)}: upgrade the gateway"
            )
        for version, script in enumerate(migrations[done:], start=done + 1):
            await db.execute(script)
            await db.execute("INSERT INTO schema_migrations VALUES ($1, $2)", component, version)


def _device_columns(records: Sequence[DeviceRecord]) -> list[list[Any]]:
    return [
        [r.device_id for r in records],
        [r.device_type.value for r in records],
        [r.smets for r in records],
        [r.status.value for r in records],
        [r.comms_hub_id for r in records],
        [r.mpxn for r in records],
        [r.import_supplier for r in records],
        [r.export_supplier for r in records],
        [r.gas_supplier for r in records],
        [r.tariff.value for r in records],
        [r.wan for r in records],
        [r.network_operator for r in records],
        [r.gas_transporter for r in records],
    ]


class PostgresStore(Opened):
    """FlagStore over PostgreSQL (asyncpg pool), plus what several instances share."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._listener: asyncpg.Connection[Any] | None = None
        self._channels: list[tuple[str, _Deliver]] = []
        self._listening = asyncio.Lock()
        self._acked: asyncio.Event | None = None

    async def open(self) -> None:
        """Connect and bring both components' schemas up to date."""
        pool = await asyncpg.create_pool(self.url, min_size=_POOL_MIN, max_size=_POOL_MAX)
        try:
            async with pool.acquire() as db:
                await migrate_component(db, CORE, MIGRATIONS)
                await migrate_component(db, CLUSTER, CLUSTER_MIGRATIONS)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        self._acked = None
        self._channels.clear()
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @property
    def _db(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise RuntimeError(f"store {self.url} is not open")
        return self._pool

    # -- inventory and users --------------------------------------------------------------------

    async def _upsert(self, sql: str, columns: list[list[Any]], received: int) -> UpsertCounts:
        """One transaction; the rows are stamped with the next change sequence number."""
        inserted = updated = 0
        async with self._db.acquire() as db:
            transaction = db.transaction()
            await transaction.start()
            try:
                seq = await db.fetchval(_NEXT_SEQ)
                for start in range(0, len(columns[0]), _UPSERT_ROWS):
                    chunk = [column[start : start + _UPSERT_ROWS] for column in columns]
                    for (was_inserted,) in await db.fetch(sql, *chunk, seq):
                        inserted += was_inserted
                        updated += not was_inserted
            except BaseException:
                await transaction.rollback()
                raise
            # Nothing changed: the sequence number is given back, as with SQLite (a re-import of the
            # same file costs a running gateway nothing).
            await (transaction.commit() if inserted or updated else transaction.rollback())
        return UpsertCounts(received=received, inserted=inserted, updated=updated)

    async def upsert_devices(self, records: Iterable[DeviceRecord]) -> UpsertCounts:
        """Insert new devices, update known ones (Change of Supplier, tariff, status): all or nothing."""
        devices = list(records)
        if any(device.device_id == NOT_A_DEVICE for device in devices):
            raise ValueError(f"{NOT_A_DEVICE} is not a Device ID")
        # One statement may not touch a row twice: a device listed twice counts once, its last row.
        latest = list({device.device_id: device for device in devices}.values())
        return await self._upsert(_UPSERT_DEVICES, _device_columns(latest), len(devices))

    async def upsert_users(self, records: Iterable[UserRecord]) -> UpsertCounts:
        users = list(records)
        latest = {user.user_id: roles_text(user.roles) for user in users}
        return await self._upsert(_UPSERT_USERS, [list(latest), list(latest.values())], len(users))

    async def get_device(self, device_id: Eui) -> DeviceRecord | None:
        row = await self._db.fetchrow(f"{_SELECT_DEVICES} WHERE device_id = $1", device_id)
        return None if row is None else device_from_row(row)

    async def load_devices(self, batch_size: int = _BATCH) -> AsyncIterator[list[DeviceRecord]]:
        last = ""
        while True:
            rows = await self._db.fetch(
                f"{_SELECT_DEVICES} WHERE device_id > $1 ORDER BY device_id LIMIT $2", last, batch_size
            )
            if not rows:
                return
            yield [device_from_row(row) for row in rows]
            last = rows[-1][0]

    async def device_count(self) -> int:
        return int(await self._db.fetchval("SELECT count(*) FROM devices"))

    async def load_users(self) -> list[UserRecord]:
        return [user_from_row(row) for row in await self._db.fetch("SELECT user_id, roles FROM users")]

    async def change_seq(self) -> int:
        return int(await self._db.fetchval("SELECT change_seq FROM cluster_state"))

    async def devices_changed_since(
        self, seq: int, batch_size: int = _BATCH
    ) -> AsyncIterator[list[DeviceRecord]]:
        last: tuple[int, str] = (seq, "")
        while True:
            rows = await self._db.fetch(
                f"SELECT {DEVICE_COLUMN_LIST}, updated_seq FROM devices"  # noqa: S608 - constant column list
                " WHERE updated_seq > $1 AND (updated_seq, device_id) > ($2, $3)"
                " ORDER BY updated_seq, device_id LIMIT $4",
                seq,
                *last,
                batch_size,
            )
            if not rows:
                return
            yield [device_from_row(row) for row in rows]
            last = (rows[-1][-1], rows[-1][0])

    async def users_changed_since(self, seq: int) -> list[UserRecord]:
        rows = await self._db.fetch("SELECT user_id, roles FROM users WHERE updated_seq > $1", seq)
        return [user_from_row(row) for row in rows]

    # -- flags, history and counters ------------------------------------------------------------

    async def load_flags(self) -> dict[Eui, FlagState]:
        rows = await self._db.fetch(
            "SELECT device_id, set_by, set_at, request_id, consumer_reference FROM flags ORDER BY device_id"
        )
        return {row[0]: FlagState(*row) for row in rows}

    async def flag_history(self, device: Eui | None = None, limit: int | None = None) -> list[FlagEvent]:
        """Flag events, oldest first: of one device or of all; with `limit`, the most recent ones."""
        rows = await self._db.fetch(
            f"SELECT {_HISTORY_COLUMNS} FROM flag_history"  # noqa: S608 - constant column list
            " WHERE $1::text IS NULL OR device_id = $1 ORDER BY id DESC LIMIT $2",
            device,
            limit,
        )
        return [flag_event_from_row(row, row[7]) for row in reversed(rows)]

    async def commit(self, batch: CommitBatch) -> CommitResult:
        """One transaction: history for every event, the flags of accepted changes, the flag epoch
        (and its NOTIFY) if a flag changed, the counters checked and advanced, the pending forwards
        and their claims."""
        counters = checked_counters(batch.counters)
        request_ids = checked_request_ids(batch.request_ids)
        epoch: int | None = None
        async with self._db.acquire() as db, db.transaction():
            if batch.withdrawn:  # first: a retry in the same batch is then recorded afresh
                await db.execute(_WITHDRAW, [str(rid) for rid in batch.withdrawn], batch.owner)
            if batch.flag_events:
                epoch = await self._apply_flag_events(db, batch.flag_events)
            rows = await db.fetch(
                _ADVANCE_COUNTERS, [name for name, _ in counters], [value for _, value in counters]
            )
            recorded = await db.fetch(
                _RECORD_REQUEST_IDS, [name for name, _ in request_ids], [value for _, value in request_ids]
            )
            claimed, answers, here, known = await self._apply_forwards(db, batch)
        advanced = {row[0]: NO_COUNTER if row[1] is None else int(row[1]) for row in rows}
        return CommitResult(
            advanced,
            epoch,
            frozenset((row[0], int(row[1])) for row in recorded),
            claimed=claimed,
            answers=answers,
            answered_here=here,
            stored_forwards=known,
        )

    @staticmethod
    async def _apply_flag_events(db: _Connection, events: Sequence[FlagEvent]) -> int | None:
        changes = [event for event in events if event.outcome == OUTCOME_ACCEPTED]
        # The epoch row is locked first, by every flag-changing commit: they serialise on it.
        epoch = None if not changes else (await db.fetchrow(_NEXT_EPOCH) or (None,))[0]
        await db.execute(
            _INSERT_HISTORY,
            [e.device_id for e in events],
            ["set" if e.set else "clear" for e in events],
            [e.requester for e in events],
            [e.request_id for e in events],
            [e.declaration for e in events],
            [e.consumer_reference for e in events],
            [e.outcome for e in events],
            [e.at for e in events],
            [epoch if e.outcome == OUTCOME_ACCEPTED else None for e in events],
        )
        for event in changes:  # in order: a batch may set and clear the same device
            if event.set:
                await db.execute(
                    "INSERT INTO flags (device_id, set_by, set_at, request_id, consumer_reference)"
                    " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (device_id) DO UPDATE SET"
                    " set_by = excluded.set_by, set_at = excluded.set_at, request_id = excluded.request_id,"
                    " consumer_reference = excluded.consumer_reference",
                    event.device_id,
                    event.requester,
                    event.at,
                    event.request_id,
                    event.consumer_reference,
                )
            else:
                await db.execute("DELETE FROM flags WHERE device_id = $1", event.device_id)
        return epoch

    async def purge_request_ids(self, before: datetime) -> int:
        """As SqliteStore.purge_request_ids."""
        status = await self._db.execute("DELETE FROM request_ids WHERE accepted_at < $1", before)
        await self._db.execute(_PURGE_ANSWERED, before)
        return int(status.rsplit(" ", 1)[-1])

    @staticmethod
    async def _apply_forwards(
        db: _Connection, batch: CommitBatch
    ) -> tuple[dict[RequestId, Claim], dict[RequestId, str], frozenset[RequestId], frozenset[RequestId]]:
        """As SqliteStore: forwards in, claims (responses before timeouts), settlements."""
        known: frozenset[RequestId] = frozenset()
        if batch.forwarded:
            entries = batch.forwarded
            inserted = await db.fetch(
                _INSERT_FORWARDS,
                [str(entry.request_id) for entry in entries],
                [entry.request_id.originator for entry in entries],
                [entry.request_id.target for entry in entries],
                [entry.request_id.counter for entry in entries],
                [entry.srv for entry in entries],
                [entry.service_reference for entry in entries],
                [entry.deadline for entry in entries],
                batch.owner,
            )
            stored = {row[0] for row in inserted}
            known = frozenset(entry.request_id for entry in entries if str(entry.request_id) not in stored)
        claimed: dict[RequestId, Claim] = {}
        if batch.answered:
            for row in await db.fetch(_CLAIM_RESPONSE, [str(rid) for rid in batch.answered], batch.owner):
                forward = _forward(row)
                claimed[forward.request_id] = Claim(ANSWER_RESPONSE, forward)
        timing_out = [str(rid) for rid in batch.timed_out if rid not in claimed]
        if timing_out:
            for row in await db.fetch(_CLAIM_TIMEOUT, timing_out, batch.timeout_grace_seconds, batch.owner):
                forward = _forward(row)
                claimed[forward.request_id] = Claim(ANSWER_TIMEOUT, forward)
        unclaimed = [str(rid) for rid in (*batch.answered, *batch.timed_out) if rid not in claimed]
        answers: dict[RequestId, str] = {}
        here: set[RequestId] = set()
        for row in await db.fetch(_ANSWERS, unclaimed) if unclaimed else ():
            answers[_request_id(row)] = row[3]
            if row[4] == batch.owner:
                here.add(_request_id(row))
        if batch.settled:
            await db.execute(_SETTLE, [str(rid) for rid in batch.settled])
        return claimed, answers, frozenset(here), known

    async def load_pending(self, owner: str = "") -> list[ForwardedRequest]:
        rows = await self._db.fetch(
            f"SELECT {_FORWARD_COLUMNS} FROM pending_requests WHERE answer IS NULL AND owner = $1"  # noqa: S608 - constant column list
            " ORDER BY deadline",
            owner,
        )
        return [_forward(row) for row in rows]

    async def overdue_pending(self, grace_seconds: float, limit: int) -> list[ForwardedRequest]:
        """As SqliteStore.overdue_pending, by the database's clock (one clock for every instance)."""
        async with self._db.acquire() as db, db.transaction():
            return [_forward(row) for row in await db.fetch(_OVERDUE, grace_seconds, limit)]

    async def load_request_counters(self) -> dict[Eui, int]:
        rows = await self._db.fetch("SELECT originator, counter FROM request_counters")
        return {row[0]: int(row[1]) for row in rows}

    async def dangling_references(self, limit: int = 100) -> tuple[list[tuple[Eui, str, Eui]], int]:
        """As SqliteStore.dangling_references."""
        rows = await self._db.fetch(f"{DANGLING_REFERENCES} ORDER BY 1, 2 LIMIT $1", limit)
        total = await self._db.fetchval(f"SELECT count(*) FROM ({DANGLING_REFERENCES}) AS dangling")  # noqa: S608 - no input in it
        return dangling_from_rows(rows), int(total)

    # -- several instances: flag epochs, leases, pending forwards -------------------------------

    async def flag_epoch(self) -> int:
        return int(await self._db.fetchval("SELECT flag_epoch FROM cluster_state"))

    async def flag_changes_since(self, epoch: int) -> FlagChanges:
        """Each device whose flag changed after `epoch`, with its state as of the returned epoch."""
        rows = await self._db.fetch(_FLAG_CHANGES, epoch)
        return FlagChanges(
            epoch=int(rows[0][0]),
            flagged={row[1]: row[2] == "set" for row in rows if row[1] is not None},
        )

    async def listen(self, channel: str, callback: Callable[[str], None]) -> None:
        """Call `callback(payload)` for every NOTIFY on `channel`, on a connection of its own.

        Notifications sent while that connection is down are lost: callers also poll
        (flag_changes_since) on their lease heartbeat, so a missed NOTIFY only delays, and call
        `keep_listening` there, which reconnects it after a restart of the database.
        """

        def deliver(_connection: object, _pid: int, _channel: str, payload: object) -> None:
            callback(str(payload))

        async with self._listening:
            self._channels.append((channel, deliver))
            if self._listener is not None:
                try:
                    await self._listener.add_listener(channel, deliver)
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    pass  # a lost connection: reopened below, with this channel
                else:
                    return
        await self.keep_listening()

    async def keep_listening(self) -> None:
        """Reopen the listener connection with every channel if it is lost (one round trip to tell)."""
        async with self._listening:
            listener = self._listener
            if listener is not None:
                try:
                    await listener.execute("SELECT 1")
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    listener.terminate()
                else:
                    return
            self._listener = None
            listener = await asyncpg.connect(self.url)
            for channel, deliver in self._channels:
                await listener.add_listener(channel, deliver)
            self._listener = listener

    async def join(self, instance: str, applied_epoch: int, lease_seconds: float) -> bool:
        """Take (or retake) `instance`'s lease; only if `applied_epoch` is the current flag epoch."""
        return await self._db.fetchval(_JOIN, instance, applied_epoch, lease_seconds) is not None

    async def renew(self, instance: str, applied_epoch: int, lease_seconds: float) -> bool:
        """Extend a live lease and record the flag epoch applied; False: the lease had lapsed (the
        instance must catch up and `join` again before it decides consumption requests)."""
        return await self._db.fetchrow(_RENEW, instance, applied_epoch, lease_seconds) is not None

    async def leave(self, instance: str) -> None:
        """Give the lease up (clean stop): nobody waits for this instance any more."""
        await self._db.execute("DELETE FROM instance_leases WHERE instance = $1", instance)

    async def unapplied(self, epoch: int) -> list[str]:
        """The live instances that have not applied `epoch` yet (an I0 to a flag request waits for none)."""
        return [row[0] for row in await self._db.fetch(_UNAPPLIED, epoch)]

    async def wait_applied(self, epoch: int, poll_seconds: float = 0.5) -> None:
        """Return once every live instance has applied `epoch` or its lease has lapsed: woken by each
        acknowledgement (NOTIFY on ACKS_CHANNEL), checked again at least every `poll_seconds` (a
        lease lapses without a notification)."""
        if self._acked is None:
            acked = self._acked = asyncio.Event()
            await self.listen(ACKS_CHANNEL, lambda _instance: acked.set())
        while True:
            self._acked.clear()  # before the check: an acknowledgement after it wakes the wait
            if not await self.unapplied(epoch):
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), poll_seconds)
