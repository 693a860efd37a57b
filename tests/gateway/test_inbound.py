"""The fair merge of the inbound sessions (gateway/inbound.py): FairQueue, FairFeed, the User shards.

Pure or in-process (no broker); the Mosquitto tests are in test_inbound_mosquitto.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import defaultdict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.inbound import FairFeed, FairQueue, InboundSessions, OrderedGate, shard_of
from gateway.mqtt import MqttTransport
from gateway.transport import Message
from rules.domain import Eui
from tests.gateway.test_mqtt import settings_for

# A step of a FairQueue run: put an item on a source (its number), or take (None).
steps = st.lists(st.one_of(st.none(), st.integers(min_value=0, max_value=5)), max_size=200)


@given(sources=st.integers(min_value=1, max_value=6), run=steps)
def test_no_source_starves_and_each_keeps_its_order(sources: int, run: list[int | None]) -> None:
    queue: FairQueue[tuple[int, int]] = FairQueue(sources)
    put: defaultdict[int, int] = defaultdict(int)
    taken: defaultdict[int, list[int]] = defaultdict(list)
    passed_over = [0] * sources  # takes that served another source while this one had an item
    for step in run:
        if step is not None:
            source = step % sources
            queue.put(source, (source, put[source]))
            put[source] += 1
            continue
        waiting = [s for s in range(sources) if put[s] > len(taken[s])]
        item = queue.take()
        if not waiting:
            assert item is None
            continue
        assert item is not None
        source, (origin, number) = item
        assert origin == source
        taken[source].append(number)
        for other in range(sources):
            passed_over[other] = passed_over[other] + 1 if other in waiting and other != source else 0
            assert passed_over[other] <= sources - 1
    for source in range(sources):
        # In the order put, none skipped.
        assert taken[source] == list(range(len(taken[source])))
    assert len(queue) == sum(put.values()) - sum(len(t) for t in taken.values())


def test_a_queue_needs_a_source() -> None:
    with pytest.raises(ValueError, match="at least one source"):
        FairQueue(0)


class Gate:
    """A handler that records the order messages start in and holds each until let go."""

    def __init__(self) -> None:
        self.started: list[bytes] = []
        self.release: dict[bytes, asyncio.Event] = {}
        self.changed = asyncio.Event()

    async def __call__(self, message: Message) -> None:
        self.started.append(message.payload)
        self.changed.set()
        await self.release.setdefault(message.payload, asyncio.Event()).wait()

    def let_go(self, payload: bytes) -> None:
        self.release.setdefault(payload, asyncio.Event()).set()

    async def until_started(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.started) < count:
                self.changed.clear()
                await self.changed.wait()


async def test_a_free_place_goes_to_the_sources_in_turn() -> None:
    gate = Gate()
    feed = FairFeed(gate, sources=3, limit=1)
    burst = [asyncio.create_task(feed.source(0)(Message("dsp/in/a", b"a%d" % n))) for n in range(5)]
    await gate.until_started(1)
    quiet = [
        asyncio.create_task(feed.source(1)(Message("dsp/in/b", b"b0"))),
        asyncio.create_task(feed.source(2)(Message("dsp/in/c", b"c0"))),
    ]
    await asyncio.sleep(0)  # the later handlers queue for their place
    assert (feed.running, feed.waiting) == (1, 6)
    for expected in range(1, 7):
        gate.let_go(gate.started[-1])
        await gate.until_started(expected + 1)
    gate.let_go(gate.started[-1])
    await asyncio.gather(*burst, *quiet)
    # a0 had the place; then each source in turn, each in its own order.
    assert gate.started == [b"a0", b"b0", b"c0", b"a1", b"a2", b"a3", b"a4"]
    assert (feed.running, feed.waiting) == (0, 0)


async def test_a_source_s_messages_start_in_order_when_a_later_one_finds_a_free_place() -> None:
    # a2 is given a place as a0 ends; before it resumes, a1 ends too and a3 arrives to a free place.
    # Started at once, a3 would overtake a2 (the router would refuse a2's lower RequestID counter).
    gate = Gate()
    feed = FairFeed(gate, sources=1, limit=2)
    handlers = [asyncio.create_task(feed.source(0)(Message("dsp/in/a", b"a%d" % n))) for n in range(3)]
    await gate.until_started(2)
    gate.let_go(b"a0")
    gate.let_go(b"a1")
    handlers.append(asyncio.create_task(feed.source(0)(Message("dsp/in/a", b"a3"))))
    await gate.until_started(4)
    gate.let_go(b"a2")
    gate.let_go(b"a3")
    await asyncio.gather(*handlers)
    assert gate.started == [b"a0", b"a1", b"a2", b"a3"]
    assert (feed.running, feed.waiting) == (0, 0)


async def test_a_gate_lets_held_messages_through_in_order_with_one_arriving_as_it_opens() -> None:
    gate = OrderedGate()
    passed: list[int] = []

    async def message(n: int) -> None:
        await gate.passed()
        passed.append(n)

    held = [asyncio.create_task(message(n)) for n in range(3)]
    await asyncio.sleep(0)  # all three wait at the closed gate
    late = asyncio.create_task(message(3))  # its first step runs before the held ones resume
    gate.open()
    await asyncio.gather(*held, late)
    assert passed == [0, 1, 2, 3]


async def test_a_handler_cancelled_while_it_waits_gives_up_its_place() -> None:
    gate = Gate()
    feed = FairFeed(gate, sources=2, limit=1)
    first = asyncio.create_task(feed.source(0)(Message("dsp/in/a", b"a0")))
    await gate.until_started(1)
    waiting = asyncio.create_task(feed.source(1)(Message("dsp/in/b", b"b0")))
    after = asyncio.create_task(feed.source(0)(Message("dsp/in/a", b"a1")))
    await asyncio.sleep(0)
    waiting.cancel()
    gate.let_go(b"a0")
    await gate.until_started(2)
    gate.let_go(b"a1")
    await asyncio.gather(first, after)
    assert gate.started == [b"a0", b"a1"]
    assert waiting.cancelled()
    assert feed.running == 0


async def test_a_failing_handler_frees_its_place() -> None:
    calls: list[bytes] = []

    async def handler(message: Message) -> None:
        calls.append(message.payload)
        if message.payload == b"bad":
            raise RuntimeError("boom")

    feed = FairFeed(handler, sources=1, limit=1)
    with pytest.raises(RuntimeError, match="boom"):
        await feed.source(0)(Message("dsp/in/a", b"bad"))
    await feed.source(0)(Message("dsp/in/a", b"good"))
    assert calls == [b"bad", b"good"]


def test_a_feed_needs_a_place() -> None:
    async def handler(_message: Message) -> None:
        return

    with pytest.raises(ValueError, match="at least 1"):
        FairFeed(handler, sources=1, limit=0)


USERS = [Eui(f"90-B3-D5-1F-30-01-{high:02X}-{low:02X}") for high in range(4) for low in range(64)]


def test_a_users_session_is_the_same_in_every_process() -> None:
    # Not Python's hash(): that changes with PYTHONHASHSEED, and a restart would move Users.
    code = "import sys; from gateway.inbound import shard_of; print([shard_of(u, 7) for u in sys.argv[1:]])"
    runs = {
        subprocess.run(
            [sys.executable, "-c", code, *USERS[:20]],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(seed)},
        ).stdout
        for seed in (1, 2)
    }
    assert runs == {f"{[shard_of(u, 7) for u in USERS[:20]]}\n"}


@pytest.mark.parametrize("shards", [2, 3, 8])
def test_users_spread_over_every_session(shards: int) -> None:
    counts = [0] * shards
    for user in USERS:
        counts[shard_of(user, shards)] += 1
    # Every session has Users, none more than twice its share.
    assert min(counts) > 0
    assert max(counts) <= 2 * len(USERS) / shards


@pytest.mark.parametrize("group", ["", "gw"])
def test_each_user_is_subscribed_by_exactly_its_session(group: str) -> None:
    settings = settings_for("mqtt://127.0.0.1:1")
    main = MqttTransport(settings, "gw")
    sessions = [MqttTransport(settings, f"gw-in-{k}") for k in range(3)]
    inbound = InboundSessions(main, sessions, inbound="dsp/in", shared_group=group)
    owned = inbound.owned(USERS)
    prefix = f"$share/{group}/" if group else ""
    for user in USERS:
        holders = [k for k, subscriptions in enumerate(owned) if f"{prefix}dsp/in/{user}" in subscriptions]
        assert holders == [shard_of(user, 3)]
    assert sum(len(subscriptions) for subscriptions in owned) == len(USERS)
    assert inbound.catch_all == f"{prefix}dsp/in/+"


def test_one_session_is_not_sharding() -> None:
    settings = settings_for("mqtt://127.0.0.1:1")
    with pytest.raises(ValueError, match="at least two"):
        InboundSessions(MqttTransport(settings, "gw"), [MqttTransport(settings, "gw-in-0")], inbound="dsp/in")
