"""The store a configuration selects: PostgreSQL when `store.url` is set, else SQLite at `store.path`;
and where its outcome records go: the same PostgreSQL database, or a SQLite file beside the store."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gateway.outcomes.database import PostgresOutcomes, SqliteOutcomes
from gateway.postgres import PostgresStore
from gateway.store import SqliteStore

if TYPE_CHECKING:
    from gateway.config import Settings, StoreSettings
    from gateway.outcomes.database import OutcomeDatabase
    from gateway.store import FlagStore


def open_store(settings: StoreSettings) -> FlagStore:
    """The configured store, not opened yet: `async with open_store(settings.store) as store: ...`."""
    if settings.postgres:
        return PostgresStore(settings.url)
    return SqliteStore(Path(settings.path))


def outcome_database(settings: Settings) -> OutcomeDatabase:
    """Where the configured gateway records outcomes: every instance of a PostgreSQL store into its
    shared database (`outcomes.path` is not used), a SQLite gateway into `settings.outcomes_path`."""
    if settings.store.postgres:
        return PostgresOutcomes(settings.store.url)
    return SqliteOutcomes(settings.outcomes_path)
