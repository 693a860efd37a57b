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
- **pending forwards** (`pending_forwards`): a forwarded request and its deadline, by the database's
  clock; a device's answer or a timeout `claim`s it with a DELETE, so exactly one instance answers.

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
    NOT_A_DEVICE,
    OUTCOME_ACCEPTED,
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
# A batch's routing writes as one statement, so one round trip (and atomic without BEGIN and
# COMMIT): the counters checked and advanced, the RequestIDs recorded (RETURNING tells the two
# apart: true for an advanced counter with its previous value, false for a recorded RequestID), the
# forwards awaiting their device written and the answered ones removed. Every part sees the
# snapshot before the statement: a RequestID both forwarded and resolved in one batch is only
# deleted (commit() leaves it out of the forwards), as inserting then deleting it would leave it.
_ROUTING_COMMIT = """
    WITH advanced AS (
        INSERT INTO request_counters (originator, counter) SELECT * FROM unnest($1::text[], $2::numeric[])
        ON CONFLICT (originator) DO UPDATE SET previous = request_counters.counter, counter = excluded.counter
        WHERE excluded.counter > request_counters.counter
        RETURNING originator, previous
    ), recorded AS (
        INSERT INTO request_ids (originator, counter) SELECT * FROM unnest($3::text[], $4::numeric[])
        ON CONFLICT (originator, counter) DO NOTHING
        RETURNING originator, counter
    ), forwarded AS (
        INSERT INTO pending_requests
            (request_id, originator, target, counter, srv, service_reference, deadline)
        SELECT * FROM unnest(
            $5::text[], $6::text[], $7::text[], $8::numeric[], $9::text[], $10::text[], $11::timestamptz[]
        )
        ON CONFLICT (request_id) DO UPDATE SET deadline = excluded.deadline
    ), resolved AS (
        DELETE FROM pending_requests WHERE request_id = ANY($12::text[])
    )
    SELECT true, originator, previous FROM advanced
    UNION ALL SELECT false, originator, counter FROM recorded
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
_PENDING_COLUMNS = "request_id, owner, srv, service_reference, forwarded_at, deadline"
_ADD_PENDING = """
    INSERT INTO pending_forwards (request_id, owner, srv, service_reference, deadline)
    SELECT r, $2, s, ref, now() + make_interval(secs => $5)
    FROM unnest($1::text[], $3::text[], $4::text[]) AS p(r, s, ref)
    ON CONFLICT (request_id) DO NOTHING
"""
_CLAIM = f"DELETE FROM pending_forwards WHERE request_id = $1 RETURNING {_PENDING_COLUMNS}"  # noqa: S608
# SKIP LOCKED: instances sweeping together take disjoint rows instead of queueing on each other.
_CLAIM_EXPIRED = f"""
    DELETE FROM pending_forwards WHERE request_id IN (
        SELECT request_id FROM pending_forwards WHERE deadline <= now()
        ORDER BY deadline LIMIT $1 FOR UPDATE SKIP LOCKED
    ) RETURNING {_PENDING_COLUMNS}
"""  # noqa: S608 - constant column list


@dataclass(frozen=True, slots=True)
class FlagChanges:
    """The flags changed after an epoch: each device's state as of `epoch`."""

    epoch: int
    flagged: dict[Eui, bool]


@dataclass(frozen=True, slots=True)
class PendingForward:
    """A forwarded request waiting for its device's answer, shared by the instances."""

    request_id: str
    owner: str
    """The instance that forwarded it (for operators: whoever claims it answers)."""
    srv: str
    service_reference: str
    forwarded_at: datetime
    deadline: datetime
    """By the database's clock: one clock for every instance."""


def _pending(row: Row) -> PendingForward:
    return PendingForward(row[0], row[1], row[2], row[3], row[4], row[5])


async def _migrate(db: _Connection, component: str, migrations: Sequence[str]) -> None:
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
                await _migrate(db, CORE, MIGRATIONS)
                await _migrate(db, CLUSTER, CLUSTER_MIGRATIONS)
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
        (and its NOTIFY) if a flag changed, the counters checked and advanced, the pending forwards.
        Without flag events (nearly every batch) it is one statement: one round trip to the server."""
        counters = checked_counters(batch.counters)
        request_ids = checked_request_ids(batch.request_ids)
        resolved = [str(rid) for rid in batch.resolved]
        # The last of a RequestID's entries, as consecutive upserts would leave it; none if resolved too.
        gone = set(resolved)
        forwarded = [
            entry for key, entry in {str(e.request_id): e for e in batch.forwarded}.items() if key not in gone
        ]
        arguments = (
            [name for name, _ in counters],
            [value for _, value in counters],
            [name for name, _ in request_ids],
            [value for _, value in request_ids],
            [str(entry.request_id) for entry in forwarded],
            [entry.request_id.originator for entry in forwarded],
            [entry.request_id.target for entry in forwarded],
            [entry.request_id.counter for entry in forwarded],
            [entry.srv for entry in forwarded],
            [entry.service_reference for entry in forwarded],
            [entry.deadline for entry in forwarded],
            resolved,
        )
        epoch: int | None = None
        async with self._db.acquire() as db:
            if batch.flag_events:
                async with db.transaction():
                    epoch = await self._apply_flag_events(db, batch.flag_events)
                    rows = await db.fetch(_ROUTING_COMMIT, *arguments)
            else:
                rows = await db.fetch(_ROUTING_COMMIT, *arguments)
        advanced = {row[1]: NO_COUNTER if row[2] is None else int(row[2]) for row in rows if row[0]}
        return CommitResult(advanced, epoch, frozenset((row[1], int(row[2])) for row in rows if not row[0]))

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
        """Forget RequestIDs recorded before `before` (older than any redelivery can be); how many."""
        status = await self._db.execute("DELETE FROM request_ids WHERE accepted_at < $1", before)
        return int(status.rsplit(" ", 1)[-1])

    async def load_pending(self) -> list[ForwardedRequest]:
        rows = await self._db.fetch(
            "SELECT originator, target, counter, srv, service_reference, deadline FROM pending_requests"
            " ORDER BY deadline"
        )
        return [
            ForwardedRequest(RequestId(Eui(row[0]), Eui(row[1]), int(row[2])), row[3], row[4], row[5])
            for row in rows
        ]

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

    async def add_pending(
        self, owner: str, forwards: Iterable[tuple[str, str, str]], timeout_seconds: float
    ) -> None:
        """Record forwarded requests (RequestID, SRV, service reference), each due `timeout_seconds`
        from now by the database's clock; a request recorded already keeps its first deadline."""
        rows = list(forwards)
        await self._db.execute(
            _ADD_PENDING,
            [row[0] for row in rows],
            owner,
            [row[1] for row in rows],
            [row[2] for row in rows],
            timeout_seconds,
        )

    async def claim(self, request_id: str) -> PendingForward | None:
        """Take a pending request for its device's answer; None: answered or timed out already."""
        row = await self._db.fetchrow(_CLAIM, request_id)
        return None if row is None else _pending(row)

    async def claim_expired(self, limit: int = 1_000) -> list[PendingForward]:
        """Take up to `limit` pending requests past their deadline, whoever forwarded them: each is
        taken by exactly one instance, which answers it with the timeout."""
        return [_pending(row) for row in await self._db.fetch(_CLAIM_EXPIRED, limit)]
