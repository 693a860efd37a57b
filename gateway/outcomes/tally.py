"""Counts of requests (`Tally`) and the pure maths of the hourly and daily count tables.

MP169 counting rule (the `Tally` below): a request refused because the consumer chose reduced
communications (response code E169) is an exception, not a failure; it never enters a success-rate
denominator and is counted on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from gateway.outcomes.schema import DeviceOutcome, OutcomeRecord, Rollup, from_ms, to_ms
from rules.codes import ResponseCode
from rules.decide import Action

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping


@dataclass(frozen=True, slots=True)
class Tally:
    """Counts for a set of requests; the one place the MP169 counting rule lives.

    Success rate = succeeded / final, where final = succeeded + failed + timed out (forwarded
    requests with a device outcome). Requests refused for consumer choice are never forwarded, so
    they never enter `final`: they are exceptions, counted in `refused_consumer_choice`. So is a
    forwarded request whose answer was withheld (the meter's flag was set before the answer came,
    the user got E169): it moves from `forwarded` to `refused_consumer_choice`.
    """

    requests: int = 0
    forwarded: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    refused_consumer_choice: int = 0
    rejected: int = 0
    """Rejected as invalid or unauthorised, or refused for a reason other than consumer choice."""
    handled_locally: int = 0
    within_target: int = 0
    """Final outcomes answered by the device (success or failure) within the target response time."""
    refused_flag_request: int = 0
    """Flag requests (8.15.x) the gateway refused (E3, E19, E0815nn): handled locally, but not done."""

    @classmethod
    def of_decision(cls, decision: str, response_code: str) -> Tally:
        if response_code == ResponseCode.CONSUMER_CHOICE:
            return cls(requests=1, refused_consumer_choice=1)
        if decision == Action.FORWARD:
            return cls(requests=1, forwarded=1)
        if decision == Action.LOCAL:
            # Only a flag request is refused locally: 8.2 Read Inventory always answers.
            if response_code == ResponseCode.SUCCESS:
                return cls(requests=1, handled_locally=1)
            return cls(requests=1, refused_flag_request=1)
        return cls(requests=1, rejected=1)

    @classmethod
    def of_device_outcome(cls, outcome: str, received_ms: int, answered_ms: int, target_ms: int) -> Tally:
        if outcome == DeviceOutcome.TIMEOUT:
            return cls(timed_out=1)
        if outcome == DeviceOutcome.WITHHELD:
            return cls(forwarded=-1, refused_consumer_choice=1)
        in_time = int(answered_ms - received_ms <= target_ms)
        if outcome == DeviceOutcome.SUCCESS:
            return cls(succeeded=1, within_target=in_time)
        return cls(failed=1, within_target=in_time)

    @classmethod
    def of_record(cls, record: OutcomeRecord, target_response_seconds: float) -> Tally:
        tally = cls.of_decision(record.decision, record.response_code)
        if record.device_outcome is None or record.answered_at is None:
            return tally
        return tally + cls.of_device_outcome(
            record.device_outcome,
            to_ms(record.received_at),
            to_ms(record.answered_at),
            round(target_response_seconds * 1000),
        )

    @classmethod
    def total(cls, tallies: Iterable[Tally]) -> Tally:
        result = cls()
        for tally in tallies:
            result += tally
        return result

    def __add__(self, other: Tally) -> Tally:
        return Tally(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Tally)))

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in fields(Tally))

    @property
    def final(self) -> int:
        return self.succeeded + self.failed + self.timed_out

    @property
    def pending(self) -> int:
        return self.forwarded - self.final

    @property
    def success_rate(self) -> float | None:
        """MP169 success rate: consumer-choice exceptions excluded from the denominator."""
        return self.succeeded / self.final if self.final else None

    @property
    def within_target_share(self) -> float | None:
        return self.within_target / self.final if self.final else None

    @property
    def success_rate_counting_exceptions(self) -> float | None:
        """What the rate would be if consumer-choice refusals counted as failures (before MP169)."""
        denominator = self.final + self.refused_consumer_choice
        return self.succeeded / denominator if denominator else None


TALLY_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Tally))


@dataclass(frozen=True, slots=True)
class CellKey:
    """The finest grouping reports need: user, role, SRV and category."""

    originator: str
    role: str | None
    srv: str | None
    category: str | None


Increments = dict[tuple[str, CellKey], Tally]
"""Count increments keyed by the bucket's `start` (an hour or a day) and the cell."""


def hour_of(ms: int) -> str:
    return Rollup.HOURLY.key(from_ms(ms))


def add_decision_increments(increments: Increments, decided: Iterable[tuple[CellKey, int, str, str]]) -> None:
    """Hourly increments of (cell, received ms, decision, response code); the daily ones are their sums."""
    for cell, received_ms, decision, response_code in decided:
        key = (hour_of(received_ms), cell)
        increments[key] = increments.get(key, Tally()) + Tally.of_decision(decision, response_code)


def add_answer_increments(
    increments: Increments,
    answered: Iterable[tuple[CellKey, int, int, str]],
    target_ms: int,
) -> None:
    # Counted in the hour the request arrived, with the request, whenever the answer came.
    for cell, received_ms, answered_ms, outcome in answered:
        key = (hour_of(received_ms), cell)
        tally = Tally.of_device_outcome(outcome, received_ms, answered_ms, target_ms)
        increments[key] = increments.get(key, Tally()) + tally


def daily_increments(hourly: Mapping[tuple[str, CellKey], Tally]) -> Increments:
    daily: Increments = {}
    for (hour, cell), tally in hourly.items():
        key = (hour[:10], cell)  # YYYY-MM-DD of YYYY-MM-DDTHH:00
        daily[key] = daily.get(key, Tally()) + tally
    return daily
