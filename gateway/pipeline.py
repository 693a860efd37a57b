"""The routing pipeline: one message from its topic to its answer.

`Pipeline.handle` is the transport handler. It queues the message for the decider, one task that
takes messages strictly in arrival order and decides each (parse, authenticate, check the RequestID
counter, decide) without awaiting, except for an MP169 flag request, which must read the device and
its comms hub from the store, and whose effect must be committed before the next message is decided:
the decider waits for both, so every message is decided against the flag as it was when the message
arrived (flag requests are rare; the read and the commit take about a millisecond). Its effects
(flag changes and RequestID counters to make durable, then the messages to publish) go to the
Committer, which commits a batch of effects in one transaction and then hands their publishes to the
broker in decision order. The handler returns, and so the transport acknowledges the inbound
message, only after that: a crash never loses an acknowledged request.

MP169 ordering: a flag change is in the view and committed before the next message is decided, and
its answer is published after the publishes of every request decided before it. So no consumption
request that arrived after a flag-set is forwarded, and none reaches a device after the supplier holds
the acknowledgement. (A set marks the view at decision and a clear after its commit, so even an
answer lost to a failed commit never lets consumption through.)
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING

import structlog

from gateway.duis import ParseError, parse_device_message, parse_request
from gateway.facts import alert_recipients, inventory_entries, request_facts
from gateway.flags import evaluate_flag_request
from gateway.responses import inventory_response_xml, response_xml
from gateway.store import CommitBatch, FlagEvent, FlagStore
from gateway.topics import Topics
from rules.codes import ResponseCode
from rules.decide import Action, Decision, Delivery, RequestFacts, decide, decide_device_message
from rules.domain import (
    FLAG_SRVS,
    DeviceMessage,
    DeviceMessageKind,
    Eui,
    RequestId,
    Role,
    ServiceRequest,
    parse_eui,
    utc_now,
)

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from gateway.outcomes.recorder import OutcomeRecorder
    from gateway.transport import Message
    from gateway.view import RoutingView
    from rules.table import RulesTable

log = structlog.get_logger("mp169.pipeline")

Publish = Callable[[str, bytes], Awaitable[None]]
Clock = Callable[[], datetime]

# Late answers to requests already answered with a timeout are dropped; remember this many.
_TIMED_OUT_MEMORY = 100_000


class Admission(Enum):
    """What the RequestID check makes of an inbound Service Request."""

    NEW = "new"
    AGAIN = "again"  # redelivered after a restart: decided before, its answer may be lost
    ANSWERED = "answered"  # redelivered within this process: already answered
    DUPLICATE = "duplicate"  # counter not above the originator's highest: E11
    SPOOFED = "spoofed"  # originator is not the topic's user: E1


@dataclass(slots=True)
class Effect:
    """What handling one message must make durable and publish, in this order."""

    publishes: list[tuple[str, bytes]] = field(default_factory=list)
    flag_events: list[FlagEvent] = field(default_factory=list)
    counters: dict[Eui, int] = field(default_factory=dict)
    after_commit: list[Callable[[], None]] = field(default_factory=list)


class Committer:
    """Commits effects in batches (one transaction each), then publishes them in submission order."""

    def __init__(self, store: FlagStore, publish: Publish, *, max_batch: int = 512) -> None:
        self._store = store
        self._publish = publish
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[Effect, asyncio.Future[None]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mp169-committer")

    async def stop(self) -> None:
        """Finish everything already submitted, then stop."""
        await self._queue.join()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def submit(self, effect: Effect) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.enqueue(effect, future)
        await future

    def enqueue(self, effect: Effect, done: asyncio.Future[None]) -> None:
        """Commit and publish `effect` after everything enqueued before it; then resolve `done`."""
        self._queue.put_nowait((effect, done))

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._apply(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _apply(self, batch: list[tuple[Effect, asyncio.Future[None]]]) -> None:
        try:
            await self._commit([effect for effect, _ in batch])
        except Exception as exc:  # noqa: BLE001 - a failed commit fails its batch, never the daemon
            log.critical("commit-failed", error=repr(exc), batch=len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for effect, future in batch:
            try:
                for callback in effect.after_commit:
                    callback()
                for topic, payload in effect.publishes:
                    await self._publish(topic, payload)
            except Exception as exc:  # noqa: BLE001 - reported to the handler that submitted it
                if not future.done():
                    future.set_exception(exc)
                continue
            if not future.done():
                future.set_result(None)

    async def _commit(self, effects: list[Effect]) -> None:
        events = [event for effect in effects for event in effect.flag_events]
        counters: dict[Eui, int] = {}
        for effect in effects:
            for originator, counter in effect.counters.items():
                counters[originator] = max(counter, counters.get(originator, -1))
        if events or counters:
            await self._store.commit(CommitBatch(flag_events=tuple(events), counters=counters))


@dataclass(frozen=True, slots=True)
class PendingRequest:
    srv: str
    service_reference: str
    forwarded_at: float


class Pipeline:
    """Routes DUIS Service Requests to devices and device responses and alerts back to users."""

    def __init__(  # noqa: PLR0913 - the pipeline joins exactly these collaborators
        self,
        *,
        table: RulesTable,
        view: RoutingView,
        store: FlagStore,
        publish: Publish,
        recorder: OutcomeRecorder | None,
        metrics: Metrics,
        dcc_eui: Eui,
        topics: Topics | None = None,
        max_message_bytes: int = 1024 * 1024,
        target_response_seconds: float = 30.0,
        clock: Clock = utc_now,
        counters: Mapping[Eui, int] | None = None,
    ) -> None:
        self.table = table
        self.view = view
        self._store = store
        self._recorder = recorder
        self._metrics = metrics
        self._dcc_eui = dcc_eui
        self.topics = topics or Topics()
        self._max_bytes = max_message_bytes
        self._target_response_seconds = target_response_seconds
        self._clock = clock
        self._committer = Committer(store, publish)
        # Highest RequestID counter accepted per originator (durable through the Committer).
        self._counters: dict[Eui, int] = dict(counters or {})
        # The counters as this process found them: a redelivered request at or below them was handled
        # by an earlier process, which may have died between its commit and its publishes.
        self._counters_at_start: dict[Eui, int] = dict(self._counters)
        self._pending: dict[RequestId, PendingRequest] = {}
        self._timed_out: OrderedDict[RequestId, None] = OrderedDict()
        self._inbox: asyncio.Queue[tuple[Message, asyncio.Future[None]]] = asyncio.Queue()
        self._decider: asyncio.Task[None] | None = None
        self._inbound_prefix = f"{self.topics.inbound}/"
        self._device_prefix = f"{self.topics.devices}/"

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._committer.start()
        self._decider = asyncio.create_task(self._decide_in_order(), name="mp169-decider")

    async def stop(self) -> None:
        """Decide, commit and publish everything already handed to `handle`, then stop."""
        await self._inbox.join()
        if self._decider is not None:
            self._decider.cancel()
            await asyncio.gather(self._decider, return_exceptions=True)
        await self._committer.stop()

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- the transport handler ----------------------------------------------------------------

    async def handle(self, message: Message) -> None:
        """Returns once the message's effects are durable and published (then the transport acks)."""
        started = time.perf_counter()
        self._metrics.inflight.inc()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait((message, done))
        try:
            await done
        except Exception as exc:
            log.exception("handling-failed", topic=message.topic)
            await self._deadletter_now(message, "internal-error", repr(exc))
        finally:
            self._metrics.inflight.dec()
            self._metrics.latency.observe(time.perf_counter() - started)

    async def _decide_in_order(self) -> None:
        while True:
            message, done = await self._inbox.get()
            try:
                routed = self._route(message)
                if isinstance(routed, Effect):
                    self._committer.enqueue(routed, done)
                else:
                    self._committer.enqueue(await self._handle_flag_request(routed), done)
                    # The next message is decided against the committed flag, set or clear.
                    await asyncio.wait([done])
            except Exception as exc:  # noqa: BLE001 - reported to the message's handler
                if not done.done():  # its handler may have been cancelled by a stopping transport
                    done.set_exception(exc)
            finally:
                self._inbox.task_done()

    def _route(self, message: Message) -> Effect | ServiceRequest:
        """The synchronous part: the effect, or an admitted flag request (handling it reads the store)."""
        topic = message.topic
        if topic.startswith(self._inbound_prefix):
            return self._handle_request(topic[len(self._inbound_prefix) :], message)
        if topic.startswith(self._device_prefix) and topic.endswith("/up"):
            return self._handle_device_message(topic[len(self._device_prefix) : -len("/up")], message)
        return self._deadletter(message, "unexpected-topic", f"no route for topic {topic!r}")

    # -- Service Requests -----------------------------------------------------------------------

    def _handle_request(self, topic_user: str, message: Message) -> Effect | ServiceRequest:
        parsed = self._parse_request(topic_user, message)
        if isinstance(parsed, Effect):
            return parsed
        user, request = parsed
        admission = self._admit(user, request, message.redelivered)
        if admission is Admission.SPOOFED:
            # The answer goes to the topic's owner, never to the claimed originator.
            return self._answer_only(
                user,
                request,
                ResponseCode.USER_NOT_AUTHORISED,
                "originator-mismatch",
                f"RequestID originator {request.request_id.originator} is not the user of topic "
                f"{message.topic}",
            )
        if admission is Admission.DUPLICATE:
            return self._answer_only(
                user,
                request,
                ResponseCode.DUPLICATE_REQUEST_ID,
                "duplicate-request-id",
                f"RequestID counter {request.request_id.counter} is not above the highest accepted "
                f"from {request.request_id.originator}",
            )
        if admission is Admission.ANSWERED:
            return Effect()
        facts = request_facts(request, self.view, self._dcc_eui)
        decision = decide(request, facts, self.table)
        if decision.action is Action.LOCAL and request.srv in FLAG_SRVS:
            return request
        return self._act(request, decision, facts)

    def _parse_request(self, topic_user: str, message: Message) -> tuple[Eui, ServiceRequest] | Effect:
        try:
            user = parse_eui(topic_user)
        except ValueError:
            return self._deadletter(message, "bad-topic", f"topic user is not an EUI-64: {topic_user!r}")
        parsed = parse_request(message.payload, max_bytes=self._max_bytes)
        if isinstance(parsed, ParseError):
            return self._reject_unparseable(user, message, parsed)
        return user, parsed

    def _admit(self, user: Eui, request: ServiceRequest, redelivered: bool) -> Admission:
        """Check the RequestID against the topic's user and its counter; advance the counter."""
        request_id = request.request_id
        if request_id.originator != user:
            return Admission.SPOOFED
        if request_id.counter > self._counters.get(user, -1):
            self._counters[user] = request_id.counter
            return Admission.NEW
        self._metrics.duplicates.labels(redelivered=str(redelivered).lower()).inc()
        if not redelivered:
            return Admission.DUPLICATE
        if request_id.counter <= self._counters_at_start.get(user, -1):
            # At-least-once: decide and publish again (devices and users discard repeats by RequestID).
            log.info("redelivered-after-restart", request_id=str(request_id))
            return Admission.AGAIN
        # This process decided it; its answer is published or queued behind the commit.
        log.info("redelivered-duplicate", request_id=str(request_id))
        return Admission.ANSWERED

    def _answer(
        self, user: Eui, request: ServiceRequest, code: ResponseCode, at: datetime, reason: str | None = None
    ) -> tuple[str, bytes]:
        """A DUIS response to `request` on `user`'s topic."""
        return (
            self.topics.out(user),
            response_xml(
                request_id=request.request_id,
                code=code,
                service_reference=request.service_reference,
                srv=request.srv,
                at=at,
                reason=reason,
            ),
        )

    def _act(self, request: ServiceRequest, decision: Decision, facts: RequestFacts) -> Effect:
        request_id = request.request_id
        originator = request_id.originator
        effect = Effect(counters={originator: request_id.counter})
        now = self._clock()
        if decision.action is Action.FORWARD:
            effect.publishes.append((self.topics.command(request_id.target), request.raw))
            effect.publishes.append(self._answer(originator, request, ResponseCode.ACKNOWLEDGED, now))
            self._pending[request_id] = PendingRequest(
                request.srv, request.service_reference, time.monotonic()
            )
            log.debug("forwarded", request_id=str(request_id), srv=request.srv, device=request_id.target)
        elif decision.action is Action.LOCAL:
            effect.publishes.append((self.topics.out(originator), self._read_inventory(request, now)))
        else:
            reason = f"{decision.reason}: {decision.detail}"
            effect.publishes.append(self._answer(originator, request, decision.response_code, now, reason))
            log.info(
                "refused" if decision.action is Action.REFUSE else "rejected",
                request_id=str(request_id),
                srv=request.srv,
                device=",".join(request.concerned_devices),
                decision=decision.action.value,
                reason=decision.reason,
                response_code=decision.response_code.value,
            )
        self._count_and_record(request, decision, facts, now)
        return effect

    def _read_inventory(self, request: ServiceRequest, now: datetime) -> bytes:
        entries = inventory_entries(request, self.view)
        return inventory_response_xml(request_id=request.request_id, at=now, devices=entries)

    def _count_and_record(
        self, request: ServiceRequest, decision: Decision, facts: RequestFacts, now: datetime
    ) -> None:
        """Count the decision and record it, from the facts it was decided on."""
        category = decision.rule.category.value if decision.rule is not None else "unknown"
        self._metrics.count_request(category, decision.action.value)
        if self._recorder is None:
            return
        role = self._accepted_role(facts.requester_roles, decision)
        self._recorder.record_decision(
            request_id=str(request.request_id),
            originator=request.request_id.originator,
            role=role,
            target=request.request_id.target,
            srv=request.srv,
            category=None if decision.rule is None else decision.rule.category.value,
            command_variant=request.command_variant,
            received_at=now,
            decision=decision.action.value,
            response_code=decision.response_code.value,
            reason=decision.reason,
            flagged=any(device.flagged for device in facts.devices.values()),
        )

    @staticmethod
    def _accepted_role(roles: frozenset[Role] | None, decision: Decision) -> str | None:
        if decision.rule is None or roles is None:
            return None
        eligible = sorted(role.value for role in roles & decision.rule.eligible_roles)
        return eligible[0] if eligible else None

    def _answer_only(
        self, user: Eui, request: ServiceRequest, code: ResponseCode, reason: str, detail: str
    ) -> Effect:
        """Reject before any rule applies (spoofed originator, duplicate RequestID)."""
        request_id = request.request_id
        now = self._clock()
        log.info(
            "rejected",
            request_id=str(request_id),
            srv=request.srv,
            device=request_id.target,
            decision=Action.REJECT.value,
            reason=reason,
            response_code=code.value,
        )
        self._metrics.count_request("unknown", Action.REJECT.value)
        # A spoofed request is not the claimed originator's: it stays out of that user's outcomes.
        if self._recorder is not None and request_id.originator == user:
            self._recorder.record_decision(
                request_id=str(request_id),
                originator=user,
                role=None,
                target=request_id.target,
                srv=request.srv,
                category=None,
                command_variant=request.command_variant,
                received_at=now,
                decision=Action.REJECT.value,
                response_code=code.value,
                reason=reason,
                flagged=False,
            )
        return Effect(publishes=[self._answer(user, request, code, now, f"{reason}: {detail}")])

    def _reject_unparseable(self, user: Eui, message: Message, error: ParseError) -> Effect:
        effect = self._deadletter(message, error.reason, error.detail)
        # The sender of garbage on its own topic still gets a clear DUIS answer.
        request_id = error.request_id if error.request_id and error.request_id.originator == user else None
        effect.publishes.append(
            (
                self.topics.out(user),
                response_xml(
                    request_id=request_id,
                    code=ResponseCode.INVALID_REQUEST,
                    service_reference=None,
                    srv=None,
                    at=self._clock(),
                    reason=f"{error.reason}: {error.detail}",
                ),
            )
        )
        self._metrics.count_request("unknown", Action.REJECT.value)
        return effect

    # -- MP169 flag requests ----------------------------------------------------------------------

    async def _handle_flag_request(self, request: ServiceRequest) -> Effect:
        instruction = request.flag
        assert instruction is not None
        request_id = request.request_id
        device = await self._store.get_device(instruction.device_id)
        hub = None
        if device is not None and device.comms_hub_id is not None:
            hub = await self._store.get_device(device.comms_hub_id)
        flagged = self.view.is_flagged(instruction.device_id)
        verdict = evaluate_flag_request(instruction, request_id.originator, device, hub, flagged)
        now = self._clock()
        outcome = ("accepted" if verdict.changed else "unchanged") if verdict.accepted else verdict.code.value
        event = FlagEvent(
            device_id=instruction.device_id,
            set=instruction.set,
            requester=request_id.originator,
            request_id=str(request_id),
            declaration=instruction.all_reasonable_steps_taken if instruction.set else None,
            consumer_reference=instruction.consumer_reference,
            outcome=outcome,
            at=now,
        )
        effect = Effect(flag_events=[event], counters={request_id.originator: request_id.counter})
        if verdict.accepted and verdict.changed:
            if instruction.set:
                # Effective for routing from now on; acknowledged only after the commit.
                self.view.set_flag(instruction.device_id)
            else:
                effect.after_commit.append(lambda: self.view.clear_flag(instruction.device_id))
        action = "set" if instruction.set else "clear"
        self._metrics.flag_requests.labels(action=action, outcome=outcome).inc()
        log.info(
            "flag-request",
            request_id=str(request_id),
            srv=request.srv,
            device=instruction.device_id,
            decision="accepted" if verdict.accepted else "refused",
            reason=verdict.reason,
            response_code=verdict.code.value,
            changed=verdict.changed,
        )
        reason = f"{verdict.reason}: {verdict.detail}"
        effect.publishes.append(self._answer(request_id.originator, request, verdict.code, now, reason))
        if self._recorder is not None:
            self._recorder.record_decision(
                request_id=str(request_id),
                originator=request_id.originator,
                role=None,
                target=request_id.target,
                srv=request.srv,
                category="consumer-choice-flag",
                command_variant=request.command_variant,
                received_at=now,
                decision=Action.LOCAL.value,
                response_code=verdict.code.value,
                reason=verdict.reason,
                flagged=flagged,
            )
        self._metrics.count_request("consumer-choice-flag", Action.LOCAL.value)
        return effect

    # -- device responses and alerts ---------------------------------------------------------------

    def _handle_device_message(self, topic_device: str, message: Message) -> Effect:
        try:
            device = parse_eui(topic_device)
        except ValueError:
            return self._deadletter(message, "bad-topic", f"topic device is not an EUI-64: {topic_device!r}")
        parsed = parse_device_message(message.payload, max_bytes=self._max_bytes)
        if isinstance(parsed, ParseError):
            return self._deadletter(message, parsed.reason, parsed.detail)
        if parsed.kind is DeviceMessageKind.RESPONSE:
            return self._device_response(device, parsed, message)
        return self._alert(device, parsed, message)

    def _device_response(self, device: Eui, response: DeviceMessage, message: Message) -> Effect:
        request_id = response.request_id
        if request_id is None or request_id.target != device:
            return self._deadletter(
                message,
                "response-mismatch",
                f"response on {message.topic} does not answer a request to {device}",
            )
        key = str(request_id)
        pending = self._pending.pop(request_id, None)
        if pending is None and request_id in self._timed_out:
            self._metrics.device_responses.labels(delivery="late").inc()
            log.info("late-response-dropped", request_id=key, device=device)
            return Effect()
        facts = self.view.device_facts(device)
        verdict = decide_device_message(response, facts, self.table)
        now = self._clock()
        self._metrics.device_responses.labels(delivery=verdict.delivery.value).inc()
        if verdict.delivery is Delivery.REJECT:
            return self._deadletter(message, verdict.reason, verdict.detail)
        outcome = "success" if response.response_code == ResponseCode.SUCCESS else "failure"
        if self._recorder is not None:
            self._recorder.record_device_outcome(key, outcome, response.response_code, now)
        if verdict.delivery is Delivery.WITHHOLD:
            # The request still gets its one final answer: the refusal, not the data.
            log.info(
                "response-withheld",
                request_id=key,
                srv=response.srv,
                device=device,
                decision=verdict.delivery.value,
                reason=verdict.reason,
            )
            payload = response_xml(
                request_id=request_id,
                code=ResponseCode.CONSUMER_CHOICE,
                service_reference=pending.service_reference if pending else None,
                srv=response.srv,
                at=now,
                reason=f"{verdict.reason}: {verdict.detail}",
            )
            return Effect(publishes=[(self.topics.out(request_id.originator), payload)])
        return Effect(publishes=[(self.topics.out(request_id.originator), message.payload)])

    def _alert(self, device: Eui, alert: DeviceMessage, message: Message) -> Effect:
        facts = self.view.device_facts(device)
        if facts is None:
            return self._deadletter(message, "unknown-device", f"alert from {device}, not in the inventory")
        verdict = decide_device_message(alert, facts, self.table)
        category = verdict.category.value if verdict.category is not None else "unknown"
        self._metrics.alerts.labels(category=category, delivery=verdict.delivery.value).inc()
        if verdict.delivery is Delivery.REJECT:
            return self._deadletter(message, verdict.reason, verdict.detail)
        if verdict.delivery is Delivery.WITHHOLD:
            log.info(
                "alert-withheld",
                device=device,
                alert_code=alert.alert_code,
                decision=verdict.delivery.value,
                reason=verdict.reason,
            )
            return Effect()
        recipients = alert_recipients(device, verdict, self.view)
        if not recipients:
            return self._deadletter(message, "no-recipient", f"no responsible supplier for {device}")
        return Effect(publishes=[(self.topics.out(user), message.payload) for user in recipients])

    # -- timeouts and dead letters -------------------------------------------------------------

    async def expire_pending(self) -> int:
        """Answer forwarded requests whose device has not answered in time (E21); returns how many."""
        deadline = time.monotonic() - self._target_response_seconds
        # Insertion order is forwarding order: the expired requests are a prefix.
        expired = list(
            itertools.takewhile(lambda item: item[1].forwarded_at <= deadline, self._pending.items())
        )
        if not expired:
            return 0
        effect = Effect()
        now = self._clock()
        for request_id, pending in expired:
            del self._pending[request_id]
            self._timed_out[request_id] = None
            if len(self._timed_out) > _TIMED_OUT_MEMORY:
                self._timed_out.popitem(last=False)
            effect.publishes.append(
                (
                    self.topics.out(request_id.originator),
                    response_xml(
                        request_id=request_id,
                        code=ResponseCode.DEVICE_TIMEOUT,
                        service_reference=pending.service_reference,
                        srv=pending.srv,
                        at=now,
                        reason=f"device-timeout: no answer from {request_id.target} within "
                        f"{self._target_response_seconds:g} s",
                    ),
                )
            )
            if self._recorder is not None:
                self._recorder.record_device_outcome(
                    str(request_id), "timeout", ResponseCode.DEVICE_TIMEOUT.value, now
                )
        self._metrics.timeouts.inc(len(expired))
        await self._committer.submit(effect)
        return len(expired)

    def _deadletter(self, message: Message, reason: str, detail: str) -> Effect:
        self._metrics.deadletters.labels(reason=reason).inc()
        log.info("deadletter", topic=message.topic, reason=reason, detail=detail)
        return Effect(publishes=[(self.topics.deadletter, _deadletter_payload(message, reason, detail))])

    async def _deadletter_now(self, message: Message, reason: str, detail: str) -> None:
        try:
            await self._committer.submit(self._deadletter(message, reason, detail))
        except Exception:
            log.exception("deadletter-failed", topic=message.topic)


def _deadletter_payload(message: Message, reason: str, detail: str) -> bytes:
    """A JSON envelope: the reason, the original topic and the original payload (base64)."""
    return json.dumps(
        {
            "reason": reason,
            "detail": detail,
            "topic": message.topic,
            "payload_base64": base64.b64encode(message.payload).decode("ascii"),
        }
    ).encode()
