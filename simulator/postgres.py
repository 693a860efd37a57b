"""A private PostgreSQL for tests and benchmarks: its own cluster in a temporary folder, on a free port.

Never the system server: `initdb` makes a new cluster (trust authentication, loopback only) and
`postgres` runs it on a free port of 127.0.0.1, its socket in the cluster's folder. Debian keeps the
binaries in /usr/lib/postgresql/<version>/bin (not on PATH); `.ci/run` installs the package.

PostgreSQL refuses to run as root, and tests and CI run as root: then the cluster belongs to the
unprivileged `postgres` system user (created by the Debian package) and both programs run as that
user (`subprocess` switches user before exec). Its folder is made with `mkdtemp` under the system
temporary directory, which that user can reach (pytest's own tmp_path, mode 0700 under root's,
it cannot). As any other user, the programs run as that user in a folder of its own.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from simulator.server import LocalServer, ServerError

if TYPE_CHECKING:
    from collections.abc import Mapping

_SERVICE_USER = "postgres"
# Small and quick: a test cluster needs neither durability across power loss nor big buffers.
_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "max_connections": "200",
}


class PostgresError(ServerError):
    pass


def postgres_bindir() -> Path:
    """Where initdb, pg_ctl and postgres are: on PATH, or Debian's newest versioned folder."""
    found = shutil.which("initdb")
    if found is not None:
        return Path(os.path.realpath(found)).parent
    folders = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda folder: int(folder.parent.name))
    if not folders:
        raise PostgresError(
            "PostgreSQL not found (initdb on PATH or /usr/lib/postgresql/*/bin): "
            "install it (apt-get install postgresql)"
        )
    return folders[-1]


def _run_as() -> str | None:
    """The user the server runs as: None (this one) unless this is root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(_SERVICE_USER)
    except KeyError as exc:
        raise PostgresError(
            f"running as root, and PostgreSQL refuses root: no {_SERVICE_USER!r} user to run it as "
            "(the Debian postgresql package creates it)"
        ) from exc
    return _SERVICE_USER


class Postgres(LocalServer):
    """One PostgreSQL cluster and server process. `url(database)` for clients; `settings` add or
    override server settings (the defaults trade durability for speed: right for tests only).
    `stop()` is a fast shutdown (SIGINT): clients are disconnected, the data is written."""

    name = "postgres"
    error = PostgresError
    start_seconds = 30.0
    stop_signal = signal.SIGINT

    def __init__(self, settings: Mapping[str, str] | None = None) -> None:
        self._user = _run_as()
        self.directory = Path(tempfile.mkdtemp(prefix="mp169-postgres-"))
        super().__init__(self.directory / "postgres.log")
        self.settings = {**_SETTINGS, **(settings or {})}
        self.data = self.directory / "data"
        if self._user is not None:
            shutil.chown(self.directory, user=self._user)
        self._bindir = postgres_bindir()
        self._initdb()

    @property
    def superuser(self) -> str:
        return self._user or pwd.getpwuid(os.getuid()).pw_name

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _initdb(self) -> None:
        result = subprocess.run(  # noqa: S603, PLW1510 - the Debian binary; the return code is checked below
            [
                str(self._bindir / "initdb"),
                "--pgdata",
                str(self.data),
                "--auth",
                "trust",
                "--username",
                self.superuser,
                "--encoding",
                "UTF8",
                "--no-sync",
            ],
            capture_output=True,
            user=self._user,
        )
        if result.returncode != 0:
            raise PostgresError(f"initdb failed:\n{result.stdout.decode()}\n{result.stderr.decode()}")

    def _launch(self) -> subprocess.Popen[bytes]:
        options = [f"--{key}={value}" for key, value in {**self.settings, "port": self.port}.items()]
        with self.log_path.open("ab") as log:
            return subprocess.Popen(  # noqa: S603 - the Debian binary, our own folder
                [str(self._bindir / "postgres"), "-D", str(self.data), "-k", str(self.directory), *options],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                user=self._user,
            )

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def create_database(self, name: str) -> None:
        self._psql(f'CREATE DATABASE "{name}"')

    def drop_database(self, name: str) -> None:
        self._psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _psql(self, sql: str) -> None:
        command = [str(self._bindir / "psql"), "--no-psqlrc", "--quiet", "--dbname", self.url(), "-c", sql]
        result = subprocess.run(command, capture_output=True, check=False)  # noqa: S603 - the Debian psql
        if result.returncode != 0:
            raise PostgresError(f"{sql}: {result.stderr.decode(errors='replace')}")

    def _ready(self) -> bool:
        if not super()._ready():
            return False
        probe = ["-h", "127.0.0.1", "-p", str(self.port), "-U", self.superuser, "-q"]
        ready = str(self._bindir / "pg_isready")
        return subprocess.run([ready, *probe], check=False).returncode == 0  # noqa: S603 - Debian's
