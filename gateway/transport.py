"""The transport interface the gateway talks to, and an in-memory broker behind the same interface.

`Transport` is the whole contract between the gateway's shell (gateway/shell.py) and the message
broker (documented here and in docs/transport.md): QoS 1 delivery, a message acknowledged only after
its handler returned, publishes handed over in call order. `MqttTransport` (gateway/mqtt.py)
implements it over MQTT 5; `MemoryBroker` + `MemoryTransport` implement it in process, for the
embedded demo and fast tests, with the broker semantics the gateway relies on: topic filters with +
and #, MQTT 5 shared subscriptions, per-client sessions that survive a stop, ordered delivery and a
receive maximum.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import structlog

log = structlog.get_logger("mp169.transport")

SHARED_PREFIX = "$share/"


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    redelivered: bool = False
    """True when the broker delivers it again (MQTT DUP flag): an earlier delivery was not acknowledged."""


Handler = Callable[[Message], Awaitable[None]]


class Transport(Protocol):
    async def start(self, subscriptions: Sequence[str], handler: Handler) -> None:
        """Connect and subscribe (topic filters, `$share/<group>/<filter>` for a shared subscription).

        Each received message is passed to `handler`. Handlers run concurrently up to the in-flight
        window and are started in arrival order. A QoS 1 message is acknowledged to the broker only
        after its handler returned; a handler that raises is logged, counted and acknowledged too
        (a message that always fails must not come back forever).
        """

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1. Returns once the message is handed to the broker connection; concurrent
        calls are handed over in call order."""

    async def stop(self) -> None:
        """Stop taking messages, let running handlers finish (their messages are acknowledged),
        disconnect. Messages not handled stay with the broker for the next session."""


# -- topics --------------------------------------------------------------------------------------


def validate_topic(topic: str) -> str:
    """A topic name to publish to: not empty, no wildcards."""
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise ValueError(f"not a topic name to publish to: {topic!r}")
    return topic


def validate_filter(topic_filter: str) -> str:
    """A topic filter: + stands for one whole level, # for the rest and only at the end."""
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        wildcard_ok = level in {"+", "#"} or ("+" not in level and "#" not in level)
        if not wildcard_ok or (level == "#" and index != len(levels) - 1):
            raise ValueError(f"not a topic filter: {topic_filter!r}")
    if not topic_filter or "\0" in topic_filter:
        raise ValueError(f"not a topic filter: {topic_filter!r}")
    return topic_filter


def split_shared(subscription: str) -> tuple[str | None, str]:
    """`$share/<group>/<filter>` -> (group, filter); a plain filter -> (None, filter). Validated."""
    if not subscription.startswith(SHARED_PREFIX):
        return None, validate_filter(subscription)
    group, _, topic_filter = subscription[len(SHARED_PREFIX) :].partition("/")
    if not group or "+" in group or "#" in group:
        raise ValueError(f"not a shared subscription: {subscription!r}")
    return group, validate_filter(topic_filter)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching; wildcards at the first level do not match topics starting with '$'."""
    if topic.startswith("$") and topic_filter[:1] in {"+", "#"}:
        return False
    topic_levels = topic.split("/")
    filter_levels = topic_filter.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels) or level not in {"+", topic_levels[index]}:
            return False
    return len(filter_levels) == len(topic_levels)


# -- in-memory broker ----------------------------------------------------------------------------


class _Session:
    """What a broker keeps per client id: subscriptions, queued messages, the in-flight window.

    It outlives the transport using it (like an MQTT persistent session): messages matching its
    subscriptions queue while no transport is attached and are delivered when one attaches again.
    """

    def __init__(self, broker: MemoryBroker, client_id: str) -> None:
        self.broker = broker
        self.client_id = client_id
        self.filters: tuple[str, ...] = ()
        self.queue: deque[Message] = deque()
        # Insertion order is start order, which abort() relies on to re-queue in order.
        self.in_flight: dict[asyncio.Task[None], Message] = {}
        self.handler: Handler | None = None
        self.receive_maximum = 1
        self.taking = False
        self.handler_errors = 0

    @property
    def attached(self) -> bool:
        return self.handler is not None

    @property
    def window_open(self) -> bool:
        return len(self.in_flight) < self.receive_maximum

    @property
    def settled(self) -> bool:
        """Nothing running, and nothing queued that an attached transport would take."""
        return not self.in_flight and not (self.queue and self.taking)

    def attach(self, handler: Handler, receive_maximum: int) -> None:
        if self.attached:
            raise RuntimeError(f"client id {self.client_id!r} is already connected")
        self.handler = handler
        self.receive_maximum = receive_maximum
        self.taking = True
        self.pump()

    def deliver(self, message: Message) -> None:
        self.queue.append(message)
        self.pump()

    def pump(self) -> None:
        # Tasks start in creation order, so handlers start in arrival order.
        handler = self.handler
        while self.taking and handler is not None and self.queue and self.window_open:
            message = self.queue.popleft()
            task = asyncio.create_task(self._handle(handler, message), name=f"mp169-memory-{self.client_id}")
            self.in_flight[task] = message
        if not self.settled:
            self.broker.busy()

    async def _handle(self, handler: Handler, message: Message) -> None:
        try:
            await handler(message)
        except Exception:  # acknowledged like any other: no poison-message loop
            self.handler_errors += 1
            log.exception("handler-failed", client_id=self.client_id, topic=message.topic)
        finally:
            task = asyncio.current_task()
            # Absent after abort(): then the message was re-queued, not acknowledged.
            if task is not None and self.in_flight.pop(task, None) is not None:
                self.pump()
                self.broker.check_idle()

    async def close(self) -> None:
        """Graceful: start nothing new, wait for running handlers (so they are acknowledged), detach."""
        self.taking = False
        while self.in_flight:
            await asyncio.wait(list(self.in_flight))
        self.handler = None
        self.broker.check_idle()

    async def abort(self) -> None:
        """As a crash: running handlers are cancelled and their messages queued again, redelivered."""
        self.taking = False
        self.handler = None
        aborted = list(self.in_flight.items())
        self.in_flight.clear()
        for _, message in reversed(aborted):
            self.queue.appendleft(replace(message, redelivered=True))
        for task, _ in aborted:
            task.cancel()
        await asyncio.gather(*(task for task, _ in aborted), return_exceptions=True)
        self.broker.check_idle()


@dataclass(eq=False, slots=True)
class _SharedGroup:
    topic_filter: str
    members: list[_Session] = field(default_factory=list)
    next_index: int = 0

    def pick(self) -> _Session:
        """Round-robin over the members, skipping detached ones while any member is attached."""
        count = len(self.members)
        ring = [self.members[(self.next_index + offset) % count] for offset in range(count)]
        chosen = next((member for member in ring if member.attached), ring[0])
        self.next_index = (self.members.index(chosen) + 1) % count
        return chosen


class MemoryBroker:
    """An in-process QoS 1 broker: sessions by client id, + and # filters, `$share/<group>/<filter>`."""

    def __init__(self) -> None:
        self._sessions: dict[str, _Session] = {}
        self._groups: dict[tuple[str, str], _SharedGroup] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.published = 0

    def publish(self, topic: str, payload: bytes) -> None:
        """Queue for every matching subscriber (one copy per session) and one member per shared group."""
        message = Message(validate_topic(topic), payload)
        self.published += 1
        for session in self._sessions.values():
            if any(topic_matches(topic_filter, topic) for topic_filter in session.filters):
                session.deliver(message)
        for group in self._groups.values():
            if group.members and topic_matches(group.topic_filter, topic):
                group.pick().deliver(message)

    def session(self, client_id: str) -> _Session:
        """The session of `client_id`, created on first use and kept for the broker's lifetime."""
        session = self._sessions.get(client_id)
        if session is None:
            session = self._sessions[client_id] = _Session(self, client_id)
        return session

    def subscribe(self, session: _Session, subscriptions: Iterable[str]) -> None:
        """Replace the session's subscriptions."""
        parsed = [split_shared(subscription) for subscription in subscriptions]
        for group in self._groups.values():
            if session in group.members:
                group.members.remove(session)
                group.next_index = 0
        session.filters = tuple(topic_filter for group_name, topic_filter in parsed if group_name is None)
        for group_name, topic_filter in parsed:
            if group_name is not None:
                group = self._groups.setdefault((group_name, topic_filter), _SharedGroup(topic_filter))
                group.members.append(session)

    @property
    def idle(self) -> bool:
        return all(session.settled for session in self._sessions.values())

    def busy(self) -> None:
        self._idle.clear()

    def check_idle(self) -> None:
        if self.idle:
            self._idle.set()

    async def drain(self) -> None:
        """Wait until every queued message of an attached subscriber is handled, including the
        messages those handlers publish. Work outside the broker (timers, other tasks) is not seen."""
        while not self.idle:
            self._idle.clear()
            await self._idle.wait()


class MemoryTransport:
    """`Transport` over a `MemoryBroker`. `receive_maximum` is the in-flight window (backpressure)."""

    def __init__(self, broker: MemoryBroker, client_id: str, *, receive_maximum: int = 1000) -> None:
        if receive_maximum < 1:
            raise ValueError("receive_maximum must be at least 1")
        self.broker = broker
        self.client_id = client_id
        self.receive_maximum = receive_maximum
        self._session: _Session | None = None

    @property
    def handler_errors(self) -> int:
        return self.broker.session(self.client_id).handler_errors

    async def start(self, subscriptions: Sequence[str], handler: Handler) -> None:
        if self._session is not None:
            raise RuntimeError("already started")
        session = self.broker.session(self.client_id)
        self.broker.subscribe(session, subscriptions)
        session.attach(handler, self.receive_maximum)
        self._session = session

    async def publish(self, topic: str, payload: bytes) -> None:
        if self._session is None:
            raise RuntimeError("transport not started")
        self.broker.publish(topic, payload)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()  # running handlers may still publish until they finish
            self._session = None

    async def abort(self) -> None:
        """Disconnect as a crash would: running handlers are cancelled, their messages redelivered later."""
        session, self._session = self._session, None
        if session is not None:
            await session.abort()
