"""Where outcome records are kept: a SQLite file of their own, or the PostgreSQL store's database.

The recorder sees an `OutcomeDatabase`: it migrates it once at start (on the event loop) and makes a
writer connection in its worker thread (again after each failed write); reports open a `Reader` of the
same location (gateway/outcomes/queries.py). `gateway.storage.outcome_database` picks one from the
configuration, as `open_store` picks the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import asyncpg

from gateway.outcomes import pg
from gateway.outcomes.schema import COMPONENT, MIGRATIONS, PG_MIGRATIONS
from gateway.outcomes.writes import SqliteWriter
from gateway.postgres import migrate_component
from gateway.store import connect, migrate, open_connection

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable
    from pathlib import Path

    from gateway.outcomes.writes import OutcomeWriter


class OutcomeDatabase(Protocol):
    @property
    def location(self) -> Path | str:
        """The SQLite path or the postgresql:// URL (what `open_reader` takes)."""
        ...

    async def migrate(self) -> None:
        """Create or bring up to date the outcome tables."""
        ...

    def connect(self) -> OutcomeWriter:
        """A writer on a new connection, made and used in the recorder's worker thread."""
        ...


@dataclass(frozen=True, slots=True)
class SqliteOutcomes:
    path: Path
    opener: Callable[[Path], sqlite3.Connection] = field(default=open_connection, compare=False)
    """Makes the worker thread's connection (a seam for tests: a full or read-only disk)."""

    @property
    def location(self) -> Path:
        return self.path

    async def migrate(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = await connect(self.path)
        try:
            await migrate(db, COMPONENT, MIGRATIONS)
        finally:
            await db.close()

    def connect(self) -> OutcomeWriter:
        return SqliteWriter(self.opener(self.path))


@dataclass(frozen=True, slots=True)
class PostgresOutcomes:
    url: str
    opener: pg.Opener = field(default=pg.connect, compare=False)
    """Makes the worker thread's connection, on its loop (a seam for tests: a read-only database)."""

    @property
    def location(self) -> str:
        return self.url

    async def migrate(self) -> None:
        # A pool of one: the store's migration helper takes a pool's connection.
        pool = await asyncpg.create_pool(self.url, min_size=1, max_size=1, timeout=pg.CONNECT_TIMEOUT_SECONDS)
        try:
            async with pool.acquire() as db:
                await migrate_component(db, COMPONENT, PG_MIGRATIONS)
        finally:
            await pool.close()

    def connect(self) -> OutcomeWriter:
        return pg.PostgresWriter(self.url, self.opener)
