"""`Desk` drives a Router as the shell does, with no event loop, broker or database.

Its `Durable` is the store as the router sees it: devices, users, flags, flag history, RequestID
counters and pending forwards, changed only by the commits the router asks for. By default every
commit and store read is answered at once; with `hold=True` they wait until the test calls
`commit()` or `read()`, so a test can put messages in between, fail a commit, or crash before the
router hears of it.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

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
    RouterSettings,
    TimePassed,
    observations,
)
from gateway.topics import Topics
from gateway.view import RoutingView
from rules.domain import ANSWER_RESPONSE, ANSWER_TIMEOUT, OUTCOME_ACCEPTED, Claim, FlagEvent
from rules.table import default_table
from tests.gateway.messages import AT, DCC, response_code
from tests.gateway.test_inventory import USERS, premise

if TYPE_CHECKING:
    from collections.abc import Iterable

    from gateway.router import Effect, Event, Observation
    from gateway.signing import Verification
    from rules.domain import DeviceRecord, Eui, ForwardedRequest, RequestId, UserRecord

TOPICS = Topics()


@dataclass
class Durable:
    devices: dict[Eui, DeviceRecord]
    users: list[UserRecord]
    flags: set[Eui] = field(default_factory=set)
    history: list[FlagEvent] = field(default_factory=list)
    counters: dict[Eui, int] = field(default_factory=dict)
    request_ids: set[tuple[Eui, int]] = field(default_factory=set)
    pending: dict[RequestId, ForwardedRequest] = field(default_factory=dict)
    answers: dict[RequestId, str] = field(default_factory=dict)
    """The final answer each answered forward got (its claim), as the stores' pending_requests.answer."""
    unsettled: set[RequestId] = field(default_factory=set)

    @classmethod
    def of(cls, devices: Iterable[DeviceRecord] = (), users: Iterable[UserRecord] = USERS) -> Durable:
        return cls({record.device_id: record for record in devices or premise()}, list(users))

    def apply(self, commits: Iterable[Commit]) -> Committed:
        """Make the commits durable, as one transaction of the stores would: `taken` are those whose
        RequestID was recorded already (another router sharing this Durable acts on it); a forward is
        claimed only while unanswered (an E21 also when its claim was never settled: no grace here)."""
        commits = list(commits)
        taken = set()
        known: set[RequestId] = set()
        for commit in commits:
            for withdrawn in commit.withdrawn:
                if withdrawn in self.pending and withdrawn not in self.answers:
                    del self.pending[withdrawn]
                    self.request_ids.discard((withdrawn.originator, withdrawn.counter))
            for request_id in commit.counters.items():
                if request_id in self.request_ids:
                    taken.add(commit.batch)
                self.request_ids.add(request_id)
            for event in commit.flag_events:
                self.history.append(event)
                if event.outcome == OUTCOME_ACCEPTED:
                    (self.flags.add if event.set else self.flags.discard)(event.device_id)
            for originator, counter in commit.counters.items():
                self.counters[originator] = max(counter, self.counters.get(originator, -1))
            stored = {entry.request_id for entry in commit.forwarded if entry.request_id in self.pending}
            known.update(stored)
            self.pending.update(
                (entry.request_id, entry) for entry in commit.forwarded if entry.request_id not in stored
            )
        claimed = self._claim(commits)
        for commit in commits:
            self.unsettled.difference_update(commit.settled)
        tried = {rid for commit in commits for rid in (*commit.answered, *commit.timed_out)}
        answers = {rid: self.answers[rid] for rid in tried - claimed.keys() if rid in self.answers}
        batches = tuple(commit.batch for commit in commits)
        # One owner here (no client ids): every answer given before is this Desk's routers' own.
        return Committed(batches, frozenset(taken), claimed, answers, frozenset(known), frozenset(answers))

    def _claim(self, commits: list[Commit]) -> dict[RequestId, Claim]:
        """As the stores: the claims of the whole transaction after its forwards, responses first."""
        claimed: dict[RequestId, Claim] = {}
        for answer, request_ids in (
            (ANSWER_RESPONSE, [rid for commit in commits for rid in commit.answered]),
            (ANSWER_TIMEOUT, [rid for commit in commits for rid in commit.timed_out]),
        ):
            for request_id in request_ids:
                given = self.answers.get(request_id)
                reclaim = (
                    answer == ANSWER_TIMEOUT and given == ANSWER_TIMEOUT and request_id in self.unsettled
                )
                if request_id in self.pending and request_id not in claimed and (given is None or reclaim):
                    self.answers[request_id] = answer
                    claimed[request_id] = Claim(answer, self.pending[request_id])
                    if answer == ANSWER_TIMEOUT:
                        self.unsettled.add(request_id)
        return claimed

    @property
    def waiting(self) -> dict[RequestId, ForwardedRequest]:
        """The forwards still waiting for their device's answer (what a restart loads)."""
        return {rid: entry for rid, entry in self.pending.items() if rid not in self.answers}

    def overdue(self, at: datetime) -> tuple[ForwardedRequest, ...]:
        """As the stores' overdue_pending with no grace, at `at`: forwards unanswered past their
        deadline, and unsettled E21 claims."""
        waiting = [entry for entry in self.waiting.values() if entry.deadline < at]
        unsettled = [self.pending[rid] for rid in self.unsettled]
        return tuple(sorted((*waiting, *unsettled), key=lambda entry: entry.deadline))


class Desk:
    def __init__(
        self,
        durable: Durable | None = None,
        *,
        hold: bool = False,
        target_response_seconds: float = 30.0,
        **limits: int,
    ) -> None:
        """`limits`: RouterSettings' forward limits (max_forwards_per_user, max_forwards)."""
        self.durable = durable or Durable.of()
        self.hold = hold
        self.target_response_seconds = target_response_seconds
        self.limits = limits
        self.seconds = 0.0
        self.published: list[Publish] = []
        self.acknowledged: list[int] = []
        self.observed: list[Observation] = []
        self.waiting_commits: deque[Commit] = deque()
        self.waiting_reads: deque[ReadFlagSubject] = deque()
        self._tickets = itertools.count()
        self.router = self._start()

    def _start(self) -> Router:
        view = RoutingView()
        view.apply_devices(self.durable.devices.values())
        view.apply_users(self.durable.users)
        for device in self.durable.flags:
            view.set_flag(device)
        settings = RouterSettings(
            dcc_eui=DCC, target_response_seconds=self.target_response_seconds, **self.limits
        )
        return Router(
            table=default_table(),
            view=view,
            settings=settings,
            counters=self.durable.counters,
            pending=self.durable.waiting.values(),
        )

    def restart(self) -> None:
        """A new process on the same durable state: what was waiting is lost, as in a crash."""
        self.waiting_commits.clear()
        self.waiting_reads.clear()
        self.router = self._start()

    @property
    def now(self) -> Instant:
        return Instant(AT + timedelta(seconds=self.seconds), self.seconds)

    # -- events ---------------------------------------------------------------------------------

    def feed(self, event: Event) -> list[Effect]:
        """Feed one event and, unless holding, answer its commits and reads; every effect, in order."""
        effects: list[Effect] = []
        events: deque[Event] = deque([event])
        while events:
            produced = self.router.handle(events.popleft(), self.now)
            effects.extend(produced)
            for effect in produced:
                if isinstance(effect, Publish):
                    self.published.append(effect)
                elif isinstance(effect, Acknowledge):
                    self.acknowledged.append(effect.ticket)
                elif isinstance(effect, Commit):
                    self.waiting_commits.append(effect)
                elif isinstance(effect, ReadFlagSubject):
                    self.waiting_reads.append(effect)
                elif isinstance(effect, ReadOverdue):
                    events.append(OverdueRead(self.durable.overdue(self.now.wall)))
            self.observed.extend(observations(produced))
            if not self.hold:
                if self.waiting_reads:
                    events.append(self._read(self.waiting_reads.popleft()))
                if self.waiting_commits:
                    events.append(self._commit())
        return effects

    def _read(self, read: ReadFlagSubject, error: str | None = None) -> FlagSubjectRead:
        device = self.durable.devices.get(read.device_id)
        hub = None
        if device is not None and device.comms_hub_id is not None:
            hub = self.durable.devices.get(device.comms_hub_id)
        return FlagSubjectRead(read.ticket, device, hub, error=error)

    def _commit(self, error: str | None = None) -> Committed | CommitFailed:
        commits = list(self.waiting_commits)
        self.waiting_commits.clear()
        batches = tuple(commit.batch for commit in commits)
        if error is not None:
            return CommitFailed(batches, error)
        return self.durable.apply(commits)

    def commit(self, error: str | None = None) -> list[Publish]:
        """Answer every waiting commit (all in one transaction): succeeded, or failed with `error`."""
        start = len(self.published)
        self.feed(self._commit(error))
        return self.published[start:]

    def commit_lost(self, error: str) -> list[Publish]:
        """The waiting commits become durable, but their answer is lost (the connection dropped): the
        router hears that they failed."""
        self.durable.apply(self.waiting_commits)
        return self.commit(error)

    def read(self, error: str | None = None) -> list[Publish]:
        start = len(self.published)
        self.feed(self._read(self.waiting_reads.popleft(), error))
        return self.published[start:]

    def crash_after_commit(self) -> None:
        """The waiting commits become durable, then the process dies before it hears so."""
        self.durable.apply(self.waiting_commits)
        self.restart()

    # -- messages -------------------------------------------------------------------------------

    def receive(
        self,
        topic: str,
        payload: bytes,
        *,
        redelivered: bool = False,
        verification: Verification | None = None,
    ) -> list[Publish]:
        start = len(self.published)
        self.feed(Received(next(self._tickets), topic, payload, redelivered, verification))
        return self.published[start:]

    def send(
        self,
        user: Eui,
        payload: bytes,
        *,
        redelivered: bool = False,
        verification: Verification | None = None,
    ) -> list[Publish]:
        return self.receive(
            TOPICS.inbound + f"/{user}", payload, redelivered=redelivered, verification=verification
        )

    def device_says(self, device: Eui, payload: bytes) -> list[Publish]:
        return self.receive(f"{TOPICS.devices}/{device}/up", payload)

    def pass_time(self, seconds: float) -> list[Publish]:
        self.seconds += seconds
        start = len(self.published)
        self.feed(TimePassed())
        return self.published[start:]

    def upsert(self, *records: DeviceRecord) -> None:
        """An inventory change, as `mp169 inventory import` and the view refresh make it."""
        for record in records:
            self.durable.devices[record.device_id] = record
        self.router.view.apply_devices(records)

    # -- reading what came out ------------------------------------------------------------------

    @staticmethod
    def answers_to(user: Eui, published: Iterable[Publish]) -> list[str]:
        return [response_code(p.payload) for p in published if p.topic == TOPICS.out(user)]

    @staticmethod
    def commands(published: Iterable[Publish]) -> list[str]:
        return [p.topic for p in published if p.topic.endswith("/cmd")]

    def agree(self) -> frozenset[Eui]:
        """The flagged devices; fails unless the router's view and the durable state say the same."""
        assert self.router.view.flagged == self.durable.flags
        return frozenset(self.durable.flags)
