"""The router: every routing decision of the gateway, as a state machine over plain data (sans-IO).

`Router.handle(event, now)` takes one event and the time, and returns the effects to apply, in
order. It does no I/O, reads no clock, logs nothing and starts no task: the shell
(gateway/shell.py) feeds it the events (a message arrived, a store read or a commit finished,
time passed) and applies what it returns (publish, make durable, acknowledge), and the observers
(gateway/observers.py) turn its `Observation`s into metrics, log lines and outcome records.

Ordering, which the MP169 guarantee rests on:
- Every inbound message becomes a *step*, decided in arrival order. A step's publishes and its
  acknowledgement are released only when the step and every step before it are durable, so answers
  and forwards leave in decision order and a message is acknowledged only once its effects are
  durable and handed to the broker.
- An MP169 flag request reads its device and comms hub from the store and is committed before any
  later message is decided: messages that arrive meanwhile are held, undecided. So every message is
  decided against the flag as it was when the message arrived; no consumption request that arrived
  after a flag-set is forwarded, and the supplier's I0 leaves after every earlier forward.

State changes only when the commit that makes them durable succeeds: the flag in the view, the
pending requests (a forward waits for its device's answer only once it was really sent), and the
committed RequestID counters. The live counters run ahead (a repeat of a request still being
committed is already a duplicate); a failed commit rolls its counters back, so the user's retry is
decided as new, and the request is answered STORE_FAILED instead of what it would have got.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

from gateway.duis import ParseError, parse_device_message, parse_request, parse_request_tree
from gateway.facts import alert_recipients, inventory_entries, request_facts
from gateway.flags import evaluate_flag_request
from gateway.redact import without_consumption_payload
from gateway.responses import (
    answerable,
    flag_status_payload,
    inventory_response_xml,
    response_xml,
    unreadable_request_answer,
)
from gateway.topics import Topics
from rules.codes import ResponseCode
from rules.decide import Action, Decision, Delivery, decide, decide_device_message
from rules.domain import (
    ANSWER_RESPONSE,
    ANSWER_TIMEOUT,
    FLAG_SRVS,
    DeviceMessageKind,
    FlagEvent,
    ForwardedRequest,
    parse_eui,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from gateway.signing import Verification
    from gateway.view import RoutingView
    from rules.decide import MessageDecision, RequestFacts
    from rules.domain import Claim, DeviceMessage, DeviceRecord, Eui, RequestId, Role, ServiceRequest
    from rules.table import RulesTable

# Requests this process decided, remembered to tell a redelivery of one of them (ANSWERED) from a
# redelivery of a request another process decided (AGAIN); beyond this many, the oldest are AGAIN.
_DECIDED_MEMORY = 65_536
# A dead letter always fits the broker's packet limit (deploy/mosquitto.conf allows 1 MiB): the
# reason is clipped and at most this much of the original payload travels with its digest.
DEADLETTER_PAYLOAD_BYTES = 64 * 1024
_DEADLETTER_TEXT_CHARS = 1024


# -- events: what the shell tells the router ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instant:
    """The time of an event: wall clock for DUIS timestamps, monotonic seconds for timeouts."""

    wall: datetime
    monotonic: float


@dataclass(frozen=True, slots=True)
class Received:
    """A message arrived from the broker; `ticket` names it in the `Acknowledge` that releases it."""

    ticket: int
    topic: str
    payload: bytes
    redelivered: bool = False
    verification: Verification | None = None
    """The signature check of an inbound Service Request (the shell runs it); None: not checked."""


@dataclass(frozen=True, slots=True)
class FlagSubjectRead:
    """The store read asked for by `ReadFlagSubject` finished (error: it failed)."""

    ticket: int
    device: DeviceRecord | None
    comms_hub: DeviceRecord | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Committed:
    """These `Commit`s are durable (one transaction or several, in the order they were emitted)."""

    batches: tuple[int, ...]
    taken: frozenset[int] = frozenset()
    """Those whose RequestID the store had recorded already, from another instance sharing it
    (`CommitResult.first` was false): their new requests are refused as duplicates, not acted on."""
    claimed: Mapping[RequestId, Claim] = field(default_factory=dict)
    """The forwards whose final answer these commits claimed (`Commit.answered` / `timed_out`)."""
    answers: Mapping[RequestId, str] = field(default_factory=dict)
    """Of the forwards these commits tried to claim and did not: the final answer already given
    (ANSWER_RESPONSE or ANSWER_TIMEOUT); missing: the store holds no such forward."""
    stored_forwards: frozenset[RequestId] = frozenset()
    """The forwards of these commits stored before (`CommitResult.stored_forwards`): their command may
    have left already."""
    answered_here: frozenset[RequestId] = frozenset()
    """Of `answers`: those this instance claimed before (`CommitResult.answered_here`)."""


@dataclass(frozen=True, slots=True)
class CommitFailed:
    """These `Commit`s were not made durable."""

    batches: tuple[int, ...]
    error: str


@dataclass(frozen=True, slots=True)
class TimePassed:
    """Time went by: forwarded requests past the target response time are answered E21."""


@dataclass(frozen=True, slots=True)
class OverdueRead:
    """The store read asked for by `ReadOverdue` finished (empty also when it failed)."""

    forwards: tuple[ForwardedRequest, ...]


Event = Received | FlagSubjectRead | Committed | CommitFailed | TimePassed | OverdueRead


# -- effects: what the router asks the shell to do -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Commit:
    """Make these durable in one transaction, then report `Committed` or `CommitFailed` for `batch`.
    Commits are applied in the order they are emitted; the shell may join consecutive ones."""

    batch: int
    flag_events: tuple[FlagEvent, ...]
    counters: Mapping[Eui, int]
    forwarded: tuple[ForwardedRequest, ...] = ()
    """Forwards now waiting for their device's answer."""
    answered: tuple[RequestId, ...] = ()
    """Forwards whose device answered: claimed for that answer, released only if this commit claims it."""
    timed_out: tuple[RequestId, ...] = ()
    """Forwards past their deadline: claimed for E21 (also one whose E21 another instance claimed more
    than the grace ago and never settled), released only if this commit claims it."""
    settled: tuple[RequestId, ...] = ()
    """Claimed E21s that were released: the shell makes this durable only after it handed them to the
    transport, so a crash repeats an E21 (the sweep finds it unsettled) rather than losing it."""
    withdrawn: tuple[RequestId, ...] = ()
    """Forwards answered STORE_FAILED: removed with their RequestID if a failed commit stored them."""


@dataclass(frozen=True, slots=True)
class ReadOverdue:
    """Read the forwards overdue by more than `grace_seconds` (any instance's, or a previous process's),
    up to `limit`, and report `OverdueRead`."""

    grace_seconds: float
    limit: int


@dataclass(frozen=True, slots=True)
class ReadFlagSubject:
    """Read `device_id` and its comms hub from the store, then report `FlagSubjectRead`."""

    ticket: int
    device_id: Eui


@dataclass(frozen=True, slots=True)
class Acknowledge:
    """The message `ticket` is handled: its effects are durable and its publishes handed over."""

    ticket: int


# -- observations: what happened, for metrics, logs and outcome records --------------------------


class Admission(StrEnum):
    """What the RequestID check makes of an inbound Service Request."""

    NEW = "new"
    AGAIN = "again"  # redelivered after a restart: decided before, its answer may be lost
    ANSWERED = "answered"  # redelivered within this process: already answered
    DUPLICATE = "duplicate"  # counter not above the originator's highest: refused
    SPOOFED = "spoofed"  # originator is not the topic's user: refused, answered to the topic's user
    UNSIGNED = "unsigned"  # its signature is not the originator's: refused, answered to the topic's user


@dataclass(frozen=True, slots=True)
class RequestDecided:
    """A Service Request got its answer (or was forwarded), decided by the rules or the flag checks."""

    at: datetime
    request_id: RequestId
    user: Eui
    """The topic's user: the one answered (differs from the originator for a spoofed request)."""
    srv: str
    command_variant: int
    devices: tuple[Eui, ...]
    category: str
    """The SRV's rules-table category; "unknown" when it was rejected before any rule applied."""
    action: Action
    response_code: str
    reason: str
    detail: str
    role: str | None
    """The requester's role the SRV accepted, if one did."""
    flagged: bool
    """A device the request concerns had the MP169 flag when it was decided."""
    admission: Admission
    flag_outcome: str | None = None
    """8.15.x: 'accepted', 'unchanged' or the refusal code; None for every other SRV."""


@dataclass(frozen=True, slots=True)
class DuplicateDelivery:
    """A redelivery of a request this process already decided: acknowledged, nothing published."""

    at: datetime
    request_id: RequestId


@dataclass(frozen=True, slots=True)
class RequestUnreadable:
    """An inbound Service Request that could not be parsed: dead-lettered, answered where possible."""

    at: datetime
    user: Eui
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class DeviceMessageRouted:
    """A device's response or alert, and where it went."""

    at: datetime
    device: Eui
    kind: DeviceMessageKind
    request_id: RequestId | None
    srv: str | None
    alert_code: str | None
    delivery: str
    """deliver, withhold, reject; late (its request was answered E21), or duplicate (its request was
    answered already): neither of those is delivered."""
    reason: str
    category: str | None
    outcome: str | None
    """success / failure of a device response that was recorded against its request."""
    response_code: str | None
    recipients: tuple[Eui, ...]


@dataclass(frozen=True, slots=True)
class DeadLettered:
    at: datetime
    topic: str
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class RequestTimedOut:
    at: datetime
    request_id: RequestId
    srv: str
    after_seconds: float


@dataclass(frozen=True, slots=True)
class CommitRolledBack:
    """A request's commit (or its flag store read) failed: it left no trace and was answered STORE_FAILED."""

    at: datetime
    error: str
    request_id: RequestId


Observation = (
    RequestDecided
    | DuplicateDelivery
    | RequestUnreadable
    | DeviceMessageRouted
    | DeadLettered
    | RequestTimedOut
    | CommitRolledBack
)
Effect = Publish | Commit | ReadFlagSubject | ReadOverdue | Acknowledge | Observation


# -- the router --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """A forwarded request waiting for its device's answer."""

    srv: str
    service_reference: str
    forwarded_at: float


@dataclass(eq=False, slots=True)
class _Step:
    """One message's (or one timeout sweep's) effects, released in order once durable."""

    ticket: int | None
    effects: list[Effect] = field(default_factory=list)
    batch: int | None = None
    counters: dict[Eui, int] = field(default_factory=dict)
    request: ServiceRequest | None = None
    """The admitted Service Request (for the failure answer and the pending entry)."""
    admission: Admission = Admission.NEW
    reading: bool = False
    """A flag request waiting for its store read."""
    forwarded: ForwardedRequest | None = None
    """The forward this step made, durable with its commit."""
    counted: bool = False
    """The forward took a place under the forward limits (a repeat of a pending one does not)."""
    answered: RequestId | None = None
    """The forward a device response step claims; its answer is published only if the claim holds."""
    device_answer: _DeviceAnswer | None = None
    timed_out: dict[RequestId, PendingRequest] = field(default_factory=dict)
    """The forwards a timeout step claims for E21."""
    carried: _Carried | None = None
    """The settlements and withdrawals of earlier steps this step's commit carries (given back if it
    fails)."""
    flag_change: tuple[Eui, bool, datetime] | None = None
    """(device, set, when) of an accepted flag request that changes the flag; applied when durable."""

    @property
    def durable(self) -> bool:
        return self.batch is None and not self.reading


@dataclass(frozen=True, slots=True)
class _DeviceAnswer:
    """A device's response as decided, published once its claim is durable."""

    device: Eui
    response: DeviceMessage
    verdict: MessageDecision
    received: Received


@dataclass(frozen=True, slots=True)
class _Carried:
    settled: tuple[RequestId, ...]
    withdrawn: tuple[RequestId, ...]


@dataclass(frozen=True, slots=True)
class RouterSettings:
    dcc_eui: Eui
    topics: Topics = field(default_factory=Topics)
    max_message_bytes: int = 1024 * 1024
    target_response_seconds: float = 30.0
    max_forwards_per_user: int = 2_000
    """Forwards of one User awaiting their device's answer; beyond, its requests are answered
    GATEWAY_BUSY at once: one User's burst costs the others only the time to refuse it."""
    max_forwards: int = 20_000
    """Forwards awaiting their device's answer, all Users together: bounds memory and device load."""
    sweep_seconds: float = 5.0
    """How often the store is read for overdue forwards this process does not hold: a previous
    process's unsettled E21s, or (with several instances) the forwards of an instance that died."""
    overdue_grace_seconds: float = 0.0
    """How long past its deadline another holder has to answer a forward before the sweep does (with
    several instances: their lease time; one instance alone holds everything it did not restore)."""
    sweep_limit: int = 1_000


class Router:
    """Routes DUIS Service Requests to devices, and device responses and alerts back to users."""

    def __init__(
        self,
        *,
        table: RulesTable,
        view: RoutingView,
        settings: RouterSettings,
        counters: Mapping[Eui, int] | None = None,
        pending: Iterable[ForwardedRequest] = (),
    ) -> None:
        self.table = table
        self.view = view
        self.settings = settings
        self.topics = settings.topics
        # Highest RequestID counter accepted per originator: live (ahead of the store by the commits
        # in flight) and committed.
        self._counters: dict[Eui, int] = dict(counters or {})
        self._committed_counters: dict[Eui, int] = dict(self._counters)
        # Requests this process decided: a redelivery of one is ANSWERED, of any other AGAIN (decided
        # by a process that may have died between its commit and its publishes).
        self._decided: OrderedDict[RequestId, None] = OrderedDict()
        self._pending: dict[RequestId, PendingRequest] = {}
        # Forwards a previous process left waiting: timed from their stored deadline at the first event.
        self._restored: list[ForwardedRequest] = sorted(pending, key=lambda entry: entry.deadline)
        # Claimed E21s released to the transport, settled in the store by the next commit.
        self._settle: list[RequestId] = []
        # Device answers whose claim's commit failed, claimed again at the next tick. Their own message
        # is acknowledged: holding it would hold every later message, and a cluster member catching
        # up waits for those (while its commits fail until it has caught up).
        self._claims_again: list[tuple[RequestId, _DeviceAnswer]] = []
        # Claims tried again after a failed commit, with the answer each claims (a forward may have both
        # a device answer's and an E21's in flight): one this instance finds it made already (the failed
        # commit had committed) is still its own to publish.
        self._retrying: dict[RequestId, set[str]] = {}
        # Forwards whose commit failed (answered STORE_FAILED), withdrawn by the next commit in case the
        # store did make them durable (a lost connection leaves it unknown).
        self._withdraw: list[RequestId] = []
        # Forwards whose E21 claim failed to commit: claimed again at the next tick.
        self._unclaimed_timeouts: dict[RequestId, PendingRequest] = {}
        # Forwards this process is answering (a claim in flight, or an E21 not yet settled): the
        # sweep leaves them alone.
        self._answering: set[RequestId] = set()
        self._next_sweep: float | None = None
        self._sweeping = False
        # Forwards awaiting their device's answer per originator: pending, or deciding/committing.
        self._outstanding: Counter[Eui] = Counter()
        self._outstanding_total = 0
        self._steps: deque[_Step] = deque()
        self._by_batch: dict[int, _Step] = {}
        self._next_batch = 0
        # While a flag request is read and committed, later messages wait here undecided.
        self._flag_step: _Step | None = None
        self._held: deque[Received] = deque()
        self._inbound_prefix = f"{self.topics.inbound}/"
        self._device_prefix = f"{self.topics.devices}/"

    # -- introspection (tests, the shell's drain, metrics) ---------------------------------------

    @property
    def pending(self) -> Mapping[RequestId, PendingRequest]:
        return self._pending

    @property
    def unreleased(self) -> int:
        """Messages received and not yet acknowledged (held ones included)."""
        return sum(1 for step in self._steps if step.ticket is not None) + len(self._held)

    @property
    def counters(self) -> Mapping[Eui, int]:
        return self._counters

    # -- the one entry point ------------------------------------------------------------------------

    def handle(self, event: Event, now: Instant) -> list[Effect]:
        out: list[Effect] = []
        if self._restored:
            self._restore(now)
        if isinstance(event, Received):
            if self._flag_step is not None:
                self._held.append(event)
            else:
                self._receive(event, now, out)
        elif isinstance(event, FlagSubjectRead):
            self._flag_subject_read(event, now, out)
        elif isinstance(event, Committed):
            self._committed_batches(event, now)
        elif isinstance(event, CommitFailed):
            for batch in event.batches:
                self._rolled_back(self._by_batch.pop(batch), event.error, now)
        elif isinstance(event, OverdueRead):
            self._sweeping = False
            self._overdue(event.forwards, out)
        else:
            self._expire(now, out)
            self._sweep(now, out)
            self._claim_again(out)
        self._release(now, out)
        if (self._settle or self._withdraw) and isinstance(event, TimePassed | Committed):
            # No request came to carry the settlements and withdrawals: commit them on their own.
            self._commit(self._step(None), out)
            self._release(now, out)
        return out

    def _committed_batches(self, event: Committed, now: Instant) -> None:
        for batch in event.batches:
            step = self._by_batch.pop(batch)
            if batch in event.taken:
                self._taken_elsewhere(step, now)
            self._committed(step, event, now)

    def _restore(self, now: Instant) -> None:
        """Time the previous process's forwards on this process's clock, earliest deadline first."""
        target = self.settings.target_response_seconds
        for entry in self._restored:
            remaining = (entry.deadline - now.wall).total_seconds()
            self._pending[entry.request_id] = PendingRequest(
                entry.srv, entry.service_reference, now.monotonic + remaining - target
            )
            self._outstanding_forward(entry.request_id.originator)
        self._restored = []

    # -- steps ------------------------------------------------------------------------------------

    def _step(self, ticket: int | None) -> _Step:
        step = _Step(ticket)
        self._steps.append(step)
        return step

    def _commit(self, step: _Step, out: list[Effect], flag_events: tuple[FlagEvent, ...] = ()) -> None:
        """Ask for the step's state to be made durable; its publishes wait for the answer. Pending
        settlements and re-claims ride along."""
        carried = _Carried(tuple(self._settle), tuple(self._withdraw))
        if not (
            step.counters
            or flag_events
            or step.forwarded
            or step.answered
            or step.timed_out
            or carried.settled
            or carried.withdrawn
        ):
            return
        self._settle, self._withdraw = [], []
        step.carried = carried
        step.batch = self._next_batch
        self._next_batch += 1
        self._by_batch[step.batch] = step
        out.append(
            Commit(
                step.batch,
                flag_events,
                dict(step.counters),
                forwarded=() if step.forwarded is None else (step.forwarded,),
                answered=() if step.answered is None else (step.answered,),
                timed_out=tuple(step.timed_out),
                settled=carried.settled,
                withdrawn=carried.withdrawn,
            )
        )

    def _committed(self, step: _Step, event: Committed, now: Instant) -> None:
        step.batch = None
        if step.carried is not None:
            self._answering.difference_update(step.carried.settled)
        for originator, counter in step.counters.items():
            if counter > self._committed_counters.get(originator, -1):
                self._committed_counters[originator] = counter
        self._claims_committed(step, event, now)
        forwarded = step.forwarded
        if forwarded is not None:
            request_id = forwarded.request_id
            if request_id in event.stored_forwards:
                # Forwarded before, by a process that died (or another instance): its command may have
                # left, so it is not sent again (at most once to the device; a crash between that commit
                # and the command's publish leaves it unsent, and the request gets its E21). The request
                # keeps its first deadline in the store, and the sweep answers it if nobody else does.
                step.effects = [e for e in step.effects if not self._is_command(e, forwarded)]
            # The E21 clock starts now, as the forward is released.
            if self._pending.pop(request_id, None) is not None and step.counted:
                self._resolved(request_id)
            self._pending[request_id] = PendingRequest(
                forwarded.srv, forwarded.service_reference, now.monotonic
            )
        if step.flag_change is not None:
            device, set_flag, at = step.flag_change
            if set_flag:
                self.view.set_flag(device, at)
            else:
                self.view.clear_flag(device)

    def _is_command(self, effect: Effect, forwarded: ForwardedRequest) -> bool:
        """Is `effect` the publish of `forwarded`'s command to its device?"""
        command = self.topics.command(forwarded.request_id.target)
        return isinstance(effect, Publish) and effect.topic == command

    def _claims_committed(self, step: _Step, event: Committed, now: Instant) -> None:
        if step.answered is not None:
            self._answering.discard(step.answered)
            if step.device_answer is not None:
                self._finish_answer(step, step.answered, step.device_answer, event, now)
        if step.timed_out:
            self._finish_timeouts(step, event, now)

    def _taken_elsewhere(self, step: _Step, now: Instant) -> None:
        """Another instance recorded this RequestID first and acts on it; this one answers E16901, as for
        any repeated RequestID. A redelivery (AGAIN) stays at least once, and a flag request stays as
        decided: its flag change is in the same, durable, transaction."""
        request = step.request
        if request is None or step.admission is not Admission.NEW or step.flag_change is not None:
            return
        step.effects.clear()
        # Its pending row is the first instance's (the store keeps that one's deadline and answer).
        if step.forwarded is not None and step.counted:
            self._resolved(request.request_id)
            step.counted = False
        step.forwarded = None
        self._refuse_before_rules(
            step,
            request.request_id.originator,
            request,
            admission=Admission.DUPLICATE,
            code=ResponseCode.DUPLICATE_REQUEST_ID,
            reason="duplicate-request-id",
            detail=f"RequestID {request.request_id} was already accepted by another gateway instance",
            now=now,
        )

    def _rolled_back(self, step: _Step, error: str, now: Instant) -> None:
        """The step's commit failed: undo its counters and answer STORE_FAILED instead (its forward is
        withdrawn by the next commit, in case the store made it durable after all). A device's answer
        and E21s are claimed again at the next tick (published only once a claim holds)."""
        step.batch = None
        if step.carried is not None:
            self._settle.extend(step.carried.settled)
            self._withdraw.extend(step.carried.withdrawn)
        if step.timed_out:
            self._answering.difference_update(step.timed_out)
            self._unclaimed_timeouts.update(step.timed_out)
            for request_id in step.timed_out:
                self._retrying.setdefault(request_id, set()).add(ANSWER_TIMEOUT)
        request = step.request
        if request is None:
            if step.answered is not None and step.device_answer is not None:
                self._claims_again.append((step.answered, step.device_answer))
                self._retrying.setdefault(step.answered, set()).add(ANSWER_RESPONSE)
            return
        if step.forwarded is not None and step.admission is Admission.NEW:
            self._withdraw.append(step.forwarded.request_id)
        self._restore_counters(step.counters)
        if step.counted:
            self._resolved(request.request_id)
        step.effects.clear()
        step.effects.append(
            self._answer(
                request.request_id.originator,
                request,
                ResponseCode.STORE_FAILED,
                now,
                f"store-failed: the request could not be recorded ({_clip(error)}); it was not acted "
                "on, send it again",
            )
        )
        step.effects.append(CommitRolledBack(now.wall, _clip(error), request.request_id))

    def _resolved(self, request_id: RequestId) -> None:
        """A forward no longer awaits its device: answered, timed out, or never made durable."""
        originator = request_id.originator
        self._outstanding_total -= 1
        self._outstanding[originator] -= 1
        if self._outstanding[originator] <= 0:
            del self._outstanding[originator]

    def _outstanding_forward(self, originator: Eui) -> None:
        self._outstanding_total += 1
        self._outstanding[originator] += 1

    def _busy(self, originator: Eui) -> str | None:
        """Why a forward for `originator` must wait (None: it may go)."""
        limits = self.settings
        if self._outstanding[originator] >= limits.max_forwards_per_user:
            return f"{limits.max_forwards_per_user} requests of this User await their device's answer"
        if self._outstanding_total >= limits.max_forwards:
            return f"{limits.max_forwards} requests await their device's answer"
        return None

    def _restore_counters(self, counters: Mapping[Eui, int]) -> None:
        for originator in counters:
            highest = self._committed_counters.get(originator, -1)
            for step in self._steps:
                if step.batch is not None:
                    highest = max(highest, step.counters.get(originator, -1))
            if highest < 0:
                self._counters.pop(originator, None)
            else:
                self._counters[originator] = highest

    def _release(self, now: Instant, out: list[Effect]) -> None:
        """Emit the effects of every durable step at the head, in order; then decide held messages."""
        steps = self._steps
        while True:
            while steps and steps[0].durable:
                step = steps.popleft()
                out.extend(step.effects)
                if step.ticket is not None:
                    out.append(Acknowledge(step.ticket))
                # Settled only by a commit the shell makes after these E21s were handed over.
                self._settle.extend(rid for rid in step.timed_out if rid in self._answering)
            flag_step = self._flag_step
            if flag_step is None or not flag_step.durable:
                return
            self._flag_step = None
            while self._held and self._flag_step is None:
                self._receive(self._held.popleft(), now, out)

    # -- inbound messages -------------------------------------------------------------------------

    def _receive(self, event: Received, now: Instant, out: list[Effect]) -> None:
        step = self._step(event.ticket)
        topic = event.topic
        try:
            if topic.startswith(self._inbound_prefix):
                self._service_request(topic[len(self._inbound_prefix) :], event, step, now, out)
            elif topic.startswith(self._device_prefix) and topic.endswith("/up"):
                self._device_message(topic[len(self._device_prefix) : -len("/up")], event, step, now, out)
            else:
                self._deadletter(step, event, "unexpected-topic", f"no route for topic {topic!r}", now)
        except Exception as exc:  # noqa: BLE001 - a bug must never stall the ordered release of later messages
            step.effects.clear()
            step.reading = False
            if self._flag_step is step:
                self._flag_step = None
            self._deadletter(step, event, "internal-error", repr(exc), now)

    def _service_request(
        self, topic_user: str, event: Received, step: _Step, now: Instant, out: list[Effect]
    ) -> None:
        try:
            user = parse_eui(topic_user)
        except ValueError:
            self._deadletter(step, event, "bad-topic", f"topic user is not an EUI-64: {topic_user!r}", now)
            return
        request = self._read_request(step, user, event, now)
        if request is None or self._refused_signature(step, user, request, event.verification, now):
            return
        counter_before = self._counters.get(user)
        admission = self._admit(user, request, event.redelivered)
        if admission is Admission.SPOOFED:
            # The answer goes to the topic's owner, never to the claimed originator.
            self._refuse_before_rules(
                step,
                user,
                request,
                admission=admission,
                code=ResponseCode.ORIGINATOR_MISMATCH,
                reason="originator-mismatch",
                detail=f"RequestID originator {request.request_id.originator} is not the user of topic "
                f"{event.topic}",
                now=now,
            )
            return
        if admission is Admission.DUPLICATE:
            self._refuse_before_rules(
                step,
                user,
                request,
                admission=admission,
                code=ResponseCode.DUPLICATE_REQUEST_ID,
                reason="duplicate-request-id",
                detail=f"RequestID counter {request.request_id.counter} is not above "
                f"{self._counters.get(user, -1)}, the highest accepted from {request.request_id.originator}",
                now=now,
            )
            return
        if admission is Admission.ANSWERED:
            # This process decided it: its answer is published or on its way.
            step.effects.append(DuplicateDelivery(now.wall, request.request_id))
            return
        step.request = request
        step.admission = admission
        step.counters[user] = request.request_id.counter
        facts = request_facts(request, self.view, self.settings.dcc_eui)
        decision = decide(request, facts, self.table)
        repeat = request.request_id in self._pending  # forwarded before a restart, routed again
        busy = self._busy(user) if decision.action is Action.FORWARD and not repeat else None
        if busy is not None:
            self._refuse_busy(
                step, user, request, admission=admission, counter_before=counter_before, busy=busy, now=now
            )
        elif decision.action is Action.LOCAL and request.srv in FLAG_SRVS:
            self._flag_request(step, event.ticket, request, out)
        else:
            self._act(step, request, decision, facts, now)
            self._commit(step, out)

    def _refuse_busy(  # noqa: PLR0913 - the parts of one refusal
        self,
        step: _Step,
        user: Eui,
        request: ServiceRequest,
        *,
        admission: Admission,
        counter_before: int | None,
        busy: str,
        now: Instant,
    ) -> None:
        """Refused before it left a trace, as a failed commit is: the same RequestID may come again."""
        if admission is Admission.NEW:
            if counter_before is None:
                self._counters.pop(user, None)
            else:
                self._counters[user] = counter_before
        step.request = None
        step.counters.clear()
        self._refuse_before_rules(
            step,
            user,
            request,
            admission=admission,
            code=ResponseCode.GATEWAY_BUSY,
            reason="gateway-busy",
            detail=f"{busy}: not forwarded; send it again later",
            now=now,
        )

    def _admit(self, user: Eui, request: ServiceRequest, redelivered: bool) -> Admission:
        """Check the RequestID against the topic's user and its counter; advance the live counter."""
        request_id = request.request_id
        if request_id.originator != user:
            return Admission.SPOOFED
        if request_id.counter > self._counters.get(user, -1):
            self._counters[user] = request_id.counter
            admission = Admission.NEW
        elif not redelivered:
            return Admission.DUPLICATE
        elif request_id in self._decided:
            return Admission.ANSWERED
        else:
            # Decided by an earlier process (or another instance) that may have died between its commit
            # and its publishes. At-least-once: decide and publish again (devices and users discard
            # repeats by RequestID).
            admission = Admission.AGAIN
        self._decided[request_id] = None
        if len(self._decided) > _DECIDED_MEMORY:
            self._decided.popitem(last=False)
        return admission

    def _act(
        self,
        step: _Step,
        request: ServiceRequest,
        decision: Decision,
        facts: RequestFacts,
        now: Instant,
    ) -> None:
        request_id = request.request_id
        originator = request_id.originator
        if decision.action is Action.FORWARD:
            step.effects.append(Publish(self.topics.command(request_id.target), request.raw))
            step.effects.append(self._answer(originator, request, ResponseCode.ACKNOWLEDGED, now))
            deadline = now.wall + timedelta(seconds=self.settings.target_response_seconds)
            step.forwarded = ForwardedRequest(request_id, request.srv, request.service_reference, deadline)
            if request_id not in self._pending:
                step.counted = True
                self._outstanding_forward(originator)
        elif decision.action is Action.LOCAL:
            entries = inventory_entries(request, self.view)
            payload = inventory_response_xml(request_id=request_id, at=now.wall, devices=entries)
            step.effects.append(Publish(self.topics.out(originator), payload))
        else:
            reason = f"{decision.reason}: {decision.detail}"
            step.effects.append(self._answer(originator, request, decision.response_code, now, reason))
        step.effects.append(
            RequestDecided(
                at=now.wall,
                request_id=request_id,
                user=originator,
                srv=request.srv,
                command_variant=request.command_variant,
                devices=request.concerned_devices,
                category=decision.rule.category.value if decision.rule is not None else "unknown",
                action=decision.action,
                response_code=decision.response_code.value,
                reason=decision.reason,
                detail=decision.detail,
                role=_accepted_role(facts.requester_roles, decision),
                flagged=any(device.flagged for device in facts.devices.values()),
                admission=step.admission,
            )
        )

    def _refuse_before_rules(  # noqa: PLR0913 - the parts of one refusal
        self,
        step: _Step,
        user: Eui,
        request: ServiceRequest,
        *,
        admission: Admission,
        code: ResponseCode,
        reason: str,
        detail: str,
        now: Instant,
    ) -> None:
        """Answer a request refused before any rule applies (bad signature, spoofed originator, repeated
        RequestID)."""
        step.effects.append(self._answer(user, request, code, now, f"{reason}: {detail}"))
        step.effects.append(
            RequestDecided(
                at=now.wall,
                request_id=request.request_id,
                user=user,
                srv=request.srv,
                command_variant=request.command_variant,
                devices=request.concerned_devices,
                category="unknown",
                action=Action.REJECT,
                response_code=code.value,
                reason=reason,
                detail=detail,
                role=None,
                flagged=False,
                admission=admission,
            )
        )

    def _refused_signature(
        self, step: _Step, user: Eui, request: ServiceRequest, verification: Verification | None, now: Instant
    ) -> bool:
        """Refuse a request whose signature the shell found wanting; False if valid or not checked."""
        if verification is None or verification.valid:
            return False
        # Not proven the originator's: never forwarded, never a flag change, no counter moved.
        self._refuse_before_rules(
            step,
            user,
            request,
            admission=Admission.UNSIGNED,
            code=verification.code or ResponseCode.SIGNATURE_INVALID,
            reason=verification.reason,
            detail=verification.detail,
            now=now,
        )
        return True

    def _read_request(self, step: _Step, user: Eui, event: Received, now: Instant) -> ServiceRequest | None:
        """The request; None if it is not a DUIS Service Request (dead-lettered, answered where it can be)."""
        verified = event.verification.root if event.verification is not None else None
        parsed = (
            parse_request(event.payload, max_bytes=self.settings.max_message_bytes)
            if verified is None
            else parse_request_tree(verified, event.payload)  # parsed once, by the signature check
        )
        if not isinstance(parsed, ParseError) and not answerable(parsed.srv):
            # An SRV DUIS does not define: no valid DUIS document can answer it.
            parsed = ParseError(
                "unknown-srv", f"SRV {parsed.srv!r} is not one DUIS defines", parsed.request_id
            )
        if isinstance(parsed, ParseError):
            self._unparseable(step, user, event, parsed, now)
            return None
        return parsed

    def _unparseable(self, step: _Step, user: Eui, event: Received, error: ParseError, now: Instant) -> None:
        self._deadletter(step, event, error.reason, error.detail, now)
        # The sender of garbage on its own topic still gets a DUIS answer where a valid one can be made.
        answer = unreadable_request_answer(error, user, now.wall)
        if answer is not None:
            step.effects.append(Publish(self.topics.out(user), answer))
        step.effects.append(RequestUnreadable(now.wall, user, error.reason, error.detail))

    def _answer(  # noqa: PLR0913 - the fields of one DUIS response
        self,
        user: Eui,
        request: ServiceRequest,
        code: ResponseCode,
        now: Instant,
        reason: str | None = None,
        *,
        payload: bytes | None = None,
    ) -> Publish:
        """A DUIS response to `request` on `user`'s topic."""
        return Publish(
            self.topics.out(user),
            response_xml(
                request_id=request.request_id,
                code=code,
                service_reference=request.service_reference,
                srv=request.srv,
                at=now.wall,
                reason=reason,
                payload=payload,
            ),
        )

    # -- MP169 flag requests -----------------------------------------------------------------------

    def _flag_request(self, step: _Step, ticket: int, request: ServiceRequest, out: list[Effect]) -> None:
        """Hold every later message until this request's device is read and its outcome durable."""
        instruction = request.flag
        if instruction is None:  # the parser gives every 8.15.x its instruction
            raise ValueError(f"flag request {request.request_id} without its instruction")
        step.reading = True
        self._flag_step = step
        out.append(ReadFlagSubject(ticket, instruction.device_id))

    def _flag_subject_read(self, event: FlagSubjectRead, now: Instant, out: list[Effect]) -> None:
        step = self._flag_step
        if step is None or not step.reading or step.ticket != event.ticket or step.request is None:
            raise ValueError(f"no flag request waits for the store read of message {event.ticket}")
        step.reading = False
        request = step.request
        instruction = request.flag
        if instruction is None:
            raise ValueError(f"flag request {request.request_id} without its instruction")
        if event.error is not None:
            # As a failed commit: nothing happened, the supplier is told to send it again.
            self._rolled_back(step, event.error, now)
            return
        request_id = request.request_id
        flagged = self.view.is_flagged(instruction.device_id)
        verdict = evaluate_flag_request(
            instruction, request_id.originator, event.device, event.comms_hub, flagged
        )
        outcome = ("accepted" if verdict.changed else "unchanged") if verdict.accepted else verdict.code.value
        flag_event = FlagEvent(
            device_id=instruction.device_id,
            set=instruction.set,
            requester=request_id.originator,
            request_id=str(request_id),
            declaration=instruction.all_reasonable_steps_taken if instruction.set else None,
            consumer_reference=instruction.consumer_reference,
            outcome=outcome,
            at=now.wall,
        )
        if verdict.accepted and verdict.changed:
            step.flag_change = (instruction.device_id, instruction.set, now.wall)
        reason = f"{verdict.reason}: {verdict.detail}"
        status = (
            flag_status_payload(instruction.device_id, flagged=instruction.set) if verdict.accepted else None
        )
        step.effects.append(
            self._answer(request_id.originator, request, verdict.code, now, reason, payload=status)
        )
        step.effects.append(
            RequestDecided(
                at=now.wall,
                request_id=request_id,
                user=request_id.originator,
                srv=request.srv,
                command_variant=request.command_variant,
                devices=request.concerned_devices,
                category="consumer-choice-flag",
                action=Action.LOCAL,
                response_code=verdict.code.value,
                reason=verdict.reason,
                detail=verdict.detail,
                role=None,
                flagged=flagged,
                admission=step.admission,
                flag_outcome=outcome,
            )
        )
        self._commit(step, out, (flag_event,))

    # -- device responses and alerts ---------------------------------------------------------------

    def _device_message(
        self, topic_device: str, event: Received, step: _Step, now: Instant, out: list[Effect]
    ) -> None:
        try:
            device = parse_eui(topic_device)
        except ValueError:
            self._deadletter(
                step, event, "bad-topic", f"topic device is not an EUI-64: {topic_device!r}", now
            )
            return
        parsed = parse_device_message(event.payload, max_bytes=self.settings.max_message_bytes)
        if isinstance(parsed, ParseError):
            self._deadletter(step, event, parsed.reason, parsed.detail, now)
            return
        if parsed.kind is DeviceMessageKind.RESPONSE:
            self._device_response(step, device, parsed, event, now)
            # The answered forward leaves the store before its answer is released: a crash in
            # between leaves the response unacknowledged, and the broker delivers it again.
            self._commit(step, out)
        else:
            self._alert(step, device, parsed, event, now)

    def _device_response(
        self, step: _Step, device: Eui, response: DeviceMessage, event: Received, now: Instant
    ) -> None:
        """Decide a device's response; it is published once the step's commit claims its forward (any
        instance's: the store holds every forward), so the request gets one final answer."""
        request_id = response.request_id
        if request_id is None or request_id.target != device:
            self._deadletter(
                step,
                event,
                "response-mismatch",
                f"response on {event.topic} does not answer a request to {device}",
                now,
            )
            return
        if self._pending.pop(request_id, None) is not None:
            self._resolved(request_id)
        verdict = decide_device_message(response, self.view.device_facts(device), self.table)
        if verdict.delivery is Delivery.REJECT:
            category = verdict.category.value if verdict.category is not None else None
            self._deadletter(step, event, verdict.reason, verdict.detail, now)
            step.effects.append(
                self._routed(now, device, response, verdict.delivery, verdict.reason, category=category)
            )
            return
        if verdict.delivery is Delivery.WITHHOLD and response.srv is None:
            # decide_device_message withholds by the rule of the SRV
            raise ValueError(f"response to {request_id} withheld without an SRV")
        step.answered = request_id
        step.device_answer = _DeviceAnswer(device, response, verdict, event)
        self._answering.add(request_id)

    def _finish_answer(
        self, step: _Step, request_id: RequestId, answer: _DeviceAnswer, event: Committed, now: Instant
    ) -> None:
        """The claim is durable: publish the answer if it holds; otherwise the request has its final
        answer already (or the device answers a request no instance forwarded)."""
        claim = event.claimed.get(request_id)
        given = event.answers.get(request_id)
        mine = self._retried_here(request_id, ANSWER_RESPONSE, event)
        if claim is not None and claim.answer == ANSWER_RESPONSE:
            self._publish_answer(step, request_id, answer, claim.forward, now)
        elif given == ANSWER_RESPONSE and (answer.received.redelivered or mine):
            # Redelivered after a crash between the claim and the publish: at least once.
            self._publish_answer(step, request_id, answer, None, now)
        elif given is None:
            self._deadletter_answer(step, answer, now)
        else:
            reason = "late-response" if given == ANSWER_TIMEOUT else "duplicate-response"
            delivery = "late" if given == ANSWER_TIMEOUT else "duplicate"
            step.effects.append(self._routed(now, answer.device, answer.response, delivery, reason))

    def _retried_here(self, request_id: RequestId, answer: str, event: Committed) -> bool:
        """Is this retried claim for `answer` one this instance had made already (its failed commit did
        commit)? The retry is then over, and forgotten."""
        retried = self._retrying.get(request_id)
        if retried is None or answer not in retried:
            return False
        retried.discard(answer)
        if not retried:
            del self._retrying[request_id]
        return event.answers.get(request_id) == answer and request_id in event.answered_here

    def _publish_answer(
        self,
        step: _Step,
        request_id: RequestId,
        answer: _DeviceAnswer,
        forward: ForwardedRequest | None,
        now: Instant,
    ) -> None:
        response, verdict = answer.response, answer.verdict
        outcome = "success" if response.response_code == ResponseCode.SUCCESS else "failure"
        originator = request_id.originator
        if verdict.delivery is Delivery.WITHHOLD and response.srv is not None:
            outcome = "withheld"  # a consumer-choice exception, as the user experienced it
            # The request still gets its one final answer: the refusal, not the data.
            payload = response_xml(
                request_id=request_id,
                code=ResponseCode.CONSUMER_CHOICE,
                service_reference=None if forward is None else forward.service_reference,
                srv=response.srv,
                at=now.wall,
                reason=f"{verdict.reason}: {verdict.detail}",
            )
        else:
            payload = answer.received.payload
        step.effects.append(Publish(self.topics.out(originator), payload))
        step.effects.append(
            self._routed(
                now,
                answer.device,
                response,
                verdict.delivery,
                verdict.reason,
                category=verdict.category.value if verdict.category is not None else None,
                recipients=(originator,),
                outcome=outcome,
            )
        )

    def _deadletter_answer(self, step: _Step, answer: _DeviceAnswer, now: Instant) -> None:
        detail = f"no gateway instance forwarded {answer.response.request_id} (or its record was purged)"
        self._deadletter(step, answer.received, "unknown-request", detail, now)
        step.effects.append(
            self._routed(now, answer.device, answer.response, Delivery.REJECT, "unknown-request")
        )

    def _alert(self, step: _Step, device: Eui, alert: DeviceMessage, event: Received, now: Instant) -> None:
        facts = self.view.device_facts(device)
        if facts is None:
            self._deadletter(step, event, "unknown-device", f"alert from {device}, not in the inventory", now)
            step.effects.append(self._routed(now, device, alert, Delivery.REJECT, "unknown-device"))
            return
        verdict = decide_device_message(alert, facts, self.table)
        category = verdict.category.value if verdict.category is not None else None
        if verdict.delivery is Delivery.REJECT:
            self._deadletter(step, event, verdict.reason, verdict.detail, now)
            step.effects.append(
                self._routed(now, device, alert, verdict.delivery, verdict.reason, category=category)
            )
            return
        if verdict.delivery is Delivery.WITHHOLD:
            step.effects.append(
                self._routed(now, device, alert, verdict.delivery, verdict.reason, category=category)
            )
            return
        recipients = alert_recipients(device, alert, verdict, self.view)
        if not recipients:
            self._deadletter(step, event, "no-recipient", f"no recipient for the alert from {device}", now)
            step.effects.append(
                self._routed(now, device, alert, Delivery.REJECT, "no-recipient", category=category)
            )
            return
        payload = event.payload
        if verdict.delivery is Delivery.REDACT:
            payload = without_consumption_payload(payload)
        step.effects.extend(Publish(self.topics.out(user), payload) for user in recipients)
        step.effects.append(
            self._routed(
                now, device, alert, verdict.delivery, verdict.reason, category=category, recipients=recipients
            )
        )

    @staticmethod
    def _routed(  # noqa: PLR0913 - the facts of one routed device message
        now: Instant,
        device: Eui,
        message: DeviceMessage,
        delivery: str,
        reason: str,
        *,
        category: str | None = None,
        recipients: tuple[Eui, ...] = (),
        outcome: str | None = None,
    ) -> DeviceMessageRouted:
        return DeviceMessageRouted(
            at=now.wall,
            device=device,
            kind=message.kind,
            request_id=message.request_id,
            srv=message.srv,
            alert_code=message.alert_code,
            delivery=str(delivery),
            reason=reason,
            category=category,
            outcome=outcome,
            response_code=message.response_code if outcome is not None else None,
            recipients=recipients,
        )

    # -- timeouts and dead letters -------------------------------------------------------------

    def _expire(self, now: Instant, out: list[Effect]) -> None:
        """Claim the forwarded requests whose device has not answered in time, to answer them E21."""
        deadline = now.monotonic - self.settings.target_response_seconds
        expired = self._unclaimed_timeouts
        self._unclaimed_timeouts = {}
        # Insertion order is forwarding order: the expired requests are a prefix.
        for request_id, pending in self._pending.items():
            if pending.forwarded_at > deadline:
                break
            expired[request_id] = pending
        for request_id in expired:
            if self._pending.pop(request_id, None) is not None:
                self._resolved(request_id)
        self._time_out(expired, out)

    def _claim_again(self, out: list[Effect]) -> None:
        answers, self._claims_again = self._claims_again, []
        for request_id, answer in answers:
            step = self._step(None)
            step.answered, step.device_answer = request_id, answer
            self._answering.add(request_id)
            self._commit(step, out)

    def _sweep(self, now: Instant, out: list[Effect]) -> None:
        """Now and then, ask the store for the overdue forwards nobody here holds."""
        if self._sweeping or (self._next_sweep is not None and now.monotonic < self._next_sweep):
            return
        self._sweeping = True
        self._next_sweep = now.monotonic + self.settings.sweep_seconds
        out.append(ReadOverdue(self.settings.overdue_grace_seconds, self.settings.sweep_limit))

    def _overdue(self, forwards: Iterable[ForwardedRequest], out: list[Effect]) -> None:
        """Overdue forwards of a dead instance or an earlier process (the store judged them overdue, by
        its clock): claimed for E21 like this one's own."""
        orphans = {
            entry.request_id: PendingRequest(entry.srv, entry.service_reference, 0.0)
            for entry in forwards
            if entry.request_id not in self._pending and entry.request_id not in self._answering
        }
        self._time_out(orphans, out)

    def _time_out(self, expired: dict[RequestId, PendingRequest], out: list[Effect]) -> None:
        if not expired:
            return
        step = self._step(None)
        step.timed_out = expired
        self._answering.update(expired)
        self._commit(step, out)

    def _finish_timeouts(self, step: _Step, event: Committed, now: Instant) -> None:
        """Publish E21 for each forward the commit claimed; the others were answered elsewhere."""
        target = self.settings.target_response_seconds
        for request_id, pending in step.timed_out.items():
            claim = event.claimed.get(request_id)
            mine = self._retried_here(request_id, ANSWER_TIMEOUT, event)
            if (claim is None or claim.answer != ANSWER_TIMEOUT) and not mine:
                self._answering.discard(request_id)
                continue
            step.effects.append(
                Publish(
                    self.topics.out(request_id.originator),
                    response_xml(
                        request_id=request_id,
                        code=ResponseCode.DEVICE_TIMEOUT,
                        service_reference=pending.service_reference,
                        srv=pending.srv,
                        at=now.wall,
                        reason=f"device-timeout: no answer from {request_id.target} within {target:g} s",
                    ),
                )
            )
            step.effects.append(RequestTimedOut(now.wall, request_id, pending.srv, target))

    def _deadletter(self, step: _Step, event: Received, reason: str, detail: str, now: Instant) -> None:
        step.effects.append(Publish(self.topics.deadletter, deadletter_payload(event, reason, detail)))
        step.effects.append(DeadLettered(now.wall, event.topic, reason, _clip(detail)))


def deadletter_payload(event: Received, reason: str, detail: str) -> bytes:
    """A JSON envelope that always fits the broker's packet limit: the reason, the original topic, the
    original payload's size and SHA-256, and at most DEADLETTER_PAYLOAD_BYTES of it (base64)."""
    payload = event.payload
    kept = payload[:DEADLETTER_PAYLOAD_BYTES]
    return json.dumps(
        {
            "reason": _clip(reason),
            "detail": _clip(detail),
            "topic": _clip(event.topic),
            "payload_bytes": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "payload_truncated": len(kept) < len(payload),
            "payload_base64": base64.b64encode(kept).decode("ascii"),
        }
    ).encode()


def _clip(text: str) -> str:
    return text if len(text) <= _DEADLETTER_TEXT_CHARS else text[: _DEADLETTER_TEXT_CHARS - 1] + "…"


def _accepted_role(roles: frozenset[Role] | None, decision: Decision) -> str | None:
    if decision.rule is None or roles is None:
        return None
    eligible = sorted(role.value for role in roles & decision.rule.eligible_roles)
    return eligible[0] if eligible else None


def observations(effects: Iterable[Effect]) -> list[Observation]:
    """The observations among `effects` (for tests and observers)."""
    return [
        effect
        for effect in effects
        if not isinstance(effect, Publish | Commit | ReadFlagSubject | ReadOverdue | Acknowledge)
    ]
