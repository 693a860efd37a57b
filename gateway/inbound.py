"""Users' requests over several broker sessions, taken fairly (`gateway.inbound_sessions`).

Mosquitto queues a session's messages in arrival order behind one in-flight window (Receive
Maximum), so over one session a User's request waits behind every request queued at the broker
before it: a burst of 20,000 from one User delays another by the time the gateway takes to work
through them. With `inbound_sessions = N > 1`, `mp169 run` opens N more sessions,
`<client_id>-in-<k>`: each subscribes `dsp/in/<user>` for the registered Users whose EUI hashes to k
(`shard_of`), and has its own broker queue and window. The gateway takes their messages round-robin
(`FairQueue`) and lets at most `gateway.inflight_window` of them into the router at once
(`FairFeed`), so a burst fills only its own session's queue and window (`session_window`): a
request of a User in another session is decided behind at most N windows of others' messages, the
device session's included (README, "Fair sessions"). Users in the burst's session are not
protected.

- Ordering: one User's topic is one session's, delivered in order, taken in order: per-user arrival
  order is kept. Across sessions, arrival is the order the round-robin takes them in; the router's
  guarantees (a flag request committed before later messages are decided) hold on that order.
- Persistent sessions with stable client ids: a restarted instance resumes its sessions and their
  queued messages. Each session, when started, unsubscribes the registered Users' topics it does
  not own (left by a different N), and the request session unsubscribes `dsp/in/+`; what those left
  queued is still delivered and handled (the request session is one more source of the round-robin).
- Users registered while the gateway runs are subscribed at the next inventory refresh (every
  second); a request published before that finds no subscriber and is dropped by the broker, as is
  one on `dsp/in/<EUI>` of no registered User: with N > 1 the gateway subscribes Users' topics only.
- With `topics.shared_group`, every subscription is `$share/<group>/dsp/in/<user>`: instances with
  the same N and Users share each User's topic among their sessions k.
- A message handled on a session k publishes on the request session, so it is acknowledged only once
  the broker acknowledged those publishes (`flushed`), as device messages are.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import deque
from typing import TYPE_CHECKING, Generic, TypeVar

import structlog

from gateway.arrival import ArrivalOrder
from gateway.mqtt import MqttTransport

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from gateway.config import Settings
    from gateway.transport import Handler, Message
    from rules.domain import Eui

log = structlog.get_logger("mp169.inbound")

T = TypeVar("T")

INBOUND_SESSION_SUFFIX = "-in-"


def shard_of(user: Eui, shards: int) -> int:
    """The session (0 .. shards-1) a User's topic belongs to: stable across processes and restarts."""
    return zlib.crc32(str(user).encode("ascii")) % shards


def session_window(settings: Settings) -> int:
    """The Receive Maximum of each inbound session and of the device session, with inbound sessions:
    together they hold at most `gateway.inflight_window` messages (the feed's places), so one
    session's burst never holds the place another session's message needs, and a message is decided
    behind at most `inbound_sessions` windows of others (the device session's included)."""
    return max(1, settings.gateway.inflight_window // (settings.gateway.inbound_sessions + 1))


class FairQueue(Generic[T]):
    """One FIFO queue per source, taken round-robin: `take` serves the next source after the one it
    served last that has an item. So a source with an item waits at most `sources - 1` takes, and each
    source's items come out in the order they were put."""

    def __init__(self, sources: int) -> None:
        if sources < 1:
            raise ValueError("a FairQueue needs at least one source")
        self._queues: list[deque[T]] = [deque() for _ in range(sources)]
        self._next = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def put(self, source: int, item: T) -> None:
        self._queues[source].append(item)
        self._size += 1

    def take(self) -> tuple[int, T] | None:
        count = len(self._queues)
        for offset in range(count):
            source = (self._next + offset) % count
            queue = self._queues[source]
            if queue:
                self._next = (source + 1) % count
                self._size -= 1
                return source, queue.popleft()
        return None


class FairFeed:
    """Several sources' messages into one handler: at most `limit` handlers run at once, and a free
    place goes to the sources round-robin (`FairQueue`). A source's messages start in the order they
    came: each waits for its place, in order, and for the one before it to start."""

    def __init__(self, handler: Handler, sources: int, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._handler = handler
        self._queue: FairQueue[asyncio.Future[None]] = FairQueue(sources)
        self._limit = limit
        self._running = 0
        # Per source: its messages start in the order they came.
        self._orders = [ArrivalOrder() for _ in range(sources)]

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return self._running

    def source(self, source: int) -> Handler:
        """The handler for one source's messages."""

        async def handle(message: Message) -> None:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            place = self._orders[source].place()
            self._queue.put(source, turn)
            self._admit()
            try:
                await turn
                # Given a place, it resumes a loop iteration later: a later message of its source that
                # finds a place free meanwhile must not start first (a User's requests are decided in
                # the order they came: a lower RequestID counter after a higher one is refused).
                await place.turn()
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # given its place as it was cancelled
                    self._release()
                raise
            finally:
                place.passed()
            try:
                await self._handler(message)
            finally:
                self._release()

        return handle

    def _release(self) -> None:
        self._running -= 1
        self._admit()

    def _admit(self) -> None:
        while self._running < self._limit:
            taken = self._queue.take()
            if taken is None:
                return
            turn = taken[1]
            if turn.done():  # its handler was cancelled while it waited
                continue
            turn.set_result(None)
            self._running += 1


class OrderedGate:
    """Holds messages until opened, then lets them through in the order they came: one that arrives
    as the gate opens (its first step runs before the held ones resume) waits for those before it."""

    def __init__(self) -> None:
        self._opened = asyncio.Event()
        self._order = ArrivalOrder()

    def open(self) -> None:
        self._opened.set()

    async def passed(self) -> None:
        """Return once the gate is open and every message that came before this one has passed."""
        place = self._order.place()
        try:
            await self._opened.wait()
            await place.turn()
        finally:
            place.passed()


class InboundSessions:
    """The N sessions Users' requests arrive on, beside the request session `main` (which publishes).

    `flushed` is the request session's: a message is acknowledged only once what its handler
    published there reached the broker."""

    def __init__(
        self,
        main: MqttTransport,
        sessions: Sequence[MqttTransport],
        *,
        inbound: str,
        shared_group: str = "",
        limit: int = 1000,
    ) -> None:
        if len(sessions) < 2:  # one session is the plain `dsp/in/+` on `main`
            raise ValueError("InboundSessions needs at least two sessions")
        self.main = main
        self.sessions = tuple(sessions)
        self._inbound = inbound
        self._group = shared_group
        self._limit = limit
        self._users: set[Eui] = set()
        self._feed: FairFeed | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        main: MqttTransport,
        *,
        on_reconnect: Callable[[], object] | None = None,
        on_failure: Callable[[Exception], object] | None = None,
    ) -> InboundSessions:
        client_id = settings.gateway.client_id
        count = settings.gateway.inbound_sessions
        sessions = [
            MqttTransport.from_settings(
                settings,
                f"{client_id}{INBOUND_SESSION_SUFFIX}{k}",
                on_reconnect=on_reconnect,
                receive_maximum=session_window(settings),
            )
            for k in range(count)
        ]
        for session in sessions:
            session.on_failure = on_failure
        return cls(
            main,
            sessions,
            inbound=settings.topics.inbound,
            shared_group=settings.topics.shared_group,
            limit=settings.gateway.inflight_window,
        )

    def subscription(self, user: Eui) -> str:
        topic = f"{self._inbound}/{user}"
        return f"$share/{self._group}/{topic}" if self._group else topic

    @property
    def catch_all(self) -> str:
        """What the request session subscribes with one session: dropped from it with several."""
        topic = f"{self._inbound}/+"
        return f"$share/{self._group}/{topic}" if self._group else topic

    def owned(self, users: Iterable[Eui]) -> list[list[str]]:
        """Each session's subscriptions for `users`."""
        owned: list[list[str]] = [[] for _ in self.sessions]
        for user in sorted(users):
            owned[shard_of(user, len(self.sessions))].append(self.subscription(user))
        return owned

    def attach(self, handler: Handler) -> Handler:
        """Messages of every session go to `handler` through one FairFeed; returns the request
        session's share of it (what that session still has queued from a configuration with one
        session), the last source of the round-robin. Called once, before `main` starts."""
        self._feed = FairFeed(handler, len(self.sessions) + 1, self._limit)
        return self._feed.source(len(self.sessions))

    async def start(self, users: Iterable[Eui]) -> None:
        """Start every session with its Users' subscriptions, once `main` runs with `attach`'s handler."""
        feed = self._feed
        if feed is None:
            raise RuntimeError("attach a handler before starting the inbound sessions")
        known = set(users)
        owned = self.owned(known)
        started: list[MqttTransport] = []
        try:
            for k, session in enumerate(self.sessions):
                await session.start(owned[k], self._acknowledged_after_flush(feed.source(k)))
                started.append(session)
        except BaseException:
            for session in started:
                await session.stop()
            raise
        # Left by an earlier configuration (another N, or one session): both copies would be handled.
        for k, session in enumerate(self.sessions):
            await session.unsubscribe([s for j, subs in enumerate(owned) if j != k for s in subs])
        await self.main.unsubscribe([self.catch_all])
        self._users = known
        log.info("inbound-sessions", sessions=len(self.sessions), users=len(known))

    def _acknowledged_after_flush(self, handle: Handler) -> Handler:
        async def handled(message: Message) -> None:
            await handle(message)
            await self.main.flushed()

        return handled

    @property
    def subscribed(self) -> frozenset[Eui]:
        """The Users whose topics are subscribed."""
        return frozenset(self._users)

    async def add_users(self, users: Iterable[Eui]) -> int:
        """Subscribe Users not subscribed yet (registered since the start); returns how many."""
        new = set(users) - self._users
        if not new:
            return 0
        for k, subscriptions in enumerate(self.owned(new)):
            if subscriptions:
                await self.sessions[k].subscribe(subscriptions)
        self._users |= new
        log.info("inbound-users-subscribed", users=len(new))
        return len(new)

    async def stop(self) -> None:
        await asyncio.gather(*(session.stop() for session in self.sessions))

    @property
    def failure(self) -> Exception | None:
        return next((s.failure for s in self.sessions if s.failure is not None), None)
