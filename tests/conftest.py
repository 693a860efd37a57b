"""Shared fixtures. Keep this small and generic; topic-specific fixtures live next to their tests."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import pytest

from gateway.config import StoreSettings
from simulator.mosquitto import Mosquitto
from tests.servers import private_postgres, running

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from pathlib import Path

    from simulator.postgres import Postgres


@pytest.fixture
def mosquitto_settings() -> Mapping[str, str]:
    """Config lines for the `mosquitto` fixture's broker; a test module overrides this to change them."""
    return {}


@pytest.fixture
def mosquitto(tmp_path: Path, mosquitto_settings: Mapping[str, str]) -> Iterator[Mosquitto]:
    """A started private Mosquitto (free port on 127.0.0.1, persistence in tmp_path), always stopped."""
    with running(Mosquitto(tmp_path / "mosquitto", mosquitto_settings)) as broker:
        yield broker


_DATABASES = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """One private PostgreSQL for the session (free port, its own cluster), always removed."""
    with private_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: Postgres) -> Iterator[str]:
    """The URL of a new, empty database on the session's server, dropped after the test."""
    name = f"test_{next(_DATABASES)}"
    postgres_server.create_database(name)
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSettings:
    """Where a store lives: a SQLite file in a folder still to be made, or an empty PostgreSQL database
    (store tests take this fixture, so each runs against both)."""
    if request.param == "sqlite":
        return StoreSettings(path=str(tmp_path / "var" / "mp169.sqlite3"))
    return StoreSettings(url=request.getfixturevalue("postgres_url"))


@pytest.fixture(params=["sqlite", "postgresql"])
def outcome_location(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where outcome records live: a SQLite file (not made yet), or an empty PostgreSQL database
    (outcome and report tests take this fixture, so each runs against both)."""
    if request.param == "sqlite":
        return tmp_path / "outcomes.sqlite3"
    url: str = request.getfixturevalue("postgres_url")
    return url
