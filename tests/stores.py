"""A store where a command run in a folder looks by default: `mp169 run` and `replay` refuse to start
without one (they would work on a new, empty store)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.config import StoreSettings
from gateway.store import SqliteStore

DEFAULT_STORE = Path(StoreSettings().path)


def empty_store(folder: Path) -> Path:
    """Create the default store (var/mp169.sqlite3) under `folder`, with the schema and no rows."""
    path = folder / DEFAULT_STORE

    async def create() -> None:
        async with SqliteStore(path):
            pass

    asyncio.run(create())
    return path
