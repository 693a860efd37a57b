"""A private Mosquitto for the simulator, tests and benchmarks: own config, port and persistence.

Never the system broker: the port is a free one on 127.0.0.1, chosen at start and kept across
restarts, and persistence is on, so a restart keeps sessions and queued QoS 1 messages (Mosquitto
writes its database on a clean shutdown; `kill()` loses what was not saved, like a crash).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from simulator.server import LocalServer, ServerError

if TYPE_CHECKING:
    from collections.abc import Mapping

_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")

# Generous limits: the tests and the benchmark queue thousands of QoS 1 messages for offline sessions.
DEFAULT_SETTINGS: Mapping[str, str] = {
    "allow_anonymous": "true",
    "max_inflight_messages": "1000",
    "max_queued_messages": "0",
    "set_tcp_nodelay": "true",
}


# The broker limits of the shipped configuration that tests and benchmarks run with.
SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto.conf"
SHIPPED_LIMITS = ("max_packet_size", "max_inflight_messages", "max_queued_messages")


class MosquittoError(ServerError):
    pass


def shipped_limits(config: Path = SHIPPED_CONFIG) -> dict[str, str]:
    """SHIPPED_LIMITS as deploy/mosquitto.conf sets them (its listeners and accounts are not taken)."""
    limits: dict[str, str] = {}
    for line in config.read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition(" ")
        if key in SHIPPED_LIMITS:
            limits[key] = value.strip()
    missing = set(SHIPPED_LIMITS) - set(limits)
    if missing:
        raise MosquittoError(f"{config} does not set {', '.join(sorted(missing))}")
    return limits


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


class Mosquitto(LocalServer):
    """One broker process. `settings` adds or overrides top-level config lines (`key value`).
    `stop()` is SIGTERM: Mosquitto saves its database on the way out."""

    name = "mosquitto"
    error = MosquittoError

    def __init__(self, directory: Path, settings: Mapping[str, str] | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(directory / "mosquitto.log")
        self.directory = directory
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.config_path = directory / "mosquitto.conf"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _launch(self) -> subprocess.Popen[bytes]:
        self.config_path.write_text(self.config_text(), encoding="utf-8")
        return subprocess.Popen(  # noqa: S603 - the Debian binary, a config file we wrote
            [mosquitto_binary(), "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

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
