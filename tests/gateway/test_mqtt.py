"""MqttTransport against a real Mosquitto (a private one per test: simulator/mosquitto.py), and deploy files.

Waiting is event-driven; GUARD_SECONDS only turns a hang into a failure. "Nothing else arrived" is
proved by order: a later message on the same path arrives after anything published before it.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import gmqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gateway.config import BrokerSettings
from gateway.mqtt import BrokerRefusedError, ConnectionEvent, MqttTransport, backoff_delay
from gateway.transport import Handler, Message
from simulator.mosquitto import Mosquitto, current_user
from simulator.server import free_port
from tests.servers import running

pytestmark = pytest.mark.broker

GUARD_SECONDS = 20
ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
USER_A = "90-B3-D5-1F-30-01-00-00"
USER_B = "90-B3-D5-1F-30-01-00-01"
DEVICE_D = "00-DB-12-34-56-78-90-A0"
DEVICE_E = "00-DB-12-34-56-78-90-A1"
GATEWAY = "mp169-gateway"
PASSWORDS = {
    USER_A: "secret-a",
    USER_B: "secret-b",
    DEVICE_D: "secret-d",
    DEVICE_E: "secret-e",
    GATEWAY: "gw",
}


class Inbox:
    """A handler that records messages; `until` waits for a condition on what arrived."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._arrived = asyncio.Event()

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)
        self._arrived.set()

    @property
    def payloads(self) -> list[bytes]:
        return [message.payload for message in self.messages]

    async def until(self, condition: Callable[[list[Message]], bool]) -> None:
        async with asyncio.timeout(GUARD_SECONDS):
            while not condition(self.messages):
                self._arrived.clear()
                await self._arrived.wait()

    async def until_payload(self, payload: bytes) -> None:
        await self.until(lambda messages: any(message.payload == payload for message in messages))


def settings_for(url: str, **overrides: object) -> BrokerSettings:
    return BrokerSettings.model_validate(
        {"url": url, "reconnect_min_seconds": 0.05, "reconnect_max_seconds": 0.5, **overrides}
    )


Connect = Callable[..., Awaitable[MqttTransport]]


@pytest.fixture
async def connect(mosquitto: Mosquitto) -> AsyncIterator[Connect]:
    """Start MqttTransports on the test broker; whatever is still running is aborted afterwards."""
    made: list[MqttTransport] = []

    async def make(
        client_id: str,
        subscriptions: Sequence[str] = (),
        handler: Handler | None = None,
        *,
        url: str | None = None,
        **kwargs: object,
    ) -> MqttTransport:
        transport = MqttTransport(settings_for(url or mosquitto.url, **kwargs), client_id)
        made.append(transport)
        await transport.start(subscriptions, handler or Inbox())
        return transport

    yield make
    for transport in made:
        await transport.abort()


async def raw_client(port: int, client_id: str) -> gmqtt.Client:
    client = gmqtt.Client(client_id)
    await client.connect("127.0.0.1", port)
    return client


# -- delivery ------------------------------------------------------------------------------------


async def test_round_trip(connect: Connect) -> None:
    inbox = Inbox()
    await connect("gw", ["dsp/in/+"], inbox)
    user = await connect("user")
    await user.publish(f"dsp/in/{USER_A}", b"<sr:Request/>")
    await inbox.until(lambda messages: len(messages) == 1)
    assert inbox.messages == [Message(f"dsp/in/{USER_A}", b"<sr:Request/>", redelivered=False)]


async def test_a_message_is_acknowledged_only_after_its_handler_returns(connect: Connect) -> None:
    blocked = asyncio.Event()

    async def handler(message: Message) -> None:
        if message.payload == b"blocks":
            blocked.set()
            await asyncio.Event().wait()

    gateway = await connect("gw", ["dsp/in/+"], handler)
    user = await connect("user")
    await user.publish(f"dsp/in/{USER_A}", b"handled")
    await user.publish(f"dsp/in/{USER_A}", b"blocks")
    async with asyncio.timeout(GUARD_SECONDS):
        await blocked.wait()
    await gateway.abort()  # the connection goes while the handler still runs

    inbox = Inbox()
    await connect("gw", ["dsp/in/+"], inbox)  # same client id: the persistent session
    await user.publish(f"dsp/in/{USER_A}", b"after")
    await inbox.until_payload(b"after")
    assert [(message.payload, message.redelivered) for message in inbox.messages] == [
        (b"blocks", True),
        (b"after", False),
    ]


async def test_acknowledgements_keep_the_order_the_messages_came_in(connect: Connect) -> None:
    blocked, later_done = asyncio.Event(), asyncio.Event()

    async def handler(message: Message) -> None:
        if message.payload == b"blocks":
            blocked.set()
            await asyncio.Event().wait()
        later_done.set()

    gateway = await connect("gw", ["dsp/in/+"], handler)
    user = await connect("user")
    await user.publish(f"dsp/in/{USER_A}", b"blocks")
    await user.publish(f"dsp/in/{USER_A}", b"finished after it")
    async with asyncio.timeout(GUARD_SECONDS):
        await blocked.wait()
        await later_done.wait()
    await gateway.abort()  # the later message's handler returned, the earlier one's did not

    inbox = Inbox()
    await connect("gw", ["dsp/in/+"], inbox)
    await user.publish(f"dsp/in/{USER_A}", b"after")
    await inbox.until_payload(b"after")
    # Not acknowledged before the one ahead of it (MQTT-4.6.0-2): both come again, in order.
    assert [(message.payload, message.redelivered) for message in inbox.messages] == [
        (b"blocks", True),
        (b"finished after it", True),
        (b"after", False),
    ]


async def test_stop_finishes_running_handlers_and_leaves_the_rest_to_the_session(connect: Connect) -> None:
    running = asyncio.Event()
    release = asyncio.Event()
    finished: list[bytes] = []

    async def handler(message: Message) -> None:
        running.set()
        await release.wait()
        finished.append(message.payload)

    gateway = await connect("gw", ["dsp/in/+"], handler)
    user = await connect("user")
    await user.publish(f"dsp/in/{USER_A}", b"running")
    async with asyncio.timeout(GUARD_SECONDS):
        await running.wait()
    stopping = asyncio.create_task(gateway.stop())
    await asyncio.sleep(0)
    await user.publish(f"dsp/in/{USER_A}", b"during-stop")
    assert not stopping.done()
    release.set()
    await stopping
    assert finished == [b"running"]

    inbox = Inbox()
    await connect("gw", ["dsp/in/+"], inbox)
    await user.publish(f"dsp/in/{USER_A}", b"after")
    await inbox.until_payload(b"after")
    assert inbox.payloads == [b"during-stop", b"after"]  # "running" was acknowledged by stop


async def test_every_message_arrives_across_a_broker_restart(connect: Connect, mosquitto: Mosquitto) -> None:
    count = 3000
    inbox = Inbox()
    gateway_events: list[ConnectionEvent] = []
    reconnect_calls: list[None] = []
    gateway = MqttTransport(
        settings_for(mosquitto.url),
        "gw",
        receive_maximum=20,
        on_connection_event=gateway_events.append,
        on_reconnect=lambda: reconnect_calls.append(None),
    )
    await gateway.start(["dsp/in/+"], inbox)
    user = await connect("user")

    async def publish_all() -> None:
        for number in range(count):
            await user.publish(f"dsp/in/{USER_A}", b"%d" % number)
            await asyncio.sleep(0)

    publishing = asyncio.create_task(publish_all())
    await inbox.until(lambda messages: len(messages) >= count // 4)
    await asyncio.to_thread(mosquitto.restart)
    await publishing
    expected = {b"%d" % number for number in range(count)}
    await inbox.until(lambda messages: {message.payload for message in messages} >= expected)

    assert gateway.reconnects >= 1
    assert user.reconnects >= 1
    assert gateway_events[:3] == [
        ConnectionEvent.CONNECTED,
        ConnectionEvent.LOST,
        ConnectionEvent.RECONNECTED,
    ]
    assert gateway_events.count(ConnectionEvent.RECONNECTED) == gateway.reconnects == len(reconnect_calls)
    await gateway.stop()


async def test_receive_maximum_bounds_messages_in_flight(connect: Connect, mosquitto: Mosquitto) -> None:
    release = asyncio.Event()
    probed = asyncio.Event()
    running: list[bytes] = []

    all_running = asyncio.Event()

    async def handler(message: Message) -> None:
        if message.topic == "dsp/in/probe":
            probed.set()
            return
        running.append(message.payload)
        if len(running) == 10:
            all_running.set()
        await release.wait()

    gateway = MqttTransport(settings_for(mosquitto.url), "gw", receive_maximum=3)
    await gateway.start(["dsp/in/+"], handler)
    user = await raw_client(mosquitto.port, "user")
    try:
        for number in range(10):
            user.publish(f"dsp/in/{USER_A}", b"%d" % number, qos=1)
        # QoS 0 is outside the Receive Maximum: the broker sends it at once, after the QoS 1
        # messages it was allowed to send before it.
        user.publish("dsp/in/probe", b"", qos=0)
        async with asyncio.timeout(GUARD_SECONDS):
            await probed.wait()
        assert running == [b"0", b"1", b"2"]
        release.set()
        async with asyncio.timeout(GUARD_SECONDS):
            await all_running.wait()
        assert running == [b"%d" % number for number in range(10)]
    finally:
        await user.disconnect()
        await gateway.stop()


async def test_publishes_wait_for_the_brokers_receive_maximum(tmp_path: Path, connect: Connect) -> None:
    small = Mosquitto(tmp_path / "small", {"max_inflight_messages": "4"})
    small.start()
    try:
        inbox = Inbox()
        await connect("gw", ["dsp/out/+"], inbox, url=small.url)
        gateway = await connect("gw-out", url=small.url)
        expected = [b"%d" % number for number in range(300)]
        for payload in expected:  # far more than the 3 packet ids gmqtt then has: no OverflowError
            await gateway.publish(f"dsp/out/{USER_B}", payload)
        await inbox.until(lambda messages: len(messages) >= len(expected))
        assert inbox.payloads == expected
    finally:
        small.stop()


async def test_a_shared_subscription_splits_the_stream(connect: Connect) -> None:
    inbox = Inbox()
    taken: dict[str, set[bytes]] = {"gw-1": set(), "gw-2": set()}

    def member(client_id: str) -> Handler:
        async def handle(message: Message) -> None:
            taken[client_id].add(message.payload)
            await inbox(message)

        return handle

    for client_id in taken:
        await connect(client_id, ["$share/gw/dsp/in/+"], member(client_id))
    user = await connect("user")
    expected = {b"%d" % number for number in range(40)}
    for payload in sorted(expected):
        await user.publish(f"dsp/in/{USER_A}", payload)
    await inbox.until(lambda messages: len(messages) >= len(expected))
    assert taken["gw-1"]
    assert taken["gw-2"]
    assert taken["gw-1"] | taken["gw-2"] == expected
    assert not taken["gw-1"] & taken["gw-2"]


async def test_a_failing_handler_is_counted_and_acknowledged(connect: Connect) -> None:
    inbox = Inbox()

    async def handler(message: Message) -> None:
        await inbox(message)
        if message.payload == b"poison":
            raise RuntimeError("cannot handle")

    with capture_logs() as logs:
        gateway = await connect("gw", ["dsp/in/+"], handler)
        user = await connect("user")
        await user.publish(f"dsp/in/{USER_A}", b"poison")
        await inbox.until_payload(b"poison")
        await gateway.stop()
    assert gateway.handler_errors == 1
    assert any(entry["event"] == "handler-failed" for entry in logs)

    again = Inbox()
    await connect("gw", ["dsp/in/+"], again)
    await user.publish(f"dsp/in/{USER_A}", b"next")
    await again.until_payload(b"next")
    assert again.payloads == [b"next"]  # the failed one was acknowledged


async def test_a_failing_connection_hook_does_not_stop_the_transport(mosquitto: Mosquitto) -> None:
    def hook(_event: ConnectionEvent) -> None:
        raise RuntimeError("metrics broke")

    inbox = Inbox()
    transport = MqttTransport(settings_for(mosquitto.url), "gw")
    transport.on_connection_event = hook
    with capture_logs() as logs:
        await transport.start(["dsp/out/+"], inbox)
    await transport.publish(f"dsp/out/{USER_A}", b"still works")
    await inbox.until_payload(b"still works")
    await transport.stop()
    assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == [
        "connection-event-hook-failed"
    ]


async def test_misuse_is_refused(mosquitto: Mosquitto) -> None:
    transport = MqttTransport(settings_for(mosquitto.url), "gw")
    with pytest.raises(RuntimeError, match="not started"):
        await transport.publish("dsp/out/x", b"")
    await transport.start([], Inbox())
    with pytest.raises(ValueError, match="not a topic name"):
        await transport.publish("dsp/out/#", b"")
    await transport.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        await transport.publish("dsp/out/x", b"")
    with pytest.raises(ValueError, match="receive_maximum"):
        MqttTransport(settings_for(mosquitto.url), "gw", receive_maximum=0)


# -- backoff -------------------------------------------------------------------------------------


@given(
    attempt=st.integers(0, 10_000),
    minimum=st.floats(0.001, 10),
    maximum=st.floats(0.001, 600),
    draw=st.floats(0, 1),
)
def test_backoff_stays_between_the_bounds(attempt: int, minimum: float, maximum: float, draw: float) -> None:
    delay = backoff_delay(attempt, minimum=minimum, maximum=maximum, rand=lambda: draw)
    assert min(minimum, maximum) <= delay <= maximum


def test_backoff_grows_then_is_capped() -> None:
    def ceilings(attempts: range) -> list[float]:
        return [backoff_delay(a, minimum=0.5, maximum=30.0, rand=lambda: 1.0) for a in attempts]

    assert ceilings(range(7)) == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff_delay(0, minimum=0.5, maximum=30.0, rand=lambda: 0.0) == 0.5


def test_backoff_is_jittered() -> None:
    delays = {backoff_delay(8, minimum=0.5, maximum=30.0, rand=lambda d=d: d) for d in (0.1, 0.5, 0.9)}
    assert len(delays) == 3


# -- deploy files: ACL and production config -----------------------------------------------------


def password_file(path: Path) -> Path:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.fail("mosquitto_passwd not found: install mosquitto (it ships mosquitto_passwd)")
    path.unlink(missing_ok=True)
    for username, password in PASSWORDS.items():
        create = ["-c"] if not path.exists() else []
        subprocess.run([tool, *create, "-b", str(path), username, password], check=True)
    return path


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(
        tmp_path / "acl",
        {
            "allow_anonymous": "false",
            "password_file": str(password_file(tmp_path / "passwd")),
            "acl_file": str(DEPLOY / "acl"),
        },
    )
    with running(broker):
        yield broker


def account(username: str) -> dict[str, object]:
    return {"username": username, "password": PASSWORDS[username]}


async def test_users_read_and_write_only_their_own_topics(acl_broker: Mosquitto, connect: Connect) -> None:
    url = acl_broker.url
    gateway_inbox, user_inbox = Inbox(), Inbox()
    gateway = await connect(
        "gw", ["$share/gw/dsp/in/+", "dsp/device/+/cmd"], gateway_inbox, url=url, **account(GATEWAY)
    )
    user_a = await connect("user-a", ["dsp/out/#"], user_inbox, url=url, **account(USER_A))

    # A subscribed to every dsp/out topic, but the broker delivers only A's own.
    await gateway.publish(f"dsp/out/{USER_B}", b"for B")
    await gateway.publish(f"dsp/out/{USER_A}", b"for A")
    await user_inbox.until_payload(b"for A")
    assert user_inbox.payloads == [b"for A"]

    # A may not publish as B, nor command a device; its own inbound topic works.
    await user_a.publish(f"dsp/in/{USER_B}", b"A posing as B")
    await user_a.publish(f"dsp/device/{DEVICE_D}/cmd", b"A posing as the gateway")
    await user_a.publish(f"dsp/in/{USER_A}", b"A as A")
    await gateway_inbox.until_payload(b"A as A")
    assert [(message.topic, message.payload) for message in gateway_inbox.messages] == [
        (f"dsp/in/{USER_A}", b"A as A")
    ]


async def test_devices_read_and_write_only_their_own_topics(acl_broker: Mosquitto, connect: Connect) -> None:
    url = acl_broker.url
    gateway_inbox, device_inbox = Inbox(), Inbox()
    gateway = await connect("gw", ["dsp/device/+/up"], gateway_inbox, url=url, **account(GATEWAY))
    device_d = await connect("device-d", ["dsp/device/#"], device_inbox, url=url, **account(DEVICE_D))

    await gateway.publish(f"dsp/device/{DEVICE_E}/cmd", b"for E")
    await gateway.publish(f"dsp/device/{DEVICE_D}/cmd", b"for D")
    await device_inbox.until_payload(b"for D")
    assert device_inbox.payloads == [b"for D"]

    await device_d.publish(f"dsp/device/{DEVICE_E}/up", b"D posing as E")
    await device_d.publish(f"dsp/device/{DEVICE_D}/up", b"D as D")
    await gateway_inbox.until_payload(b"D as D")
    assert gateway_inbox.payloads == [b"D as D"]


async def test_the_broker_refuses_unknown_accounts_at_start(acl_broker: Mosquitto) -> None:
    for overrides in ({}, {"username": USER_A, "password": "wrong"}):
        transport = MqttTransport(settings_for(acl_broker.url, **overrides), "intruder")
        with pytest.raises(BrokerRefusedError, match="refused the connection"):
            await transport.start(["dsp/out/#"], Inbox())


class ProductionMosquitto(Mosquitto):
    """deploy/mosquitto.conf with its ports, paths and log destination moved into the test folder."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.tls_port = free_port()
        self.certificate, key = directory / "server.crt", directory / "server.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", str(key), "-out", str(self.certificate)],
            check=True,
            capture_output=True,
        )  # fmt: skip
        self.replacements = {
            "listener 1883 127.0.0.1": f"listener {self.port} 127.0.0.1",
            "listener 8883": f"listener {self.tls_port} 127.0.0.1",
            "/var/lib/mosquitto/": f"{directory}/",
            "/etc/mosquitto/mp169.passwd": str(password_file(directory / "passwd")),
            "/etc/mosquitto/mp169.acl": str(DEPLOY / "acl"),
            "/etc/mosquitto/certs/server.crt": str(self.certificate),
            "/etc/mosquitto/certs/server.key": str(key),
            "log_dest syslog": f"log_dest file {self.log_path}",
        }

    def config_text(self) -> str:
        text = (DEPLOY / "mosquitto.conf").read_text(encoding="utf-8")
        for old, new in self.replacements.items():
            assert old in text, f"deploy/mosquitto.conf no longer has {old!r}"
            text = text.replace(old, new)
        return f"user {current_user()}\n{text}"


async def test_the_production_config_serves_the_gateway_and_tls_clients(tmp_path: Path) -> None:
    broker = ProductionMosquitto(tmp_path / "production")
    broker.start()
    transports: list[MqttTransport] = []
    try:
        gateway_inbox = Inbox()
        gateway = MqttTransport(settings_for(broker.url, **account(GATEWAY)), "gw")
        transports.append(gateway)
        await gateway.start(["$share/gw/dsp/in/+"], gateway_inbox)
        tls_url = f"mqtts://127.0.0.1:{broker.tls_port}"
        trust = ssl.create_default_context(cafile=str(broker.certificate))
        user = MqttTransport(settings_for(tls_url, **account(USER_A)), "user-a", ssl_context=trust)
        transports.append(user)
        await user.start([f"dsp/out/{USER_A}"], Inbox())
        await user.publish(f"dsp/in/{USER_A}", b"over TLS")
        await gateway_inbox.until_payload(b"over TLS")
        assert gateway_inbox.payloads == [b"over TLS"]
    finally:
        for transport in transports:
            await transport.stop()
        broker.stop()
