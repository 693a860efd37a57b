"""`mp169 run` under a service manager: READY=1 once connected, STOPPING=1 on SIGTERM; a metrics
port in use names the setting."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from simulator.server import free_port
from tests.gateway.test_mqtt import GUARD_SECONDS
from tests.stores import empty_store

if TYPE_CHECKING:
    from pathlib import Path

    from simulator.mosquitto import Mosquitto


def mp169(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", *args]


@pytest.mark.broker
def test_run_tells_systemd_when_it_is_ready_and_when_it_stops(mosquitto: Mosquitto, tmp_path: Path) -> None:
    empty_store(tmp_path)
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(address)
        manager.settimeout(GUARD_SECONDS)
        daemon = subprocess.Popen(
            mp169("run", "--broker", mosquitto.url, "--metrics-port", str(free_port())),
            cwd=tmp_path,
            env={**os.environ, "NOTIFY_SOCKET": address},
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert manager.recv(4096).startswith(b"READY=1\nSTATUS=connected to mqtt://127.0.0.1:")
            daemon.terminate()
            assert manager.recv(4096) == b"STOPPING=1"
            _, errors = daemon.communicate(timeout=GUARD_SECONDS)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
    assert daemon.returncode == 0, errors


def test_a_metrics_port_in_use_names_the_setting(tmp_path: Path) -> None:
    empty_store(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            mp169("run", "--metrics-port", str(port)),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=GUARD_SECONDS,
            check=False,
        )
    assert done.returncode == 2
    assert f"mp169 run: gateway.metrics_port {port}: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "--metrics-port or MP169_GATEWAY__METRICS_PORT" in done.stderr
    assert "Traceback" not in done.stderr
