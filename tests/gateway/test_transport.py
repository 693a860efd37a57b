"""The transport contract on the in-memory broker: matching, shared groups, order, window, acks."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gateway.transport import (
    MemoryBroker,
    MemoryTransport,
    Message,
    Transport,
    split_shared,
    topic_matches,
    validate_filter,
    validate_topic,
)

USER_A = "90-B3-D5-1F-30-01-00-00"
USER_B = "90-B3-D5-1F-30-01-00-01"

levels = st.text(alphabet="abc-01", min_size=0, max_size=4)
topics = st.lists(levels, min_size=1, max_size=5).map("/".join).filter(bool)


class Recorder:
    """A handler that records what it was given, in order."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def payloads(self) -> list[bytes]:
        return [message.payload for message in self.messages]


async def started(broker: MemoryBroker, client_id: str, subscriptions: list[str], **kwargs: int) -> Recorder:
    recorder = Recorder()
    await MemoryTransport(broker, client_id, **kwargs).start(subscriptions, recorder)
    return recorder


# -- topic names and filters ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("dsp/in/+", f"dsp/in/{USER_A}", True),
        ("dsp/in/+", "dsp/in/a/b", False),
        ("dsp/in/+", "dsp/in", False),
        ("dsp/device/+/up", "dsp/device/00-DB-12-34-56-78-90-A0/up", True),
        ("dsp/device/+/up", "dsp/device/00-DB-12-34-56-78-90-A0/cmd", False),
        ("dsp/#", "dsp", True),
        ("dsp/#", "dsp/out/x", True),
        ("dsp/#", "dspx/out", False),
        ("#", "$SYS/broker/uptime", False),
        ("+/broker/uptime", "$SYS/broker/uptime", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("dsp/out", "dsp/out/", False),
        ("dsp/out/+", "dsp/out/", True),
    ],
)
def test_topic_matching(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@given(topics)
def test_a_topic_matches_itself_and_hash(topic: str) -> None:
    assert topic_matches(topic, topic)
    assert topic_matches("#", topic)


@given(topics, st.data())
def test_plus_stands_for_exactly_one_level(topic: str, data: st.DataObject) -> None:
    parts = topic.split("/")
    index = data.draw(st.integers(0, len(parts) - 1))
    with_plus = "/".join([*parts[:index], "+", *parts[index + 1 :]])
    assert topic_matches(with_plus, topic)
    assert not topic_matches(with_plus + "/+", topic)
    assert topic_matches("/".join([*parts[:index], "#"]), topic)


@pytest.mark.parametrize("bad", ["", "a/#/b", "a+", "#a", "a/b#"])
def test_bad_filters_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a topic filter"):
        validate_filter(bad)


@pytest.mark.parametrize("bad", ["", "dsp/in/+", "dsp/#"])
def test_wildcards_cannot_be_published_to(bad: str) -> None:
    with pytest.raises(ValueError, match="not a topic name"):
        validate_topic(bad)


def test_shared_subscriptions_are_split() -> None:
    assert split_shared("$share/gw/dsp/in/+") == ("gw", "dsp/in/+")
    assert split_shared("dsp/in/+") == (None, "dsp/in/+")
    with pytest.raises(ValueError, match="not a shared subscription"):
        split_shared("$share//dsp/in/+")


# -- delivery ------------------------------------------------------------------------------------


async def test_messages_reach_matching_subscribers_once() -> None:
    broker = MemoryBroker()
    inbound = await started(broker, "gw", ["dsp/in/+", "dsp/#"])
    other = await started(broker, "user", [f"dsp/out/{USER_A}"])
    publisher: Transport = MemoryTransport(broker, "pub")
    await publisher.start([], Recorder())

    await publisher.publish(f"dsp/in/{USER_A}", b"request")
    await publisher.publish(f"dsp/out/{USER_A}", b"answer")
    await publisher.publish("elsewhere", b"ignored")
    await broker.drain()

    assert inbound.payloads == [b"request", b"answer"]  # one copy although two filters match
    assert other.payloads == [b"answer"]
    assert not any(message.redelivered for message in inbound.messages)


async def test_shared_group_members_take_turns() -> None:
    broker = MemoryBroker()
    first = await started(broker, "gw-1", ["$share/gw/dsp/in/+"])
    second = await started(broker, "gw-2", ["$share/gw/dsp/in/+"])
    audit = await started(broker, "audit", ["dsp/in/+"])
    for number in range(6):
        broker.publish(f"dsp/in/{USER_A}", b"%d" % number)
    await broker.drain()

    assert first.payloads == [b"0", b"2", b"4"]
    assert second.payloads == [b"1", b"3", b"5"]
    assert len(audit.payloads) == 6


async def test_shared_group_skips_a_stopped_member_and_its_queue_waits() -> None:
    broker = MemoryBroker()
    first = await started(broker, "gw-1", ["$share/gw/dsp/in/+"])
    second_transport = MemoryTransport(broker, "gw-2")
    second = Recorder()
    await second_transport.start(["$share/gw/dsp/in/+"], second)
    await second_transport.stop()
    for number in range(3):
        broker.publish(f"dsp/in/{USER_A}", b"%d" % number)
    await broker.drain()

    assert first.payloads == [b"0", b"1", b"2"]
    assert second.payloads == []


async def test_handlers_start_in_arrival_order_and_run_concurrently() -> None:
    broker = MemoryBroker()
    starts: list[int] = []
    finishes: list[int] = []

    async def handler(message: Message) -> None:
        number = int(message.payload)
        starts.append(number)  # the synchronous prefix
        for _ in range(10 - number):  # earlier messages take longer
            await asyncio.sleep(0)
        finishes.append(number)

    await MemoryTransport(broker, "gw", receive_maximum=4).start(["dsp/in/+"], handler)
    for number in range(10):
        broker.publish(f"dsp/in/{USER_A}", b"%d" % number)
    await broker.drain()

    assert starts == list(range(10))
    assert finishes != starts  # they overlapped
    assert sorted(finishes) == starts


async def test_receive_maximum_bounds_messages_in_flight() -> None:
    broker = MemoryBroker()
    gates = {number: asyncio.Event() for number in range(10)}
    running: list[int] = []
    three_running = asyncio.Event()
    four_started = asyncio.Event()

    async def handler(message: Message) -> None:
        number = int(message.payload)
        running.append(number)
        if len(running) == 3:
            three_running.set()
        if len(running) == 4:
            four_started.set()
        await gates[number].wait()

    await MemoryTransport(broker, "gw", receive_maximum=3).start(["dsp/in/+"], handler)
    for number in range(10):
        broker.publish(f"dsp/in/{USER_A}", b"%d" % number)
    await three_running.wait()
    session = broker.session("gw")
    assert (len(session.in_flight), len(session.queue)) == (3, 7)
    assert running == [0, 1, 2]

    gates[1].set()  # one acknowledged: exactly one more goes out
    await four_started.wait()
    assert running == [0, 1, 2, 3]
    assert (len(session.in_flight), len(session.queue)) == (3, 6)

    for gate in gates.values():
        gate.set()
    await broker.drain()
    assert running == list(range(10))


async def test_a_failing_handler_is_logged_counted_and_acknowledged() -> None:
    broker = MemoryBroker()
    handled: list[bytes] = []

    async def handler(message: Message) -> None:
        if message.payload == b"poison":
            raise RuntimeError("cannot handle")
        handled.append(message.payload)

    transport = MemoryTransport(broker, "gw")
    await transport.start(["dsp/in/+"], handler)
    with capture_logs() as logs:
        for payload in (b"before", b"poison", b"after"):
            broker.publish(f"dsp/in/{USER_A}", payload)
        await broker.drain()

    assert handled == [b"before", b"after"]
    assert transport.handler_errors == 1
    assert [(entry["event"], entry["topic"]) for entry in logs] == [("handler-failed", f"dsp/in/{USER_A}")]
    session = broker.session("gw")
    assert not session.queue
    assert not session.in_flight  # acknowledged: not coming back


async def test_drain_waits_for_messages_handlers_publish() -> None:
    broker = MemoryBroker()
    relay = MemoryTransport(broker, "relay", receive_maximum=2)

    async def forward(message: Message) -> None:
        await asyncio.sleep(0)
        await relay.publish(message.topic.replace("dsp/in/", "dsp/out/"), message.payload)

    await relay.start(["dsp/in/+"], forward)
    answers = await started(broker, "user", ["dsp/out/+"], receive_maximum=1)
    for number in range(20):
        broker.publish(f"dsp/in/{USER_B}", b"%d" % number)
    await broker.drain()

    assert answers.payloads == [b"%d" % number for number in range(20)]
    assert broker.idle
    await broker.drain()  # idle: returns at once


async def test_stop_lets_running_handlers_finish_and_the_session_keeps_what_follows() -> None:
    broker = MemoryBroker()
    gate = asyncio.Event()
    entered = asyncio.Event()
    handled: list[bytes] = []

    async def slow(message: Message) -> None:
        entered.set()
        await gate.wait()
        handled.append(message.payload)

    transport = MemoryTransport(broker, "gw")
    await transport.start(["dsp/in/+"], slow)
    broker.publish(f"dsp/in/{USER_A}", b"running")
    await entered.wait()
    stopping = asyncio.create_task(transport.stop())
    await asyncio.sleep(0)  # stop() has begun and waits for the running handler
    broker.publish(f"dsp/in/{USER_A}", b"while-stopping")
    await asyncio.sleep(0)
    assert not stopping.done()
    gate.set()
    await stopping
    assert handled == [b"running"]
    broker.publish(f"dsp/in/{USER_A}", b"while-away")
    await broker.drain()  # nobody attached: queued messages do not keep the broker busy

    again = await started(broker, "gw", ["dsp/in/+"])
    await broker.drain()
    assert again.payloads == [b"while-stopping", b"while-away"]
    assert not any(message.redelivered for message in again.messages)


async def test_abort_leaves_running_messages_unacknowledged_for_redelivery() -> None:
    broker = MemoryBroker()
    entered = asyncio.Event()

    async def stuck(_message: Message) -> None:
        entered.set()
        await asyncio.Event().wait()

    crashed = MemoryTransport(broker, "gw", receive_maximum=2)
    await crashed.start(["dsp/in/+"], stuck)
    for payload in (b"first", b"second", b"third"):
        broker.publish(f"dsp/in/{USER_A}", payload)
    await entered.wait()
    await crashed.abort()

    again = await started(broker, "gw", ["dsp/in/+"])
    await broker.drain()
    assert [(message.payload, message.redelivered) for message in again.messages] == [
        (b"first", True),
        (b"second", True),
        (b"third", False),
    ]


async def test_misuse_is_refused() -> None:
    broker = MemoryBroker()
    transport = MemoryTransport(broker, "gw")
    with pytest.raises(RuntimeError, match="not started"):
        await transport.publish("dsp/out/x", b"")
    await transport.start(["dsp/in/+"], Recorder())
    with pytest.raises(RuntimeError, match="already connected"):
        await MemoryTransport(broker, "gw").start(["dsp/in/+"], Recorder())
    with pytest.raises(ValueError, match="not a topic name"):
        await transport.publish("dsp/out/+", b"")
    with pytest.raises(ValueError, match="receive_maximum"):
        MemoryTransport(broker, "other", receive_maximum=0)
