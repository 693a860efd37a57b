"""A private Mosquitto for the simulator, tests and benchmarks: own config, port and persistence.

Never the system broker: the port is a free one on 127.0.0.1, chosen at start and kept across
restarts, and persistence is on, so a restart keeps sessions and queued QoS 1 messages (Mosquitto
writes its database on a clean shutdown; `kill()` loses what was not saved, like a crash).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
_START_SECONDS = 10.0
_STOP_SECONDS = 10.0
# The free port is found by binding and releasing it; another process may take it meanwhile.
_PORT_ATTEMPTS = 3

# Generous limits: the tests and the benchmark queue thousands of QoS 1 messages for offline sessions.
DEFAULT_SETTINGS: Mapping[str, str] = {
    "allow_anonymous": "true",
    "max_inflight_messages": "1000",
    "max_queued_messages": "0",
    "set_tcp_nodelay": "true",
}


class MosquittoError(RuntimeError):
    pass


def mosquitto_binary() -> str:
    """The Mosquitto binary, or a failure telling how to get one (CI installs it: never skip)."""
    found = shutil.which("mosquitto") or next((c for c in _CANDIDATES if os.access(c, os.X_OK)), None)
    if found is None:
        raise MosquittoError(
            "mosquitto not found on PATH or in /usr/sbin: install it (apt-get install mosquitto)"
        )
    return found


def current_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Mosquitto:
    """One broker process. `settings` adds or overrides top-level config lines (`key value`)."""

    def __init__(self, directory: Path, settings: Mapping[str, str] | None = None) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.port = free_port()
        self.config_path = directory / "mosquitto.conf"
        self.log_path = directory / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._started = False

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start and wait until the port accepts connections (a restart keeps the port)."""
        if self.running:
            raise MosquittoError("already running")
        attempts = 1 if self._started else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            self.config_path.write_text(self.config_text(), encoding="utf-8")
            self._process = subprocess.Popen(  # noqa: S603 - the Debian binary, a config file we wrote
                [mosquitto_binary(), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                self._wait_until_listening()
            except MosquittoError:
                if attempt == attempts:
                    raise
                self.port = free_port()
            else:
                self._started = True
                return

    def stop(self) -> None:
        """SIGTERM and wait: Mosquitto saves its database on the way out."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash; whatever was not saved yet is lost."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        """Clean stop and start again on the same port with the same persistence."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def config_text(self) -> str:
        """The configuration written before each start; override to run another configuration."""
        # Run as root, Mosquitto drops to the "mosquitto" user, which cannot write our persistence folder.
        lines = [
            f"user {current_user()}",
            f"listener {self.port} 127.0.0.1",
            "persistence true",
            f"persistence_location {self.directory}/",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            *(f"{key} {value}" for key, value in self.settings.items()),
        ]
        return "\n".join(lines) + "\n"

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + _START_SECONDS
        while time.monotonic() < deadline:
            if not self.running:
                raise MosquittoError(f"mosquitto exited at start:\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                return
            time.sleep(0.02)
        self.kill()
        raise MosquittoError(f"mosquitto did not listen on port {self.port}:\n{self.log_tail()}")

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
