"""`MqttTransport`: the Transport over MQTT 5 with gmqtt, used by `mp169 run`.

Delivery (the reasoning is in docs/transport.md):
- Inbound QoS 1 messages are acknowledged only after the handler returned: gmqtt with
  `optimistic_acknowledgement=False` sends the PUBACK from the done-callback of the coroutine
  `on_message` returned (only for coroutine callbacks, so `_Link._on_publish` must stay `async`).
- The session is persistent (clean start off, a session expiry interval), so what arrives while the
  gateway is away, and what it had not acknowledged, is delivered when it connects again.
- The Receive Maximum connect property is the in-flight window asked of the broker (Mosquitto 2.0.11
  holds it only while no acknowledgements flow: docs/transport.md, bench/receive_maximum.py).
- `publish` writes a QoS 1 PUBLISH on the connection and returns. A handler's publishes are written
  before its message's PUBACK on the same TCP connection, so the broker never holds the ack without
  the publish. Publishes not acknowledged by the broker when a connection drops are published again,
  first and in order, on the next connection.

Each connection is a fresh gmqtt client (`_Link`); gmqtt's own reconnect is switched off and this
module reconnects with capped, jittered exponential backoff. A PUBACK still owed by a handler of a
dropped connection is then written to that dead socket and lost, so the broker redelivers the
message (DUP set) instead of an acknowledgement landing on a newer connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
from collections import deque
from enum import StrEnum
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import gmqtt
import structlog
from gmqtt.mqtt.constants import MQTTv50

from gateway.transport import Handler, Message, split_shared, validate_topic

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable, Sequence

    from gateway.config import BrokerSettings, Settings

log = structlog.get_logger("mp169.mqtt")

PUBACK_SUCCESS = 0
# MQTT 5 DISCONNECT reason code: another client connected with this client id.
SESSION_TAKEN_OVER = 0x8E
# gmqtt reconnects by itself while its failed attempts <= reconnect_retries (-1: forever); -2 never does.
_GMQTT_NO_RECONNECT = -2
_QOS_1 = 1
_STOP_TIMEOUT_SECONDS = 30.0
# Brokers that close a taken-over connection without DISCONNECT 0x8E (Mosquitto 2.0.11 does): this
# many connections in a row, each made at the first attempt, closed by the broker within the
# keepalive interval without having published anything (a publish the ACL refuses also makes
# Mosquitto close the connection), are two clients with one id taking the session from each other.
_TAKEOVER_PATTERN = 3

Outbound = tuple[str, bytes, int]
"""Topic, payload, and the publish's sequence number in its transport (for `flushed`)."""
T = TypeVar("T")


def _not_gmqtt_reconnect_refusal(record: logging.LogRecord) -> bool:
    # gmqtt logs this at error level whenever a connection drops, because its own reconnect is off.
    return record.getMessage() != "[Client] max number of failed connection attempts achieved"


_GMQTT_LOG = logging.getLogger("gmqtt.client")
_GMQTT_LOG.addFilter(_not_gmqtt_reconnect_refusal)


class ConnectionEvent(StrEnum):
    CONNECTED = "connected"
    LOST = "lost"
    RECONNECTED = "reconnected"


class BrokerRefusedError(Exception):
    """The broker refused the connection (CONNACK) or a subscription (SUBACK)."""


class ConnectionLostError(Exception):
    """The connection dropped before it was usable."""


class TransportFailedError(RuntimeError):
    """The transport gave up for good: the broker stayed unreachable past `give_up_seconds`, or another
    client took the session over. Raised by `start` and, afterwards, by `publish`."""


class BrokerUnreachableError(TransportFailedError):
    """No connection to the broker within `give_up_seconds`."""


class SessionTakenOverError(TransportFailedError):
    """Another client connected with our client id: the broker said so (DISCONNECT 0x8E), or closed
    our idle connections one after the other right after they were made (`_TAKEOVER_PATTERN`)."""


def backoff_delay(
    attempt: int, *, minimum: float, maximum: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before reconnect attempt `attempt` (0 = first retry).

    Uniform in [minimum, min(maximum, minimum * 2**(attempt + 1))]: growing so a broker that stays
    down is not hammered, capped so a recovered broker is found soon, jittered so several gateways
    do not retry in step.
    """
    low = min(minimum, maximum)
    ceiling = min(maximum, low * 2.0 ** min(attempt + 1, 64))
    return low + rand() * (ceiling - low)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _Link:
    """One connection: a fresh gmqtt client, and the QoS 1 publishes the broker has not acknowledged.

    It is also the client's `persistent_storage`, gmqtt's store of unacknowledged outbound
    publishes: that is where PUBACKs become visible (`remove_message_by_mid`). gmqtt's replay of
    stored raw packets is not used (`get_all` is empty); MqttTransport replays on the next link.
    """

    def __init__(
        self,
        client_id: str,
        settings: BrokerSettings,
        receive_maximum: int,
        deliver: Callable[[_Link, Message], Awaitable[int]],
        settled: Callable[[int], None],
    ) -> None:
        self.unacked: dict[int, Outbound] = {}
        self._settled = settled
        self.changed = asyncio.Event()
        """Set on a PUBACK and on the loss of the connection."""
        self.lost = asyncio.Event()
        self.session_present = False
        self.taken_over = False
        """The broker closed this connection with reason 0x8E (session taken over)."""
        self.published = 0
        self._deliver = deliver
        self._sending: Outbound | None = None
        self.acknowledged: asyncio.Future[None] | None = None
        """Resolved when the latest message's handler may be acknowledged (PUBACKs keep arrival order)."""
        self._subacks: dict[int, asyncio.Future[list[int]]] = {}
        self.client = gmqtt.Client(
            client_id,
            clean_session=False,
            optimistic_acknowledgement=False,
            persistent_storage=self,
            session_expiry_interval=settings.session_expiry_seconds,
            receive_maximum=receive_maximum,
            logger=_GMQTT_LOG,
        )
        self.client.set_config({"reconnect_retries": _GMQTT_NO_RECONNECT})
        if settings.username is not None:
            self.client.set_auth_credentials(settings.username, settings.password)
        self.client.on_message = self._on_publish
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe

    async def open(
        self,
        settings: BrokerSettings,
        tls: ssl.SSLContext | bool,
        subscriptions: Sequence[str],
    ) -> None:
        """Connect and subscribe; raises BrokerRefusedError, ConnectionLostError, OSError, TimeoutError."""
        timeout = settings.keepalive_seconds
        try:
            await self._until_lost(
                self.client.connect(
                    settings.host,
                    settings.port,
                    ssl=tls,
                    keepalive=settings.keepalive_seconds,
                    version=MQTTv50,
                ),
                timeout,
            )
        except gmqtt.MQTTConnectError as exc:
            raise BrokerRefusedError(f"broker refused the connection: {exc}") from exc
        await self.subscribe(subscriptions, within=timeout)

    async def subscribe(self, subscriptions: Sequence[str], *, within: float) -> None:
        """Subscribe at QoS 1 and wait (up to `within` seconds) for the SUBACK; raises
        BrokerRefusedError, ConnectionLostError, TimeoutError."""
        if not subscriptions:
            return
        timeout = within
        mid = self.client.subscribe([gmqtt.Subscription(topic, qos=_QOS_1) for topic in subscriptions])
        granted = asyncio.get_running_loop().create_future()
        self._subacks[mid] = granted
        codes = await self._until_lost(granted, timeout)
        refused = [(topic, code) for topic, code in zip(subscriptions, codes, strict=False) if code != _QOS_1]
        if refused or len(codes) != len(subscriptions):
            # 0x80 and above: refused (0x87: not authorised by the ACL); 0: granted at QoS 0 only,
            # which would lose the acknowledgement semantics.
            detail = ", ".join(f"{topic} (code {code:#04x})" for topic, code in refused)
            raise BrokerRefusedError(f"broker did not grant QoS 1 subscriptions: {detail}")

    async def _until_lost(self, awaitable: Awaitable[T], seconds: float) -> T:
        """Await `awaitable`, giving up when the connection drops or after `seconds`."""
        work = asyncio.ensure_future(awaitable)
        # Abandoned, it must not end as "Task exception was never retrieved".
        work.add_done_callback(_retrieve)
        lost = asyncio.ensure_future(self.lost.wait())
        try:
            done, _ = await asyncio.wait({work, lost}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancel()
            raise
        finally:
            lost.cancel()
        if work in done:
            return work.result()
        work.cancel()
        await asyncio.wait({work})  # unwound before the caller closes the link
        if self.lost.is_set():
            raise ConnectionLostError("connection lost before it was ready")
        raise TimeoutError(f"broker did not answer within {seconds} s")

    async def unsubscribe(self, subscriptions: Sequence[str], *, within: float) -> None:
        """Unsubscribe and wait (up to `within` seconds) for the UNSUBACK; raises ConnectionLostError,
        TimeoutError. A filter the session did not hold is answered 0x11, which is no error here."""
        mid = self.client.unsubscribe(list(subscriptions))
        answered = asyncio.get_running_loop().create_future()
        self._subacks[mid] = answered
        await self._until_lost(answered, within)

    def send(self, item: Outbound) -> None:
        """Write a QoS 1 PUBLISH. OverflowError: the broker's Receive Maximum of unacknowledged
        publishes is reached (gmqtt has no packet id left); wait for `changed` and try again."""
        self._sending = item
        try:
            self.client.publish(item[0], item[1], qos=_QOS_1)
            self.published += 1
        finally:
            self._sending = None

    async def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            await self.client.disconnect()
        self._mark_lost()

    # -- gmqtt callbacks --------------------------------------------------------------------------

    async def _on_publish(
        self, _client: Any, topic: str | bytes, payload: bytes, _qos: int, properties: Any
    ) -> int:
        name = topic if isinstance(topic, str) else topic.decode("utf-8", "replace")
        return await self._deliver(self, Message(name, payload, redelivered=bool(properties.get("dup"))))

    def _on_connect(self, _client: Any, flags: int, _rc: int, _properties: Any) -> None:
        self.session_present = bool(flags)

    def _on_disconnect(self, _client: Any, packet: Any, _exc: Any = None) -> None:
        # A DISCONNECT from the broker arrives with its variable header (the reason code first); a
        # dropped socket arrives as an empty packet.
        if isinstance(packet, bytes | bytearray) and packet[:1] == bytes([SESSION_TAKEN_OVER]):
            self.taken_over = True
        self._mark_lost()

    def _on_subscribe(self, _client: Any, mid: int, granted: Sequence[int], _properties: Any) -> None:
        future = self._subacks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(list(granted))

    def _on_unsubscribe(self, _client: Any, mid: int, codes: Sequence[int]) -> None:
        self._on_subscribe(_client, mid, codes, None)

    def _mark_lost(self) -> None:
        self.lost.set()
        self.changed.set()

    # -- gmqtt persistent_storage interface ------------------------------------------------------

    def push_message(self, mid: int, _raw_package: bytes) -> None:
        if self._sending is not None:
            self.unacked[mid] = self._sending

    def remove_message_by_mid(self, mid: int) -> None:
        item = self.unacked.pop(mid, None)
        if item is not None:
            self._settled(item[2])
            self.changed.set()

    def clear(self) -> None:
        # Called at a CONNACK without a session, before anything was published on this link.
        self.unacked.clear()

    @property
    def is_empty(self) -> bool:
        return not self.unacked

    async def wait_empty(self) -> None:
        return

    def get_all(self) -> list[tuple[int, bytes]]:
        return []


class MqttTransport:
    """`Transport` over MQTT 5 (gmqtt). `receive_maximum` is the in-flight window.

    `reconnects` counts connections re-established after a loss, and `on_reconnect` is called after
    each (the metrics counter); `on_connection_event`, if set, is called with every ConnectionEvent;
    `handler_errors` counts handlers that raised (their messages were acknowledged).

    `give_up_seconds` (None: never) bounds how long the broker may stay unreachable, at start and
    after a loss; interactive commands set it, the daemon does not. Whatever it is, a session that
    another client took over (SessionTakenOverError) is never taken back: two clients with one id
    would take it from each other forever. Either failure ends the transport:
    `start` raises it, or later `failure` holds it, `failed` is set, `on_failure` is called, and
    `publish` raises it.
    """

    def __init__(  # noqa: PLR0913 - keyword-only options with defaults
        self,
        settings: BrokerSettings,
        client_id: str,
        *,
        receive_maximum: int = 1000,
        ssl_context: ssl.SSLContext | None = None,
        stop_timeout_seconds: float = _STOP_TIMEOUT_SECONDS,
        give_up_seconds: float | None = None,
        on_reconnect: Callable[[], object] | None = None,
        on_connection_event: Callable[[ConnectionEvent], object] | None = None,
        on_failure: Callable[[TransportFailedError], object] | None = None,
    ) -> None:
        if not 1 <= receive_maximum <= 65535:
            raise ValueError("receive_maximum must be in 1..65535")
        self.settings = settings
        self.client_id = client_id
        self.receive_maximum = receive_maximum
        self.reconnects = 0
        self.handler_errors = 0
        self.on_reconnect = on_reconnect
        self.on_connection_event = on_connection_event
        self.on_failure = on_failure
        self.give_up_seconds = give_up_seconds
        self.failure: TransportFailedError | None = None
        self.failed = asyncio.Event()
        self._tls: ssl.SSLContext | bool = ssl_context or settings.ssl_context() or False
        self._stop_timeout = stop_timeout_seconds
        self._handler: Handler | None = None
        self._subscriptions: tuple[str, ...] = ()
        self._link: _Link | None = None
        """The connection publishes go to; None while (re)connecting."""
        self._ready = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._carryover: deque[Outbound] = deque()
        # Sequence numbers of publishes not yet acknowledged by the broker (a min-heap, lazily pruned).
        self._issued = 0
        self._unsettled: list[int] = []
        self._settled_seqs: set[int] = set()
        self._settled = asyncio.Event()
        """Publishes handed to a dropped connection without a PUBACK: replayed first on the next one."""
        self._supervisor: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._taking = False
        self._closed = False
        self._connected_at = 0.0
        self._attempts = 0
        """Attempts the last connection took (1: at once)."""
        self._brief_connections = 0
        """Connections in a row that the broker closed soon after they were made at the first attempt."""

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        client_id: str | None = None,
        *,
        give_up_seconds: float | None = None,
        on_reconnect: Callable[[], object] | None = None,
        receive_maximum: int | None = None,
    ) -> MqttTransport:
        """The broker section, the in-flight window (by default), the stop timeout and (by default) the
        client id."""
        return cls(
            settings.broker,
            client_id or settings.gateway.client_id,
            receive_maximum=receive_maximum or settings.gateway.inflight_window,
            give_up_seconds=give_up_seconds,
            stop_timeout_seconds=settings.gateway.stop_timeout_seconds,
            on_reconnect=on_reconnect,
        )

    # -- Transport --------------------------------------------------------------------------------

    async def start(self, subscriptions: Sequence[str], handler: Handler) -> None:
        """Connect (retrying while the broker is unreachable, up to `give_up_seconds`) and subscribe.
        Raises BrokerRefusedError at once if the broker refuses the connection or a subscription: that
        is configuration; BrokerUnreachableError when `give_up_seconds` passed without a connection."""
        if self._handler is not None:
            raise RuntimeError("already started")
        for subscription in subscriptions:
            split_shared(subscription)
        self._handler = handler
        self._subscriptions = tuple(subscriptions)
        self._taking = True
        try:
            link = await self._establish(first=True)
        except BaseException:
            self._handler, self._taking = None, False
            raise
        self._activate(link)
        self._emit(ConnectionEvent.CONNECTED)
        log.info("broker-connected", client_id=self.client_id, session_present=link.session_present)
        self._supervisor = asyncio.create_task(self._supervise(link), name="mp169-mqtt-supervisor")

    async def publish(self, topic: str, payload: bytes) -> None:
        validate_topic(topic)
        if self._handler is None:
            raise RuntimeError("transport not started")
        self._issued += 1
        item = (topic, payload, self._issued)
        heapq.heappush(self._unsettled, self._issued)
        sent = False
        try:
            async with self._send_lock:  # FIFO: publishes reach the connection in call order
                while True:
                    if self.failure is not None:
                        raise self.failure
                    if self._closed:
                        raise RuntimeError(f"transport stopped: not published to {topic}")
                    link = self._link
                    if link is None:
                        await self._ready.wait()
                        continue
                    try:
                        link.send(item)
                    except OverflowError:
                        link.changed.clear()
                        await link.changed.wait()
                    else:
                        sent = True
                        return
        finally:
            if not sent:
                self._settle(item[2])

    async def subscribe(self, subscriptions: Sequence[str]) -> None:
        """Add subscriptions to a started transport: made now (the SUBACK awaited) if connected, and on
        every later connection. BrokerRefusedError if the broker refuses one (the others stand)."""
        if self._handler is None:
            raise RuntimeError("transport not started")
        for subscription in subscriptions:
            split_shared(subscription)
        self._subscriptions += tuple(subscriptions)
        link = self._link
        if link is None:
            return  # the next connection subscribes them
        # A lost connection: the next one subscribes them.
        with contextlib.suppress(ConnectionLostError, TimeoutError):
            await link.subscribe(subscriptions, within=self.settings.keepalive_seconds)

    async def unsubscribe(self, subscriptions: Sequence[str]) -> None:
        """Drop subscriptions, such as those the persistent session holds from an earlier
        configuration; returns once the broker confirmed it or the connection is lost. Messages
        already queued for the session are still delivered."""
        unwanted = set(subscriptions)
        self._subscriptions = tuple(s for s in self._subscriptions if s not in unwanted)
        link = self._link
        if not subscriptions or link is None:
            return
        # Lost: the session keeps them until the next start unsubscribes again.
        with contextlib.suppress(ConnectionLostError, TimeoutError):
            await link.unsubscribe(subscriptions, within=self.settings.keepalive_seconds)

    async def flushed(self) -> None:
        """Return once every publish made before this call was acknowledged by the broker (or failed).

        A message from another session whose handler published here must not be acknowledged before
        that: on one connection TCP order gives it for free, across two it does not."""
        upto = self._issued
        while self._unsettled and self._unsettled[0] <= upto:
            if self.failure is not None:
                raise self.failure
            if self._closed:
                raise RuntimeError("transport stopped: publishes not acknowledged by the broker")
            self._settled.clear()
            await self._settled.wait()

    def _settle(self, seq: int) -> None:
        self._settled_seqs.add(seq)
        heap = self._unsettled
        while heap and heap[0] in self._settled_seqs:
            self._settled_seqs.discard(heapq.heappop(heap))
        self._settled.set()

    async def stop(self) -> None:
        """Stop taking messages, wait (up to the stop timeout) for running handlers and for the broker
        to acknowledge every publish, then disconnect. Messages that arrive meanwhile are left
        unacknowledged: the broker keeps them for the next session. Without a connection it does
        not wait: nothing more can be acknowledged, running handlers are cancelled and their
        messages redelivered to the next session, which is also where unacknowledged publishes
        are owed (their requests' PUBACKs went with the connection that carried them)."""
        if self._closed or self._handler is None:
            return
        self._taking = False
        try:
            async with asyncio.timeout(self._stop_timeout):
                await self._drain()
        except TimeoutError:
            log.warning(
                "stop-timeout",
                running_handlers=len(self._running),
                unacknowledged=self._unacknowledged(),
            )
        await self._shutdown()
        log.info("broker-disconnected", client_id=self.client_id)

    async def abort(self) -> None:
        """Drop the connection as a crash would: running handlers are cancelled and their messages
        left unacknowledged, so the broker redelivers them to the next session."""
        if self._closed or self._handler is None:
            return
        self._taking = False
        await self._shutdown()

    # -- inbound ---------------------------------------------------------------------------------

    async def _on_message(self, link: _Link, message: Message) -> int:
        handler = self._handler
        if handler is None or not self._taking:
            # Stopping: not handled, so never acknowledged. The PUBACK gmqtt sends when this returns
            # goes to the closed connection.
            await link.lost.wait()
            return PUBACK_SUCCESS
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
            self._idle.clear()
        # PUBACKs leave in the order the messages came (MQTT-4.6.0-2), though handlers finish in any
        # order: acknowledged out of order, Mosquitto 2.0.11 delivers a session's queued messages out
        # of order once its Receive Maximum is reached (measured: bench.faults with small windows).
        previous, acknowledged = link.acknowledged, asyncio.get_running_loop().create_future()
        link.acknowledged = acknowledged
        try:
            try:
                await handler(message)
            except asyncio.CancelledError:
                if not link.lost.is_set():
                    raise  # cancelled from outside with the connection up: no PUBACK must be sent
                # abort(): the connection is closed first, so the PUBACK goes nowhere.
            except Exception:  # acknowledged like any other: no poison-message loop
                self.handler_errors += 1
                log.exception("handler-failed", topic=message.topic, redelivered=message.redelivered)
            if previous is not None:
                await asyncio.shield(previous)  # cancelled here, it must not cancel the earlier one's
        finally:
            acknowledged.set_result(None)
            if task is not None:
                self._running.discard(task)
                if not self._running:
                    self._idle.set()
        return PUBACK_SUCCESS

    # -- connections -----------------------------------------------------------------------------

    def _new_link(self) -> _Link:
        return _Link(self.client_id, self.settings, self.receive_maximum, self._on_message, self._settle)

    async def _establish(self, *, first: bool) -> _Link:
        """A connected, subscribed link; retries with backoff. On the first start, a refusal raises;
        BrokerUnreachableError once `give_up_seconds` would pass before the next attempt."""
        attempt = 0
        loop = asyncio.get_running_loop()
        since = loop.time()
        while True:
            link = self._new_link()
            try:
                await link.open(self.settings, self._tls, self._subscriptions)
            except asyncio.CancelledError:
                await link.close()
                raise
            except (BrokerRefusedError, ConnectionLostError, OSError, TimeoutError) as exc:
                await link.close()
                if first and isinstance(exc, BrokerRefusedError):
                    raise
                delay = backoff_delay(
                    attempt,
                    minimum=self.settings.reconnect_min_seconds,
                    maximum=self.settings.reconnect_max_seconds,
                )
                attempt += 1
                waited = loop.time() - since
                if self.give_up_seconds is not None and waited + delay > self.give_up_seconds:
                    raise BrokerUnreachableError(
                        f"no connection to the broker at {self.settings.url} after {attempt} attempt(s) "
                        f"in {waited:.0f} s: {exc}"
                    ) from exc
                # A refusal needs an operator (credentials, ACL); an unreachable broker does not.
                report = log.error if isinstance(exc, BrokerRefusedError) else log.warning
                report("broker-connect-failed", attempt=attempt, retry_in=round(delay, 3), error=str(exc))
                await asyncio.sleep(delay)
            else:
                self._attempts = attempt + 1
                if not first and not link.session_present:
                    # The broker lost the session: what was queued for the gateway while it was
                    # away is gone with it; subscriptions were made again above.
                    log.warning("broker-session-lost", client_id=self.client_id)
                return link

    async def _supervise(self, link: _Link) -> None:
        while True:
            await link.lost.wait()
            self._deactivate(link)
            self._emit(ConnectionEvent.LOST)
            taken_over = self._taken_over(link)
            if taken_over is not None:
                self._fail(taken_over)
                return
            log.warning("broker-connection-lost", unacknowledged=len(self._carryover))
            try:
                link = await self._establish(first=False)
            except BrokerUnreachableError as exc:
                self._fail(exc)
                return
            try:
                replayed = await self._replay(link)
            except asyncio.CancelledError:
                await link.close()
                raise
            if replayed:
                self._activate(link)
                self.reconnects += 1
                self._emit(ConnectionEvent.RECONNECTED)
                log.info(
                    "broker-reconnected", reconnects=self.reconnects, session_present=link.session_present
                )

    async def _replay(self, link: _Link) -> bool:
        """Publish the carryover on `link`, oldest first; False if the link dropped meanwhile.

        The oldest goes alone and must be acknowledged before the rest. Mosquitto answers a publish
        its ACL refuses with PUBACK 0x87 and closes the connection; with more publishes unread
        behind it the close is a reset, the PUBACK is lost, and that publish would come back here
        on every connection. Alone, its PUBACK arrives, so each connection settles at least one.
        """
        alone = True
        while self._carryover:
            if link.lost.is_set():
                return False
            try:
                link.send(self._carryover[0])
            except OverflowError:
                link.changed.clear()
                await link.changed.wait()
                continue
            self._carryover.popleft()
            while alone and link.unacked and not link.lost.is_set():
                link.changed.clear()
                await link.changed.wait()
            alone = False
        return not link.lost.is_set()

    def _taken_over(self, link: _Link) -> SessionTakenOverError | None:
        """Whether the loss of `link` means another client has our client id."""
        brief = asyncio.get_running_loop().time() - self._connected_at < self.settings.keepalive_seconds
        closed_unprovoked = brief and self._attempts == 1 and not link.published
        self._brief_connections = self._brief_connections + 1 if closed_unprovoked else 0
        if link.taken_over:
            how = "took this one's session over (MQTT reason 0x8E)"
        elif self._brief_connections >= _TAKEOVER_PATTERN:
            how = (
                f"is most likely connected: the broker closed each of the last {self._brief_connections} "
                "connections right after it was made"
            )
        else:
            return None
        return SessionTakenOverError(
            f"another client with client id {self.client_id!r} on {self.settings.url} {how}; "
            "two clients must never share a client id"
        )

    def _activate(self, link: _Link) -> None:
        self._link = link
        self._connected_at = asyncio.get_running_loop().time()
        self._ready.set()

    def _deactivate(self, link: _Link) -> None:
        if self._link is link:
            self._link = None
            self._ready.clear()
        # Sent on this link before anything still in the carryover was.
        self._carryover.extendleft(reversed(link.unacked.values()))
        link.unacked.clear()

    def _unacknowledged(self) -> int:
        return len(self._carryover) + (len(self._link.unacked) if self._link is not None else 0)

    async def _drain(self) -> None:
        """Until running handlers are done and the broker acknowledged every publish, or the
        connection is down (then nothing more can be acknowledged on it)."""
        while (link := self._link) is not None and not link.lost.is_set():
            if self._idle.is_set() and not self._unacknowledged():
                return
            link.changed.clear()
            waits = [asyncio.ensure_future(link.changed.wait())]
            if not self._idle.is_set():
                waits.append(asyncio.ensure_future(self._idle.wait()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()

    def _fail(self, failure: TransportFailedError) -> None:
        """Give up for good: publishers get the failure, and so does whoever waits for it."""
        log.error("broker-gave-up", client_id=self.client_id, error=str(failure))
        self.failure = failure
        self._ready.set()  # publishers waiting for a connection see the failure
        self._settled.set()  # and so do handlers waiting for their publishes to be acknowledged
        self.failed.set()
        if self.on_failure is not None:
            try:
                self.on_failure(failure)
            except Exception:
                log.exception("failure-hook-failed")

    async def _shutdown(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        link = self._link
        if link is not None:
            self._deactivate(link)  # publishers wait while the link closes
            await link.close()
        # Only now may publishes fail: a handler failing on that is "acknowledged" to a closed link.
        self._closed = True
        self._ready.set()
        self._settled.set()
        # Handlers still running after the stop timeout (or on abort): their messages stay unacknowledged.
        leftover = list(self._running)
        for task in leftover:
            task.cancel()
        await asyncio.gather(*leftover, return_exceptions=True)
        if self._carryover:
            log.warning("publishes-not-acknowledged", count=len(self._carryover))

    def _emit(self, event: ConnectionEvent) -> None:
        hooks: list[Callable[[], object]] = []
        if self.on_connection_event is not None:
            hooks.append(partial(self.on_connection_event, event))
        if event is ConnectionEvent.RECONNECTED and self.on_reconnect is not None:
            hooks.append(self.on_reconnect)
        for hook in hooks:
            try:
                hook()
            except Exception:  # a metrics hook must not take the connection down
                log.exception("connection-event-hook-failed", connection_event=str(event))
