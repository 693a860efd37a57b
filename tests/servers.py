"""Running a private server for the length of a fixture: a failure to start fails the test (never a skip)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, TypeVar

import pytest

from simulator.postgres import Postgres, PostgresError
from simulator.server import LocalServer, ServerError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

_Server = TypeVar("_Server", bound=LocalServer)


@contextlib.contextmanager
def running(server: _Server, finish: Callable[[], None] | None = None) -> Iterator[_Server]:
    """Start `server`, yield it, then `finish()` (default: stop it), whatever the test did."""
    try:
        server.start()
    except ServerError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        (finish or server.stop)()


@contextlib.contextmanager
def private_postgres() -> Iterator[Postgres]:
    """A new PostgreSQL cluster, started; removed afterwards. No binaries or a failed initdb fails."""
    try:
        server = Postgres()
    except PostgresError as exc:
        pytest.fail(str(exc))
    with running(server, server.remove):
        yield server
