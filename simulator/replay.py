"""Replay a stream (generated or recorded) through a running gateway, observe, and check MP169.

`replay()` publishes the stream's requests in order at their (scaled) times, applies its inventory
changes through a callback, watches dsp/out/+, dsp/device/+/cmd, dsp/device/+/up and
dsp/deadletter, waits until every request has its final answer (or the timeout), and returns a
ReplayResult: a summary (decisions by response code and SRV category, answers received and missing,
latency percentiles) and the MP169 invariants of simulator.invariants, checked over the event log.
Items of a live recording on other topics than the inbound one (the gateway's and devices' own
traffic) are skipped: the gateway and the device simulator produce them afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gateway.duis import ParseError, parse_device_message
from gateway.signing import CertificateLibrary, OrgCertificate, SigningKey, sign
from gateway.topics import Topics
from rules.codes import ResponseCode
from rules.domain import DCC_EUI, DeviceMessage, DeviceMessageKind, Eui
from rules.table import RulesTable, default_table
from simulator.invariants import (
    ACKNOWLEDGED,
    Analysis,
    Event,
    EventKind,
    InvariantResult,
    analyse,
    check_analysis,
    check_answers_signed,
    classify,
    deadletter_original,
    read_request,
)
from simulator.recording import InventoryChange, StreamItem

if TYPE_CHECKING:
    from gateway.pki import PkiLayout
    from gateway.transport import Message, Transport
    from simulator.estate import Estate

ApplyInventory = Callable[[Sequence[Mapping[str, str]]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Seconds from publishing a request to its first answer (nearest rank)."""

    p50: float
    p95: float
    p99: float
    count: int


def percentiles(values: Iterable[float]) -> Percentiles | None:
    ordered = sorted(values)
    if not ordered:
        return None

    def rank(share: float) -> float:
        return ordered[max(0, math.ceil(share * len(ordered)) - 1)]

    return Percentiles(rank(0.50), rank(0.95), rank(0.99), len(ordered))


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    requests: int
    inventory_changes: int
    skipped: int
    """Items on other topics than the inbound one (live recordings hold the gateway's own traffic)."""
    decisions: Mapping[str, int]
    """forwarded (I99), local (I0), refused (E169), flag-refused (E0815xx), rejected (other E...),
    deadletter, no-answer."""
    first_codes: Mapping[str, int]
    """The first answer's response code per request (I99 = forwarded)."""
    device_outcomes: Mapping[str, int]
    """The final code of forwarded requests: the device's (I0, E20), E21 timeout, E169 withheld."""
    by_category: Mapping[str, Mapping[str, int]]
    """SRV category (rules table) -> decision -> requests."""
    answers: int
    answered: int
    missing: int
    commands: int
    alerts_up: int
    alerts_out: int
    deadletters: int
    latency: Percentiles | None
    duration_seconds: float
    completed: bool
    """Every request had its final answer before the timeout."""


@dataclass(frozen=True, slots=True)
class ReplayResult:
    summary: ReplaySummary
    invariants: tuple[InvariantResult, ...]
    events: tuple[Event, ...] = field(repr=False)

    @property
    def passed(self) -> bool:
        """Every invariant held and checked something: a check that saw nothing proves nothing."""
        return all(result.passed and not result.vacuous for result in self.invariants)


@dataclass(frozen=True, slots=True)
class Signatures:
    """The simulated users' signing credentials, and the library the DSP's answers must verify against."""

    users: Mapping[Eui, tuple[SigningKey, OrgCertificate]]
    dsp: CertificateLibrary

    def sign(self, topic: str, payload: bytes) -> bytes:
        """The request signed by the user whose topic it goes to; as it is if that user has no key or
        the payload is not XML (malformed input is sent as generated)."""
        credentials = self.users.get(Eui(topic.rsplit("/", 1)[-1]))
        if credentials is None:
            return payload
        try:
            return sign(payload, *credentials)
        except ValueError:
            return payload

    @classmethod
    def from_pki(cls, layout: PkiLayout, dsp_eui: Eui = DCC_EUI) -> Signatures:
        """Every user's key and certificate in a `mp169 pki init` directory; the DSP's certificate."""
        users = {
            Eui(path.stem): (
                SigningKey.from_file(path),
                OrgCertificate.from_pem(layout.certificate(Eui(path.stem)).read_bytes()),
            )
            for path in sorted(layout.keys.glob("*.key"))
            if path.stem != dsp_eui
        }
        dsp = OrgCertificate.from_pem(layout.certificate(dsp_eui).read_bytes())
        return cls(users, CertificateLibrary([dsp]))


# -- waiting for answers -------------------------------------------------------------------------


@dataclass(slots=True)
class _Malformed:
    settled: bool = False


class _Tracker:
    """Counts the answers still due: one final per parsed request, one reaction per malformed one."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.expected = 0
        self.remaining = 0
        self.undecided = 0
        """Requests with no answer of any kind yet (an I99 counts): not yet decided by the gateway."""
        self._first: dict[str, int] = defaultdict(int)
        self.done = asyncio.Event()
        self.progressed = asyncio.Event()
        self._finals: dict[str, int] = defaultdict(int)
        self._by_payload: dict[bytes, list[_Malformed]] = defaultdict(list)
        self._by_key: dict[str, list[_Malformed]] = defaultdict(list)
        self._anonymous: dict[str, list[_Malformed]] = defaultdict(list)

    def expect(self, topic: str, payload: bytes) -> None:
        user = topic.rsplit("/", 1)[-1]
        parsed = read_request(payload)
        self.expected += 1
        self.remaining += 1
        self.done.clear()
        if not isinstance(parsed, ParseError):
            self._finals[f"{user}|{parsed.request_id}"] += 1
            self._first[f"{user}|{parsed.request_id}"] += 1
            self.undecided += 1
            return
        pending = _Malformed()
        self._by_payload[payload].append(pending)
        if parsed.request_id is not None:
            self._by_key[f"{user}|{parsed.request_id}"].append(pending)
        else:
            self._anonymous[user].append(pending)

    def observe(self, kind: EventKind, topic: str, payload: bytes) -> None:
        if kind is EventKind.DEADLETTER:
            self._settle(self._by_payload.get(deadletter_original(payload)))
            return
        if kind is not EventKind.ANSWER:
            return
        message = parse_device_message(payload)
        if isinstance(message, ParseError) or message.kind is not DeviceMessageKind.RESPONSE:
            return
        user = topic.rsplit("/", 1)[-1]
        error = message.response_code[:1] == "E"
        if message.request_id is None:
            if error:
                self._settle(self._anonymous.get(user))
            return
        key = f"{user}|{message.request_id}"
        if self._first.get(key, 0) > 0:
            self._first[key] -= 1
            self.undecided -= 1
            self.progressed.set()
        if message.response_code != ACKNOWLEDGED and self._finals.get(key, 0) > 0:
            self._finals[key] -= 1
            self._count_down()
        elif error:
            self._settle(self._by_key.get(key))

    def _settle(self, candidates: list[_Malformed] | None) -> None:
        pending = next((item for item in candidates or () if not item.settled), None)
        if pending is not None:
            pending.settled = True
            self._count_down()

    def _count_down(self) -> None:
        self.remaining -= 1
        self.progressed.set()
        if self.remaining <= 0:
            self.done.set()

    async def decided(self, patience: float) -> None:
        """Wait until every request sent so far has its first answer (or `patience` passes without one):
        the gateway has decided it, against the inventory as it was."""
        while self.undecided > 0:
            self.progressed.clear()
            try:
                await asyncio.wait_for(self.progressed.wait(), patience)
            except TimeoutError:
                return

    async def room(self, window: int, patience: float) -> None:
        """Wait until fewer than `window` requests await their answer (or `patience` passes without any)."""
        while self.remaining >= window:
            self.progressed.clear()
            try:
                await asyncio.wait_for(self.progressed.wait(), patience)
            except TimeoutError:
                return


# -- the replay ----------------------------------------------------------------------------------


class _Run:
    """One replay: the event log, the answers still due, the progress display."""

    def __init__(
        self,
        topics: Topics,
        monotonic: Callable[[], float],
        bar: Progress,
        sleep: Callable[[float], Awaitable[None]],
        signatures: Signatures | None,
    ) -> None:
        self.topics = topics
        self.signatures = signatures
        self.monotonic = monotonic
        self.sleep = sleep
        self.bar = bar
        self.events: list[Event] = []
        self.tracker = _Tracker(topics)
        self.inventory_changes = 0
        self.skipped = 0
        self.start = monotonic()
        self._publishing = bar.add_task("publish", total=0)
        self._answering = bar.add_task("answers", total=0)

    def now(self) -> float:
        return self.monotonic() - self.start

    async def observe(self, message: Message) -> None:
        kind = classify(message.topic, self.topics)
        if kind is None or kind is EventKind.REQUEST:
            return
        self.events.append(Event(self.now(), kind, message.topic, message.payload))
        self.tracker.observe(kind, message.topic, message.payload)
        self.bar.update(self._answering, completed=self.tracker.expected - self.tracker.remaining)

    async def publish_all(  # noqa: PLR0913 - the stream, where to, how fast, and the inventory hook
        self,
        items: Sequence[StreamItem],
        transport: Transport,
        *,
        speed: float | None,
        window: int | None,
        apply_inventory: ApplyInventory | None,
        patience: float,
    ) -> None:
        inbound = f"{self.topics.inbound}/"
        self.bar.update(self._publishing, total=len(items))
        for item in items:
            if speed is not None and (delay := item.t / speed - self.now()) > 0:
                await self.sleep(delay)
            if isinstance(item, InventoryChange):
                if apply_inventory is None:
                    self.skipped += 1
                else:
                    # What was sent before the change is decided before it, as the stream orders them
                    # (flat out over a broker, a request still queued would meet the new rows).
                    await self.tracker.decided(patience)
                    # Logged as it starts: a gateway may route by the new rows before this returns.
                    rows = json.dumps([dict(row) for row in item.rows]).encode()
                    self.events.append(Event(self.now(), EventKind.INVENTORY, "", rows, item.scenario))
                    await apply_inventory(item.rows)
                    self.inventory_changes += 1
            elif item.topic.startswith(inbound):
                if window is not None:
                    await self.tracker.room(window, patience)
                # Signed at the point of sending, as a DCC user's adapter does (templates stay unsigned).
                payload = self.signatures.sign(item.topic, item.payload) if self.signatures else item.payload
                self.events.append(Event(self.now(), EventKind.REQUEST, item.topic, payload, item.scenario))
                self.tracker.expect(item.topic, payload)
                await transport.publish(item.topic, payload)
            else:
                self.skipped += 1
            self.bar.update(self._publishing, advance=1)
            self.bar.update(self._answering, total=self.tracker.expected)

    async def wait_for_answers(self, seconds: float) -> None:
        if self.tracker.remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.tracker.done.wait(), seconds)


async def replay(  # noqa: PLR0913 - one run's knobs, all keyword-only
    items: Sequence[StreamItem],
    transport: Transport,
    *,
    speed: float | None = None,
    window: int | None = 1000,
    apply_inventory: ApplyInventory | None = None,
    answer_timeout: float = 60.0,
    settle_seconds: float = 0.0,
    progress: bool = False,
    topics: Topics | None = None,
    table: RulesTable | None = None,
    before_wait: Callable[[], Awaitable[object]] | None = None,
    console: Console | None = None,
    estate: Estate | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    signatures: Signatures | None = None,
) -> ReplayResult:
    """Publish `items` through `transport`, observe the gateway's reactions, check the invariants.

    speed: None publishes as fast as possible, 1.0 at the recorded pace, 2.0 twice as fast.
    window: at most this many requests awaiting their answer at once (None: no limit). Besides
      sparing the gateway, it keeps what is observed in causal order: a request published after a
      flag-set's answer was seen is one the gateway decided knowing the flag.
    apply_inventory: called with an InventoryChange's rows at its time (without it they are skipped).
    answer_timeout: seconds to wait, after the last publish, for the answers still due.
    settle_seconds: extra time to keep observing once all are answered (catches duplicate answers).
    before_wait: awaited after the last publish (the demo executes DCC schedules there).
    signatures: sign each request with its sender's key; verify each answer against the DSP's
      certificate (the `answers-signed` invariant). None: neither.
    estate: the inventory and users the gateway started with: the invariants then judge flags by
      whose data it is (a GSME's flag covers its GPF) and check authorised access.
    """
    if speed is not None and speed <= 0:
        raise ValueError("speed must be positive (None: as fast as possible)")
    if window is not None and window < 1:
        raise ValueError("window must be at least 1 (None: no limit)")
    topics = topics or Topics()
    table = table or default_table()
    bar = Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
    )
    run = _Run(topics, monotonic, bar, sleep, signatures)
    subscriptions = [
        f"{topics.outbound}/+",
        f"{topics.devices}/+/cmd",
        f"{topics.devices}/+/up",
        topics.deadletter,
    ]
    await transport.start(subscriptions, run.observe)
    try:
        with bar:
            await run.publish_all(
                items,
                transport,
                speed=speed,
                window=window,
                apply_inventory=apply_inventory,
                patience=answer_timeout,
            )
            if before_wait is not None:
                await before_wait()
            await run.wait_for_answers(answer_timeout)
            if settle_seconds:
                await sleep(settle_seconds)
    finally:
        await transport.stop()
    analysis = analyse(run.events, topics, estate)
    summary = summarise(
        analysis,
        table,
        inventory_changes=run.inventory_changes,
        skipped=run.skipped,
        duration=run.now(),
        completed=run.tracker.remaining <= 0,
    )
    invariants = check_analysis(analysis, table)
    if signatures is not None:
        invariants = (*invariants, check_answers_signed(analysis, signatures.dsp))
    return ReplayResult(summary, invariants, tuple(run.events))


# -- the summary -----------------------------------------------------------------------------------

_FLAG_REFUSALS = ResponseCode.NOT_RESPONSIBLE_SUPPLIER.value


def decision_of(codes: Sequence[str]) -> str:
    """What the gateway did with a request, read from its answers' response codes."""
    if not codes:
        return "no-answer"
    first = codes[0]
    if first == ACKNOWLEDGED:
        # Forwarded, but the answer withheld for consumer choice: refused, as the user experienced it.
        return "refused" if codes[-1] == ResponseCode.CONSUMER_CHOICE.value else "forwarded"
    if first == ResponseCode.SUCCESS.value:
        return "local"
    if first == ResponseCode.CONSUMER_CHOICE.value:
        return "refused"
    if first == _FLAG_REFUSALS or first.startswith("E0815"):
        return "flag-refused"
    return "rejected"


def summarise(  # noqa: PLR0913 - the analysis plus what only the replay loop knows
    analysis: Analysis,
    table: RulesTable,
    *,
    inventory_changes: int,
    skipped: int,
    duration: float,
    completed: bool,
) -> ReplaySummary:
    """The replay's figures, from the analysed event log (pure)."""
    decisions: Counter[str] = Counter()
    first_codes: Counter[str] = Counter()
    device_outcomes: Counter[str] = Counter()
    by_category: dict[str, Counter[str]] = defaultdict(Counter)
    latencies: list[float] = []
    deadletter_times: dict[bytes, list[float]] = defaultdict(list)
    for _, t, original in analysis.deadletters:
        deadletter_times[original].append(t)
    answered = 0
    for record in analysis.requests:
        request = record.parsed
        answers = analysis.answers_by_key.get(record.key or "", ())
        codes = [a.parsed.response_code for a in answers if isinstance(a.parsed, DeviceMessage)]
        if isinstance(request, ParseError):
            category = "unparseable"
            reactions = [t for t in deadletter_times.get(record.payload, ()) if t >= record.t]
            decision = "deadletter" if reactions else decision_of(codes)
            if reactions:
                latencies.append(min(reactions) - record.t)
        else:
            rule = table.srv(request.srv)
            category = rule.category.value if rule is not None else "unknown-srv"
            decision = decision_of(codes)
            if answers:
                latencies.append(answers[0].t - record.t)
        if codes:
            first_codes[codes[0]] += 1
        finals = [code for code in codes if code != ACKNOWLEDGED]
        if finals or decision == "deadletter":
            answered += 1
        if decision == "forwarded" and finals:
            device_outcomes[finals[0]] += 1
        decisions[decision] += 1
        by_category[category][decision] += 1
    alerts = (DeviceMessageKind.DEVICE_ALERT, DeviceMessageKind.DCC_ALERT)
    return ReplaySummary(
        requests=len(analysis.requests),
        inventory_changes=inventory_changes,
        skipped=skipped,
        decisions=dict(decisions),
        first_codes=dict(first_codes),
        device_outcomes=dict(device_outcomes),
        by_category={category: dict(counts) for category, counts in sorted(by_category.items())},
        answers=len(analysis.answers),
        answered=answered,
        missing=len(analysis.requests) - answered,
        commands=len(analysis.commands),
        alerts_up=sum(
            1 for up in analysis.ups if isinstance(up.parsed, DeviceMessage) and up.parsed.kind in alerts
        ),
        alerts_out=sum(
            1 for a in analysis.answers if isinstance(a.parsed, DeviceMessage) and a.parsed.kind in alerts
        ),
        deadletters=len(analysis.deadletters),
        latency=percentiles(latencies),
        duration_seconds=duration,
        completed=completed,
    )


_DECISION_ORDER = (
    "forwarded",
    "local",
    "refused",
    "flag-refused",
    "rejected",
    "deadletter",
    "no-answer",
)


def print_summary(result: ReplayResult, console: Console | None = None) -> None:
    """The replay summary and the invariant verdicts as rich tables."""
    console = console or Console()
    summary = result.summary
    overview = Table(title="Replay", show_header=False)
    overview.add_column("figure")
    overview.add_column("value", justify="right")
    latency = summary.latency
    rows = [
        ("requests published", summary.requests),
        ("inventory changes applied", summary.inventory_changes),
        ("items skipped", summary.skipped),
        ("requests with their final answer", summary.answered),
        ("requests missing an answer", summary.missing),
        ("answers and alerts on dsp/out", summary.answers),
        ("commands reaching devices", summary.commands),
        ("alerts from devices / delivered", f"{summary.alerts_up} / {summary.alerts_out}"),
        ("dead letters", summary.deadletters),
        (
            "latency p50 / p95 / p99 (ms)",
            "-"
            if latency is None
            else f"{latency.p50 * 1e3:.1f} / {latency.p95 * 1e3:.1f} / {latency.p99 * 1e3:.1f}",
        ),
        ("duration (s)", f"{summary.duration_seconds:.2f}"),
    ]
    for name, value in rows:
        overview.add_row(name, str(value))
    console.print(overview)

    codes = Table(title="First answer by response code")
    codes.add_column("code")
    codes.add_column("requests", justify="right")
    codes.add_column("meaning")
    names = {code.value: code.name.lower().replace("_", "-") for code in ResponseCode}
    for code, count in sorted(summary.first_codes.items(), key=lambda pair: -pair[1]):
        codes.add_row(code, str(count), names.get(code, ""))
    if summary.device_outcomes:
        outcome = ", ".join(f"{code} {count}" for code, count in sorted(summary.device_outcomes.items()))
        codes.caption = f"forwarded requests, final answer: {outcome}"
    console.print(codes)

    categories = Table(title="Requests by SRV category and decision")
    columns = [d for d in _DECISION_ORDER if any(d in counts for counts in summary.by_category.values())]
    categories.add_column("category", no_wrap=True)
    for decision in columns:
        categories.add_column(decision, justify="right")
    for category, counts in summary.by_category.items():
        categories.add_row(category, *(str(counts.get(decision, "")) for decision in columns))
    console.print(categories)

    verdicts = Table(title="MP169 invariants")
    verdicts.add_column("invariant")
    verdicts.add_column("result")
    verdicts.add_column("checked", justify="right")
    verdicts.add_column("violations", justify="right")
    styles = {"PASS": "green", "FAIL": "bold red", "NOTHING CHECKED": "bold yellow"}
    for check in result.invariants:
        verdict = f"[{styles[check.verdict]}]{check.verdict}[/{styles[check.verdict]}]"
        verdicts.add_row(check.name, verdict, str(check.checked), str(check.violations))
    console.print(verdicts)
    for check in result.invariants:
        for example in check.counterexamples:
            console.print(f"[red]{check.name}[/red]: {example}", highlight=False, soft_wrap=True)
    _explain_vacuous(result, console)
    if not summary.completed:
        console.print(f"[yellow]{summary.missing} request(s) still unanswered at the timeout[/yellow]")


def _explain_vacuous(result: ReplayResult, console: Console) -> None:
    vacuous = [check.name for check in result.invariants if check.vacuous]
    if vacuous:
        console.print(
            f"[bold yellow]{len(vacuous)} invariant(s) checked nothing ({', '.join(vacuous)}): the run "
            "proves nothing about them, so it fails. The stream held none of what they look at, or the "
            "gateway refused it all (E16901 throughout: replayed into a store that had seen it? "
            "mp169 replay --renumber).[/bold yellow]",
            soft_wrap=True,
        )
