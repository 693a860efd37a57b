"""/healthz and /readyz beside /metrics; sd_notify over a fake $NOTIFY_SOCKET."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

import pytest

from gateway.daemon import wait_ready
from gateway.health import LIVENESS_SECONDS, Health
from gateway.metrics import Metrics
from gateway.mqtt import ConnectionEvent
from gateway.systemd import notify
from simulator.server import free_port

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def served() -> Iterator[tuple[str, Health, Clock]]:
    clock = Clock()
    health = Health(monotonic=clock)
    server = Metrics().serve(free_port(), health)
    try:
        yield f"http://127.0.0.1:{server.port}", health, clock
    finally:
        server.close()


def test_readiness_needs_a_live_loop_an_open_store_and_the_broker(served: tuple[str, Health, Clock]) -> None:
    url, health, clock = served
    assert get(f"{url}/healthz") == (503, "event loop not running\n")
    health.beat()
    assert get(f"{url}/healthz") == (200, "ok\n")
    assert get(f"{url}/readyz") == (503, "store not open\n")
    health.store_open = True
    assert get(f"{url}/readyz") == (503, "not connected to the broker\n")
    health.connection_event(ConnectionEvent.CONNECTED)
    assert get(f"{url}/readyz") == (200, "ok\n")
    assert wait_ready(f"{url}/readyz", 0) == "ready"
    health.connection_event(ConnectionEvent.LOST)
    assert get(f"{url}/readyz") == (503, "not connected to the broker\n")
    assert wait_ready(f"{url}/readyz", 0) == "not ready: not connected to the broker"
    health.connection_event(ConnectionEvent.RECONNECTED)
    clock.now += LIVENESS_SECONDS
    assert get(f"{url}/healthz") == (503, "event loop not running\n"), "a stuck loop is not live"
    assert get(f"{url}/readyz")[0] == 503
    status, text = get(f"{url}/metrics")
    assert status == 200
    assert "mp169_requests" in text


def test_ready_says_why_when_no_gateway_answers() -> None:
    answer = wait_ready(f"http://127.0.0.1:{free_port()}/readyz", 0)
    assert answer.startswith("not ready: no gateway answers at")


def test_a_port_in_use_is_an_oserror_for_the_caller_to_name() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="in use"):
            Metrics().serve(taken.getsockname()[1])


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_sends_one_datagram_to_the_notify_socket(tmp_path: Path, abstract: bool) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        if abstract:
            name = f"mp169-test-{free_port()}"
            manager.bind("\0" + name)
            address = "@" + name
        else:
            address = str(tmp_path / "notify")
            manager.bind(address)
        manager.settimeout(5)
        assert notify("READY=1\nSTATUS=connected", {"NOTIFY_SOCKET": address})
        assert manager.recv(4096) == b"READY=1\nSTATUS=connected"


def test_sd_notify_outside_systemd_sends_nothing_and_a_dead_socket_is_not_an_error(tmp_path: Path) -> None:
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")})
