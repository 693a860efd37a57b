"""Shared fixtures. Keep this small and generic; topic-specific fixtures live next to their tests."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import asyncpg
import pytest

from simulator.mosquitto import Mosquitto, MosquittoError
from tests.postgres import Postgres, PostgresError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A started private Mosquitto (free port on 127.0.0.1, persistence in tmp_path), always stopped."""
    broker = Mosquitto(tmp_path / "mosquitto")
    try:
        broker.start()
    except MosquittoError as exc:
        pytest.fail(str(exc))
    try:
        yield broker
    finally:
        broker.stop()


_DATABASES = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """One private PostgreSQL for the session (free port, its own cluster), always removed."""
    try:
        server = Postgres()
        server.start()
    except PostgresError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
async def postgres_url(postgres_server: Postgres) -> AsyncIterator[str]:
    """The URL of a new, empty database on the session's server, dropped after the test."""
    name = f"test_{next(_DATABASES)}"
    admin = await asyncpg.connect(postgres_server.url())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield postgres_server.url(name)
    admin = await asyncpg.connect(postgres_server.url())
    try:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()
