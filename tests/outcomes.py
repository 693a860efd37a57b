"""Outcome databases for tests, on either engine (the `outcome_location` fixture): the recorder's
database with a fault of the engine's own on each (re)connection, and statements behind its back."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite
import asyncpg

from gateway.outcomes import pg
from gateway.outcomes.database import OutcomeDatabase, PostgresOutcomes, SqliteOutcomes
from gateway.outcomes.queries import is_postgres
from gateway.store import open_connection
from simulator.server import free_port

if TYPE_CHECKING:
    import sqlite3

    from gateway.outcomes.queries import Location


def database(location: Location) -> OutcomeDatabase:
    return PostgresOutcomes(str(location)) if is_postgres(location) else SqliteOutcomes(Path(location))


def placeholders(sql: str) -> str:
    """`?` placeholders as PostgreSQL's $1, $2, ..."""
    parts = sql.split("?")
    return "".join(f"{part}${n}" for n, part in enumerate(parts[:-1], 1)) + parts[-1]


async def rows(location: Location, sql: str, *args: object) -> list[tuple[Any, ...]]:
    """Run one statement (`?` placeholders) on the database behind the recorder's back; its rows."""
    if is_postgres(location):
        db = await asyncpg.connect(str(location))
        try:
            return [tuple(row) for row in await db.fetch(placeholders(sql), *args)]
        finally:
            await db.close()
    async with aiosqlite.connect(location) as db, db.execute(sql, args) as cursor:
        found = [tuple(row) for row in await cursor.fetchall()]
        await db.commit()
        return found


class Faults:
    """The outcome database as the recorder's `opener` seam finds it: writable, or with a fault the
    engine itself reports on the real connection. SQLite: "full" (a page quota at the file's size,
    SQLITE_FULL as on a full disk) or "read-only" (SQLITE_READONLY). PostgreSQL: "read-only" (a
    read-only session, SQLSTATE 25006) or "unreachable" (nothing listening: connection refused).
    Each (re)connection sees the current state."""

    def __init__(self, fault: str | None = None) -> None:
        self.fault = fault
        self.opened = 0
        self.held = False
        """The next connection waits for `release`: a write the test knows to be in flight."""
        self.waiting = False
        self._released = threading.Event()
        self.threads: set[int] = set()

    def release(self) -> None:
        self._released.set()

    def database(self, location: Location) -> OutcomeDatabase:
        if is_postgres(location):
            return PostgresOutcomes(str(location), opener=self._open_postgres)
        return SqliteOutcomes(Path(location), opener=self._open_sqlite)

    def _opening(self) -> None:
        if self.held:
            self.waiting = True
            self._released.wait(timeout=30)
        self.threads.add(threading.get_ident())

    def _open_sqlite(self, path: Path) -> sqlite3.Connection:
        self._opening()
        db = open_connection(path)  # not check_same_thread=False: the opening thread is the only user
        self.opened += 1
        if self.fault == "full":
            (pages,) = db.execute("PRAGMA page_count").fetchone()
            db.execute(f"PRAGMA max_page_count = {pages}")
        elif self.fault == "read-only":
            db.execute("PRAGMA query_only = ON")
        return db

    async def _open_postgres(self, url: str) -> asyncpg.Connection[Any]:
        self._opening()
        if self.fault == "unreachable":
            host = url.split("@", 1)[1].split("/", 1)[0]
            url = url.replace(host, f"127.0.0.1:{free_port()}")
        db = await pg.connect(url)
        self.opened += 1
        if self.fault == "read-only":
            await db.execute("SET default_transaction_read_only = on")
        return db
