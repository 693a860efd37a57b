"""Faults an operator meets, against a private Mosquitto running the shipped deploy/mosquitto.conf
limits: an oversize unparseable message, SIGTERM in every state, a crash with silent devices.

Waiting is event-driven (GUARD_SECONDS only turns a hang into a failure); "nothing else arrived" is
proved by order: a later message on the same path arrives after anything published before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sqlite3
import time
from collections import Counter
from typing import TYPE_CHECKING

import pytest

from gateway.config import Settings
from gateway.daemon import EXIT_STOP_TIMEOUT, EXIT_STORE_CORRUPT
from gateway.metrics import Metrics
from gateway.mqtt import MqttTransport
from gateway.pki import init_pki
from gateway.service import DeviceSession, GatewayService
from gateway.signing import sign
from gateway.transport import MemoryBroker, MemoryTransport
from rules.codes import ResponseCode
from simulator.mosquitto import shipped_limits
from simulator.replay import Signatures
from tests.gateway.messages import CONSUMPTION_SRV, header, request
from tests.gateway.test_daemon import Answers, Daemon, Estate, estate, gateway_settings, rid, signing_settings
from tests.gateway.test_inventory import GAS_METER, GAS_SUPPLIER, IMPORT_SUPPLIER, METER
from tests.gateway.test_mqtt import GUARD_SECONDS, Inbox, settings_for
from tests.gateway.test_shell import seed

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from gateway.pki import PkiLayout
    from simulator.mosquitto import Mosquitto

pytestmark = pytest.mark.broker

__all__ = ["estate"]  # the fixture, used by name below

# Short, so a test that waits for the stop timeout stays short; the default is 30 s.
STOP_TIMEOUT_SECONDS = 3.0


@pytest.fixture
def mosquitto_settings() -> dict[str, str]:
    """This module's broker (tests/conftest.py) runs with the shipped limits."""
    return shipped_limits()


@pytest.fixture
async def letters(mosquitto: Mosquitto) -> AsyncIterator[Inbox]:
    inbox = Inbox()
    watcher = MqttTransport(settings_for(mosquitto.url), "test-deadletters")
    await watcher.start(["dsp/deadletter"], inbox)
    yield inbox
    await watcher.abort()


def garbage(size: int, seed: int) -> bytes:
    """`size` bytes of printable garbage that starts like XML."""
    rand = random.Random(seed)
    return b"<" + bytes(rand.randrange(0x21, 0x7F) for _ in range(size - 1))


async def test_an_oversize_unparseable_message_is_dead_lettered_once_and_serves_everyone_else(
    tmp_path: Path, estate: Estate, letters: Inbox
) -> None:
    await seed(tmp_path / "gw.sqlite3")
    settings = gateway_settings(estate.url, tmp_path / "gw.sqlite3", estate.pki)
    transport = MqttTransport(settings.broker, settings.gateway.client_id)
    service = await GatewayService.start(settings, transport)
    try:
        limit = int(shipped_limits()["max_packet_size"])
        # Unparseable, and "too large" for the gateway while still under the broker's packet limit.
        big = [garbage(850_000, 1), garbage(settings.gateway.max_message_bytes + 10_000, 2)]
        assert all(len(payload) < limit for payload in big)
        for payload in big:
            await estate.raw(IMPORT_SUPPLIER, payload)
        # Another user is served meanwhile, then a small marker follows the garbage on the same path.
        # A gas read the GSME itself answers (its consumption reads address the GPF).
        await estate.send(GAS_SUPPLIER, request("6.2.8", GAS_SUPPLIER, GAS_METER, 1))
        await estate.raw(IMPORT_SUPPLIER, b"<marker")
        await letters.until(lambda messages: len(messages) == len(big) + 1)
        assert await estate.answers.until_answered(rid(GAS_SUPPLIER, GAS_METER, 1), 2) == [
            ResponseCode.ACKNOWLEDGED,
            ResponseCode.SUCCESS,
        ]
        envelopes = [json.loads(payload) for payload in letters.payloads]
        assert [envelope["payload_bytes"] for envelope in envelopes] == [*map(len, big), len(b"<marker")]
        assert all(len(payload) < limit for payload in letters.payloads)
        assert [envelope["reason"] for envelope in envelopes[1:]] == ["too-large", "not-well-formed"]
        # No RequestID in garbage: no valid DUIS answer can be made, the dead letters are the trace.
        assert [message.topic for message in estate.answers.messages] == [f"dsp/out/{GAS_SUPPLIER}"] * 2
        # Never disconnected by the broker, so nothing was redelivered.
        assert transport.reconnects == 0
    finally:
        await service.stop()
    assert service.router.unreleased == 0


# -- bounded work, whatever the broker delivers ---------------------------------------------------


async def nothing_to_flush() -> None:
    return


async def test_the_gateway_handles_at_most_its_window_even_if_the_broker_delivers_more(
    tmp_path: Path,
) -> None:
    # Mosquitto 2.0.11 does not hold a session's Receive Maximum once acknowledgements flow
    # (bench/receive_maximum.py): a memory broker with a window of 65,535 stands in for it.
    store = tmp_path / "gw.sqlite3"
    await seed(store)
    settings = Settings.model_validate(
        {
            "store": {"path": str(store)},
            "gateway": {"metrics_port": 0, "inflight_window": 2},
            "signing": {"verify": False},
        }
    )
    broker = MemoryBroker()
    devices = DeviceSession(MemoryTransport(broker, "gw-devices", receive_maximum=65535), nothing_to_flush)
    metrics = Metrics()
    service = await GatewayService.start(
        settings, MemoryTransport(broker, "gw", receive_maximum=65535), metrics=metrics, devices=devices
    )
    answers = Answers()
    user = MemoryTransport(broker, "user")
    await user.start([f"dsp/out/{IMPORT_SUPPLIER}"], answers)
    writer = sqlite3.connect(store)
    writer.execute("BEGIN IMMEDIATE")  # every commit waits (retried while the store is locked)
    try:
        for counter in range(1, 11):
            await user.publish(
                f"dsp/in/{IMPORT_SUPPLIER}", request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, counter)
            )
        async with asyncio.timeout(GUARD_SECONDS):  # the broker delivered all ten at once
            while len(broker.session("gw").in_flight) < 10 or metrics.inflight._value.get() < 2:  # noqa: ASYNC110 - the broker's and the gauge's state
                await asyncio.sleep(0.01)
        for _ in range(20):  # every delivered message has had its turns: two are handled, eight wait
            await asyncio.sleep(0)
        assert metrics.inflight._value.get() == 2
        assert len(broker.session("gw").in_flight) == 10
    finally:
        writer.rollback()
        writer.close()
    ids = [rid(IMPORT_SUPPLIER, METER, counter) for counter in range(1, 11)]
    async with asyncio.timeout(GUARD_SECONDS):
        for request_id in ids:
            await answers.until_answered(request_id)
    await service.stop()
    assert [answers.codes(i)[0] for i in ids] == [ResponseCode.ACKNOWLEDGED] * 10


# -- SIGTERM in every state -----------------------------------------------------------------------


def daemon_config(tmp_path: Path, url: str, pki: PkiLayout | None = None, **gateway: object) -> Path:
    """A daemon's configuration; with `pki`, it verifies against that test PKI and signs with its DSP key."""
    config = tmp_path / "config.toml"
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in gateway.items())
    signing = (
        ""
        if pki is None
        else "[signing]\n" + "".join(f'{key} = "{value}"\n' for key, value in signing_settings(pki).items())
    )
    config.write_text(
        f'[broker]\nurl = "{url}"\nreconnect_min_seconds = 0.05\nreconnect_max_seconds = 0.5\n'
        f'[store]\npath = "{tmp_path / "gw.sqlite3"}"\n'
        f"[gateway]\nmetrics_port = 0\nstop_timeout_seconds = {STOP_TIMEOUT_SECONDS}\n{extra}{signing}"
    )
    return config


async def stopped_in_time(daemon: Daemon) -> int:
    """SIGTERM; the exit status, asserting it came within the stop timeout (and a margin for Python)."""
    started = time.monotonic()
    code = await daemon.signal(signal.SIGTERM)
    assert time.monotonic() - started < STOP_TIMEOUT_SECONDS + 5, "".join(daemon.log)
    return code


async def test_sigterm_while_the_broker_is_unreachable(tmp_path: Path, mosquitto: Mosquitto) -> None:
    await seed(tmp_path / "gw.sqlite3")
    daemon = Daemon(daemon_config(tmp_path, mosquitto.url))
    await daemon.start()
    await asyncio.to_thread(mosquitto.stop)
    try:
        assert await stopped_in_time(daemon) == 0
    finally:
        await asyncio.to_thread(mosquitto.start)


async def test_sigterm_before_the_broker_was_ever_reached(tmp_path: Path, mosquitto: Mosquitto) -> None:
    await seed(tmp_path / "gw.sqlite3")
    await asyncio.to_thread(mosquitto.stop)
    daemon = Daemon(daemon_config(tmp_path, mosquitto.url))
    await daemon.start(ready=b"broker-connect-failed")
    try:
        assert await stopped_in_time(daemon) == 0
    finally:
        await asyncio.to_thread(mosquitto.start)


async def test_sigterm_while_a_commit_waits_for_the_store(
    tmp_path: Path, mosquitto: Mosquitto, estate: Estate
) -> None:
    await seed(tmp_path / "gw.sqlite3")
    daemon = Daemon(daemon_config(tmp_path, mosquitto.url, estate.pki))
    await daemon.start()
    # Another process holds the store's write lock: the daemon's commit waits (and retries) on it.
    blocker = sqlite3.connect(tmp_path / "gw.sqlite3", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        await estate.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1))
        await daemon.until_logged(b"store-busy")
        # Stopped before its commit: the request is neither acknowledged nor forwarded.
        assert await stopped_in_time(daemon) == EXIT_STOP_TIMEOUT
        assert estate.devices.received == []
    finally:
        blocker.close()
    # The request is still at the broker for the next process, which handles it.
    restarted = Daemon(daemon.config)
    await restarted.start()
    try:
        codes = await estate.answers.until_answered(rid(IMPORT_SUPPLIER, METER, 1), 2)
        assert codes == [ResponseCode.ACKNOWLEDGED, ResponseCode.SUCCESS]
    finally:
        assert await stopped_in_time(restarted) == 0


# -- the store at start ---------------------------------------------------------------------------


async def test_a_corrupt_store_stops_the_daemon_with_a_clear_message(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    store = tmp_path / "gw.sqlite3"
    await seed(store)
    with sqlite3.connect(store) as db:  # a page of the devices table overwritten, as a bad disk would
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        root = db.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'devices'").fetchone()[0]
    with store.open("r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(b"\xa5" * page_size)
    daemon = Daemon(daemon_config(tmp_path, mosquitto.url))
    with pytest.raises(RuntimeError, match="daemon exited"):
        await daemon.start()
    assert daemon.process is not None
    assert await daemon.process.wait() == EXIT_STORE_CORRUPT
    assert "the store is corrupt, refusing to start" in "".join(daemon.log)


# -- a crash with silent devices --------------------------------------------------------------------


def pending_rows(store: Path) -> int:
    """Forwards still waiting for their answer, or answered E21 and not yet settled."""
    with contextlib.closing(sqlite3.connect(store)) as db:
        sql = (
            "SELECT count(*) FROM pending_requests"
            " WHERE answer IS NULL OR (answer = 'timeout' AND NOT settled)"
        )
        return int(db.execute(sql).fetchone()[0])


async def test_every_forward_of_a_killed_daemon_gets_exactly_one_e21(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    store = tmp_path / "gw.sqlite3"
    await seed(store)
    answers = Answers()
    user = MqttTransport(settings_for(mosquitto.url), "test-users")
    await user.start(["dsp/out/+"], answers)
    commands = Inbox()  # the devices: they take every command and never answer
    devices = MqttTransport(settings_for(mosquitto.url), "test-devices")
    await devices.start(["dsp/device/+/cmd"], commands)
    pki = init_pki(tmp_path / "pki", [IMPORT_SUPPLIER])
    key, certificate = Signatures.from_pki(pki).users[IMPORT_SUPPLIER]
    config = daemon_config(tmp_path, mosquitto.url, pki, target_response_seconds=3.0)
    daemon = Daemon(config)
    await daemon.start()
    total = 400
    restarted = Daemon(config)
    try:
        for counter in range(1, total + 1):
            signed = sign(request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, counter), key, certificate)
            await user.publish(f"dsp/in/{IMPORT_SUPPLIER}", signed)
        await answers.until(lambda messages: len(messages) >= 50)
        assert await daemon.signal(signal.SIGKILL) == -signal.SIGKILL
        await restarted.start()
        ids = [rid(IMPORT_SUPPLIER, METER, counter) for counter in range(1, total + 1)]
        await answers.until(lambda _: all(ResponseCode.DEVICE_TIMEOUT in answers.codes(i) for i in ids))
        async with asyncio.timeout(GUARD_SECONDS):  # the last settlements ride on the next housekeeping tick
            while pending_rows(store):  # noqa: ASYNC110 - another process's file: nothing to wait on
                await asyncio.sleep(0.1)
        assert await stopped_in_time(restarted) == 0
    finally:
        for process in (daemon.process, restarted.process):
            if process is not None and process.returncode is None:
                process.kill()
        await devices.abort()
        await user.abort()
    # At most once to the device: a forward stored before the crash is not sent again after it (one
    # whose command never left reaches no device, and gets its E21 like the others).
    forwarded = Counter(str(header(message.payload)[0]) for message in commands.messages)
    assert forwarded, "no command reached the device before the crash"
    assert {i for i, copies in forwarded.items() if copies > 1} == set()
    assert set(forwarded) <= set(ids)
    assert {i: answers.codes(i).count(ResponseCode.DEVICE_TIMEOUT) for i in ids} == dict.fromkeys(ids, 1)
