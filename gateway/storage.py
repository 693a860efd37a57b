"""The store a configuration selects: PostgreSQL when `store.url` is set, else SQLite at `store.path`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gateway.postgres import PostgresStore
from gateway.store import SqliteStore

if TYPE_CHECKING:
    from gateway.config import StoreSettings
    from gateway.store import FlagStore


def open_store(settings: StoreSettings) -> FlagStore:
    """The configured store, not opened yet: `async with open_store(settings.store) as store: ...`."""
    if settings.postgres:
        return PostgresStore(settings.url)
    return SqliteStore(Path(settings.path))
