"""Where a message's time goes inside the gateway: a latency budget per stage, for benchmarks.

Off unless a `LatencyBudget` is handed to the shell (`bench/gateway_mqtt.py --budget`): the hot path
then pays one `perf_counter` and a dict write per stage. The stages of one message, from the
transport handing it over to the handler returning (after which the transport sends its PUBACK):

- decide: parse, admit, gather facts and decide (the router's synchronous work, plus the shell's);
- queue-to-commit: waiting for the committer to take its commit (the previous transaction runs);
- commit: the store transaction that makes its RequestID counter (and flag events) durable;
- release: from the end of its commit to its release by the router (its batch's other effects);
- publish: waiting in the publisher's queue and handing its publishes to the transport;
- return: from the acknowledgement to the handler returning (the event loop's scheduling).

Messages without a commit (duplicates, dead letters) have no queue-to-commit or commit stage.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

STAGES = ("decide", "queue-to-commit", "commit", "release", "publish", "return")


class LatencyBudget:
    def __init__(self) -> None:
        self._received: dict[int, float] = {}
        self._decided: dict[int, float] = {}
        self._ticket_of_batch: dict[int, int] = {}
        self._commit_started: dict[int, float] = {}
        self._commit_done: dict[int, float] = {}
        self._released: dict[int, float] = {}
        self._acknowledged: dict[int, float] = {}
        self.durations: dict[str, list[float]] = {stage: [] for stage in STAGES}

    def received(self, ticket: int, at: float) -> None:
        self._received[ticket] = at

    def decided(self, ticket: int, at: float) -> None:
        self._decided[ticket] = at

    def committing(self, ticket: int, batch: int) -> None:
        self._ticket_of_batch[batch] = ticket

    def commit_started(self, batches: Iterable[int], at: float) -> None:
        for batch in batches:
            ticket = self._ticket_of_batch.get(batch)
            if ticket is not None:
                self._commit_started[ticket] = at

    def commit_done(self, batches: Iterable[int], at: float) -> None:
        for batch in batches:
            ticket = self._ticket_of_batch.pop(batch, None)
            if ticket is not None:
                self._commit_done[ticket] = at

    def released(self, ticket: int, at: float) -> None:
        self._released[ticket] = at

    def acknowledged(self, ticket: int, at: float) -> None:
        self._acknowledged[ticket] = at

    def returned(self, ticket: int, at: float) -> None:
        """The handler returns: the message's stages are complete and go into the durations."""
        received = self._received.pop(ticket, None)
        decided = self._decided.pop(ticket, None)
        started = self._commit_started.pop(ticket, None)
        committed = self._commit_done.pop(ticket, None)
        released = self._released.pop(ticket, None)
        acknowledged = self._acknowledged.pop(ticket, None)
        if received is None or decided is None or released is None or acknowledged is None:
            return  # held behind a flag request or failed: not a plain path through the stages
        self.durations["decide"].append(decided - received)
        if started is not None and committed is not None:
            self.durations["queue-to-commit"].append(started - decided)
            self.durations["commit"].append(committed - started)
            self.durations["release"].append(released - committed)
        else:
            self.durations["release"].append(released - decided)
        self.durations["publish"].append(acknowledged - released)
        self.durations["return"].append(at - acknowledged)

    def table(self) -> dict[str, dict[str, float]]:
        """Per stage: how many messages, median and p99 in milliseconds."""
        return {
            stage: {
                "messages": len(values),
                "p50_ms": round(statistics.median(values) * 1e3, 4),
                "p99_ms": round(sorted(values)[max(0, round(0.99 * len(values)) - 1)] * 1e3, 4),
            }
            for stage, values in self.durations.items()
            if values
        }
