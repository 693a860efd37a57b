"""A server process of our own on a free port of 127.0.0.1 (Mosquitto, PostgreSQL), never the system's.

The port is found by binding and releasing it, so another process may take it before the server
binds: the first start tries a few ports; a restart keeps the port it had.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from pathlib import Path

_STOP_SECONDS = 30.0
_PORT_ATTEMPTS = 3


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LocalServer:
    """Start, wait until ready, stop. Subclasses say how to launch and when the server is ready."""

    name: ClassVar[str]
    error: ClassVar[type[ServerError]] = ServerError
    start_seconds: ClassVar[float] = 10.0
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._started = False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _launch(self) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _ready(self) -> bool:
        """Whether the server serves now: by default, its port accepts a connection."""
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
            return True
        return False

    def start(self) -> None:
        """Start and wait until ready (a restart keeps the port)."""
        if self.running:
            raise self.error("already running")
        attempts = 1 if self._started else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            self._process = self._launch()
            try:
                self._wait_until_ready()
            except ServerError:
                if attempt == attempts:
                    raise
                self.port = free_port()
            else:
                self._started = True
                return

    def stop(self) -> None:
        """The server's clean shutdown signal, and wait."""
        self._end(self.stop_signal)

    def kill(self) -> None:
        """SIGKILL: a crash; whatever was not saved yet is lost."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        """Clean stop and start again on the same port with the same data."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_seconds
        while time.monotonic() < deadline:
            if not self.running:
                raise self.error(f"{self.name} exited at start:\n{self.log_tail()}")
            if self._ready():
                return
            time.sleep(0.02)
        self.kill()
        raise self.error(f"{self.name} did not serve on port {self.port}:\n{self.log_tail()}")

    def _end(self, signum: signal.Signals) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(timeout=_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
