"""The shell around the router: feeds it events and applies its effects, in order.

`Shell.handle` is the transport's handler. It turns the message into a `Received` event at once
(handlers start in arrival order, so the router sees messages in arrival order), applies the
effects the router returns, and returns, so the transport acknowledges the message, when the
router releases it with `Acknowledge`: after its commit and its publishes.

Three small loops do the I/O: the committer joins the router's `Commit`s that are queued into one
store transaction and reports `Committed` / `CommitFailed`; the publisher hands `Publish`es to the
transport in order and resolves each `Acknowledge`; flag requests' store reads run as tasks that
report `FlagSubjectRead`. Observations go to the observers (metrics, logs, outcome records) with
the RequestID bound in structlog's context. The shell decides nothing.

With several instances over one PostgreSQL store, a `ClusterMember` (gateway/cluster.py) joins in:
while its lease is not confirmed, arriving messages wait, in arrival order, undecided (fencing); a
commit that carries a flag request is made alone, and the router hears of it only once every live
instance has applied its flag epoch, so the supplier's answer leaves after that; and the member
acknowledges an epoch only after `settled()`: every message decided before it was applied is out.
XML signatures (gateway/signing.py) are CPU work the shell keeps off the event loop and off the
router's serial path: with `verify`, each inbound Service Request's signature is checked in the
executor as soon as it arrives, concurrently with others, and the request reaches the router with its
`Verification` in arrival order (a message waits only for the messages before it). With `sign`, every
document published to users is signed in the executor as soon as the router produces it (the
documents of one event-loop iteration in chunks, a task each), and handed to the transport in the
order produced.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, TypeAlias, TypeVar

import structlog

from gateway.arrival import ArrivalOrder
from gateway.router import (
    Acknowledge,
    Commit,
    CommitFailed,
    Committed,
    FlagSubjectRead,
    Instant,
    OverdueRead,
    Publish,
    ReadFlagSubject,
    ReadOverdue,
    Received,
    Router,
    TimePassed,
    deadletter_payload,
)
from gateway.store import CommitBatch, retryable
from rules.domain import utc_now

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Sequence
    from concurrent.futures import Executor
    from datetime import datetime

    from gateway.budget import LatencyBudget
    from gateway.cluster import ClusterMember
    from gateway.metrics import Metrics
    from gateway.observers import Observer
    from gateway.router import Effect, Event, Observation
    from gateway.signing import Verification
    from gateway.store import CommitResult, FlagStore
    from gateway.transport import Message
    from rules.domain import Eui

log = structlog.get_logger("mp169.shell")

T = TypeVar("T")
# Backoff between attempts at a busy or locked store: doubling from the first, capped at the second.
_RETRY_FIRST_SECONDS = 0.05
_RETRY_CAP_SECONDS = 2.0
# Documents to users signed per executor task: enough to spare a future and a loop wake-up per
# document, few enough that the first of a chunk does not wait long for the rest (a signature is
# about 150 µs) and that a burst is spread over the pool's workers.
_SIGN_CHUNK = 8
MAX_COMMIT_BATCH = 512
"""Commits joined into one store transaction, at most."""

Publisher: TypeAlias = "Callable[[str, bytes], Awaitable[None]]"
Clock: TypeAlias = "Callable[[], datetime]"


class Shell:
    """Runs one router against one store and one transport."""

    def __init__(  # noqa: PLR0913 - the collaborators of one running router
        self,
        router: Router,
        *,
        store: FlagStore,
        publish: Publisher,
        observers: Sequence[Observer] = (),
        metrics: Metrics | None = None,
        clock: Clock = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
        max_batch: int = MAX_COMMIT_BATCH,
        member: ClusterMember | None = None,
        retry_seconds: float = 30.0,
        budget: LatencyBudget | None = None,
        verify: Callable[[bytes], Verification] | None = None,
        sign: Callable[[bytes], bytes] | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.router = router
        self._store = store
        self._publish = publish
        self._observers = tuple(observers)
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        self._max_batch = max_batch
        self._retry_seconds = retry_seconds
        self._budget = budget
        self._feeding: int | None = None  # the ticket whose Received is being fed (for the budget)
        self._tickets = itertools.count()
        self._waiting: dict[int, asyncio.Future[None]] = {}
        # Each commit with the number of publishes queued before it (see `_handed_over`).
        self._commits: asyncio.Queue[tuple[Commit, int]] = asyncio.Queue()
        self._queued_publishes = 0
        self._handed_publishes = 0
        self._handed = asyncio.Event()
        self._outbox: asyncio.Queue[Publish | _Signing | Acknowledge] = asyncio.Queue()
        self._publish_error: Exception | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._member = member
        # Messages waiting for a confirmed lease, in arrival order; the head is let through first.
        self._gate: deque[asyncio.Future[None]] = deque()
        self._flag_ticket: int | None = None
        self._carried: tuple[Commit, int] | None = None
        """Taken from the queue, committed with the next batch (its task_done comes then)."""
        """The flag request being read and committed: the router holds the messages after it."""
        if member is not None:
            member.attach(self.settled, self._open_gate)
        self._verify = verify
        self._sign = sign
        self._executor = executor
        self._unsigned: list[tuple[bytes, asyncio.Future[bytes]]] = []
        """Documents to users produced in this event-loop iteration, to be signed together."""
        self._requests = f"{router.topics.inbound}/"
        self._users = f"{router.topics.outbound}/"
        self._feeding_order = ArrivalOrder()
        """Messages reach the router in arrival order, whatever order their signature checks end in."""
        self._last_fed = -1
        """The ticket of the latest message fed to the router (tickets are fed in arrival order)."""

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._commit_loop(), name="mp169-committer"),
            asyncio.create_task(self._publish_loop(), name="mp169-publisher"),
        ]

    async def stop(self) -> None:
        """Finish every message already handed to `handle` (decided, committed, published), then stop."""
        while self._waiting:
            await asyncio.gather(*self._waiting.values(), return_exceptions=True)
            await asyncio.sleep(0)  # let the handlers that were waiting remove themselves
        await self._commits.join()
        await self._outbox.join()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)

    # -- the transport handler ------------------------------------------------------------------

    async def handle(self, message: Message) -> None:
        """Returns once the router released the message: its effects are durable and handed over."""
        started = time.perf_counter()
        await self._pass_gate()
        metrics = self._metrics
        if metrics is not None:
            metrics.inflight.inc()
        ticket = next(self._tickets)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._waiting[ticket] = done
        budget = self._budget
        try:
            if self._verify is None:
                self._received(Received(ticket, message.topic, message.payload, message.redelivered))
            else:
                await self._verified_in_order(ticket, message, self._verify)
            await done
            if budget is not None:
                budget.returned(ticket, time.perf_counter())
        except Exception as exc:
            log.exception("handling-failed", topic=message.topic)
            await self._deadletter_now(message, repr(exc))
        finally:
            del self._waiting[ticket]
            if metrics is not None:
                metrics.inflight.dec()
                metrics.latency.observe(time.perf_counter() - started)

    async def settled(self) -> None:
        """Return once every message decided so far has its effects published. Messages not decided
        yet are not waited for: they are decided with the view as it is now, whether still in their
        signature check or held by the router behind a flag request. Nor is that flag request: its
        answer waits for every instance's acknowledgement, and another instance's may be waiting for
        this one's (two instances answering flag requests at once would wait for each other until a
        lease lapsed)."""
        last = self._last_fed if self._flag_ticket is None else self._flag_ticket - 1
        decided = [done for ticket, done in self._waiting.items() if ticket <= last]
        await asyncio.gather(*decided, return_exceptions=True)

    async def _pass_gate(self) -> None:
        """Wait, in arrival order, while the cluster lease is not confirmed."""
        member = self._member
        if member is None or (member.confirmed and not self._gate):
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._gate.append(turn)
        self._open_gate()
        try:
            await turn
        finally:
            self._gate.remove(turn)
            self._open_gate()

    def _open_gate(self) -> None:
        member = self._member
        if self._gate and member is not None and member.confirmed and not self._gate[0].done():
            self._gate[0].set_result(None)

    async def _verified_in_order(
        self, ticket: int, message: Message, verify: Callable[[bytes], Verification]
    ) -> None:
        place = self._feeding_order.place()
        try:
            verification = None
            if message.topic.startswith(self._requests):
                loop = asyncio.get_running_loop()
                verification = await loop.run_in_executor(self._executor, verify, message.payload)
                if self._metrics is not None:
                    self._metrics.signature_checks.labels(result=verification.reason).inc()
            await place.turn()
            self._received(
                Received(ticket, message.topic, message.payload, message.redelivered, verification)
            )
        finally:
            place.passed()  # even if cancelled: the messages after this one go on

    def _received(self, received: Received) -> None:
        """Feed a message to the router, marking the latency budget's stages when one is kept."""
        self._last_fed = received.ticket
        budget = self._budget
        if budget is None:
            self._feed(received)
            return
        budget.received(received.ticket, time.perf_counter())
        self._feeding = received.ticket
        self._feed(received)
        self._feeding = None
        budget.decided(received.ticket, time.perf_counter())

    def tick(self) -> None:
        """Time passed: the router answers forwarded requests that are past their target (E21)."""
        self._feed(TimePassed())

    # -- events in, effects out -----------------------------------------------------------------

    def _feed(self, event: Event) -> None:
        effects = self.router.handle(event, Instant(self._clock(), self._monotonic()))
        self._apply(effects)

    def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Publish):
                self._queue_publish(effect)
            elif isinstance(effect, Acknowledge):
                if effect.ticket == self._flag_ticket:
                    self._flag_ticket = None
                if self._budget is not None:
                    self._budget.released(effect.ticket, time.perf_counter())
                self._outbox.put_nowait(effect)
            elif isinstance(effect, Commit):
                if self._budget is not None and self._feeding is not None:
                    self._budget.committing(self._feeding, effect.batch)
                self._commits.put_nowait((effect, self._queued_publishes))
            elif isinstance(effect, ReadFlagSubject):
                self._flag_ticket = effect.ticket
                self._spawn(self._read_flag_subject(effect), "mp169-flag-read")
            elif isinstance(effect, ReadOverdue):
                self._spawn(self._read_overdue(effect), "mp169-overdue-read")
            else:
                self._observe(effect)

    def _spawn(self, work: Coroutine[None, None, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _queue_publish(self, publish: Publish) -> None:
        """Into the outbox in order; a document to a user is signed in the executor meanwhile."""
        if self._sign is not None and publish.topic.startswith(self._users):
            loop = asyncio.get_running_loop()
            signed: asyncio.Future[bytes] = loop.create_future()
            if not self._unsigned:
                loop.call_soon(self._sign_unsigned)
            self._unsigned.append((publish.payload, signed))
            self._outbox.put_nowait(_Signing(publish.topic, signed))
        else:
            self._outbox.put_nowait(publish)
        self._queued_publishes += 1

    def _sign_unsigned(self) -> None:
        """The documents of one event-loop iteration go to the executor in chunks, a task each: one
        future, one wake-up of the loop and (with worker processes) one pipe message per chunk, where a
        task per document cost more than the signature in a worker process (README, Performance)."""
        unsigned, self._unsigned = self._unsigned, []
        loop = asyncio.get_running_loop()
        assert self._sign is not None
        for start in range(0, len(unsigned), _SIGN_CHUNK):
            chunk = unsigned[start : start + _SIGN_CHUNK]
            work = loop.run_in_executor(self._executor, _sign_all, self._sign, [doc for doc, _ in chunk])
            work.add_done_callback(partial(_settle_signed, [future for _, future in chunk]))

    def _observe(self, observation: Observation) -> None:
        request_id = getattr(observation, "request_id", None)
        with structlog.contextvars.bound_contextvars(
            request_id=None if request_id is None else str(request_id)
        ):
            for observer in self._observers:
                try:
                    observer(observation)
                except Exception:
                    log.exception("observer-failed", observer=type(observer).__name__)

    # -- the I/O loops --------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            commits = [self._carried or await self._commits.get()]
            self._carried = None
            while len(commits) < self._max_batch and not self._commits.empty():
                following = self._commits.get_nowait()
                # With a group, a flag request's commit goes alone: it waits for the other instances,
                # and the requests decided before it must not (they are what the others wait for).
                if self._member is not None and (following[0].flag_events or commits[0][0].flag_events):
                    self._carried = following
                    break
                commits.append(following)
            plain = [commit for commit, _ in commits]
            batches = tuple(commit.batch for commit in plain)
            started = time.perf_counter()
            if self._budget is not None:
                self._budget.commit_started(batches, started)
            try:
                # E21 answers leave before they are settled: a crash repeats them rather than losing them.
                await self._handed_over(
                    max((queued for commit, queued in commits if commit.settled), default=0)
                )
                joined = _joined(
                    plain,
                    grouped=self._member is not None,
                    grace_seconds=self.router.settings.overdue_grace_seconds,
                    owner="" if self._member is None else self._member.instance,
                )
                result = await self._retrying(partial(self._store.commit, joined), "commit")
                await self._settle_commit(plain, result)
            except Exception as exc:  # noqa: BLE001 - the router answers every request of the batch
                log.critical("store-commit-failed", error=f"{type(exc).__name__}: {exc}", batch=len(batches))
                self._feed(CommitFailed(batches, f"{type(exc).__name__}: {exc}"))
            else:
                if self._budget is not None:
                    self._budget.commit_done(batches, time.perf_counter())
                if self._metrics is not None:
                    self._metrics.observe_commit(time.perf_counter() - started, len(batches))
                taken = _taken(plain, result) if self._member is not None else frozenset()
                self._feed(
                    Committed(
                        batches,
                        taken,
                        result.claimed,
                        result.answers,
                        result.stored_forwards,
                        result.answered_here,
                    )
                )
            finally:
                for _ in commits:
                    self._commits.task_done()

    async def _settle_commit(self, commits: Sequence[Commit], result: CommitResult) -> None:
        """With a group: a flag answer waits for every live instance; a lapsed lease fails the batch
        (what it decided may be out of date: nothing of it is published)."""
        member = self._member
        if member is None:
            return
        if any(commit.flag_events for commit in commits):
            await member.flag_applied(result.flag_epoch)
        if not member.confirmed:
            raise LeaseLostError(f"cluster lease of {member.instance} not confirmed after the commit")

    async def _retrying(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        """`operation`, tried again with capped backoff while the store is busy or locked, for up to
        the retry budget; the message that needs it stays unacknowledged meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry_seconds
        delay = _RETRY_FIRST_SECONDS
        attempt = 1
        while True:
            try:
                return await operation()
            except Exception as exc:
                if not retryable(exc) or loop.time() + delay > deadline:
                    raise
                log.warning("store-busy", operation=what, attempt=attempt, retry_in=delay, error=str(exc))
            await asyncio.sleep(delay)
            delay = min(2 * delay, _RETRY_CAP_SECONDS)
            attempt += 1

    async def _publish_loop(self) -> None:
        while True:
            item = await self._outbox.get()
            try:
                if isinstance(item, Acknowledge):
                    self._acknowledge(item.ticket)
                elif isinstance(item, _Signing):
                    await self._publish(item.topic, await item.payload)
                else:
                    await self._publish(item.topic, item.payload)
            except Exception as exc:
                log.exception("publish-failed", topic=getattr(item, "topic", None))
                self._publish_error = exc
            finally:
                if isinstance(item, Publish | _Signing):
                    self._handed_publishes += 1
                    self._handed.set()
                self._outbox.task_done()

    async def _handed_over(self, publishes: int) -> None:
        """Until the first `publishes` publishes were handed to the transport (or failed)."""
        while self._handed_publishes < publishes:
            self._handed.clear()
            await self._handed.wait()

    def _acknowledge(self, ticket: int) -> None:
        # A publish that failed since the last acknowledgement belongs to this message.
        error, self._publish_error = self._publish_error, None
        done = self._waiting.get(ticket)
        if done is None or done.done():  # its handler was cancelled by a stopping transport
            return
        if self._budget is not None:
            self._budget.acknowledged(ticket, time.perf_counter())
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    async def _read_flag_subject(self, read: ReadFlagSubject) -> None:
        try:
            device = await self._retrying(partial(self._store.get_device, read.device_id), "read")
            hub = None
            if device is not None and device.comms_hub_id is not None:
                hub = await self._retrying(partial(self._store.get_device, device.comms_hub_id), "read")
        except Exception as exc:  # noqa: BLE001 - the router answers the flag request
            log.critical("store-read-failed", error=f"{type(exc).__name__}: {exc}", device=read.device_id)
            self._feed(FlagSubjectRead(read.ticket, None, None, error=f"{type(exc).__name__}: {exc}"))
        else:
            self._feed(FlagSubjectRead(read.ticket, device, hub))

    async def _read_overdue(self, read: ReadOverdue) -> None:
        try:
            forwards = await self._store.overdue_pending(read.grace_seconds, read.limit)
        except Exception as exc:  # noqa: BLE001 - the next sweep tries again
            log.warning("store-read-failed", error=f"{type(exc).__name__}: {exc}", read="overdue")
            forwards = []
        self._feed(OverdueRead(tuple(forwards)))

    async def _deadletter_now(self, message: Message, detail: str) -> None:
        received = Received(-1, message.topic, message.payload, message.redelivered)
        try:
            await self._publish(
                self.router.topics.deadletter, deadletter_payload(received, "internal-error", detail)
            )
        except Exception:
            log.exception("deadletter-failed", topic=message.topic)


def _taken(commits: Sequence[Commit], result: CommitResult) -> frozenset[int]:
    """The commits whose RequestID the store had recorded already (another instance acts on it)."""
    return frozenset(
        commit.batch
        for commit in commits
        if any(not result.first(originator, counter) for originator, counter in commit.counters.items())
    )


class LeaseLostError(RuntimeError):
    """This instance's cluster lease lapsed: it may not publish what it decided."""


@dataclass(frozen=True, slots=True)
class _Signing:
    """A publish to a user whose signed payload the executor is making."""

    topic: str
    payload: asyncio.Future[bytes]


def _sign_all(sign: Callable[[bytes], bytes], documents: list[bytes]) -> list[bytes]:
    """In the executor (a thread or a worker process): one chunk of documents."""
    return [sign(document) for document in documents]


def _settle_signed(futures: list[asyncio.Future[bytes]], work: asyncio.Future[list[bytes]]) -> None:
    """Each document's future from its chunk's: a failed chunk fails each of its publishes (their
    messages stay unacknowledged and are redelivered)."""
    error = None if work.cancelled() else work.exception()
    for number, future in enumerate(futures):
        if future.done():
            continue
        if work.cancelled():
            future.cancel()
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(work.result()[number])


def _joined(commits: Sequence[Commit], *, grouped: bool, grace_seconds: float, owner: str) -> CommitBatch:
    """One transaction for consecutive commits: flag events in order, the highest counter per originator,
    and, in a group, every RequestID (a commit's counters are its request's originator and counter;
    one instance alone needs no record of them: its own memory decides)."""
    counters: dict[Eui, int] = {}
    for commit in commits:
        for originator, counter in commit.counters.items():
            counters[originator] = max(counter, counters.get(originator, -1))
    request_ids = tuple(item for commit in commits for item in commit.counters.items()) if grouped else ()
    return CommitBatch(
        flag_events=tuple(event for commit in commits for event in commit.flag_events),
        counters=counters,
        request_ids=request_ids,
        forwarded=tuple(entry for commit in commits for entry in commit.forwarded),
        answered=tuple(rid for commit in commits for rid in commit.answered),
        timed_out=tuple(rid for commit in commits for rid in commit.timed_out),
        settled=tuple(rid for commit in commits for rid in commit.settled),
        withdrawn=tuple(rid for commit in commits for rid in commit.withdrawn),
        timeout_grace_seconds=grace_seconds,
        owner=owner,
    )
