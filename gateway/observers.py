"""Observers of the router's observations: Prometheus metrics, structured logs, outcome records.

The router (gateway/router.py) says what happened as plain `Observation` values among its effects;
the shell hands each one to every observer, in order, with the RequestID bound in structlog's
context. None of them changes routing: an observer that fails is logged and the message still flows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import structlog

from gateway.router import (
    Admission,
    CommitRolledBack,
    DeadLettered,
    DeviceMessageRouted,
    DuplicateDelivery,
    RequestDecided,
    RequestTimedOut,
    RequestUnreadable,
)
from rules.codes import ResponseCode
from rules.decide import Action
from rules.domain import FLAG_SET_SRV, DeviceMessageKind

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from gateway.metrics import Metrics
    from gateway.outcomes.recorder import OutcomeRecorder
    from gateway.router import Observation

log = structlog.get_logger("mp169.router")


class Observer(Protocol):
    def __call__(self, observation: Observation) -> None: ...


class MetricsObserver:
    """Counts decisions, deliveries, dead letters, duplicates, timeouts and failed commits."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def __call__(self, observation: Observation) -> None:
        metrics = self._metrics
        if isinstance(observation, RequestDecided):
            metrics.count_request(observation.category, observation.action.value)
            if observation.admission in {Admission.DUPLICATE, Admission.AGAIN}:
                redelivered = observation.admission is Admission.AGAIN
                metrics.duplicates.labels(redelivered=str(redelivered).lower()).inc()
            if observation.flag_outcome is not None:
                action = "set" if observation.srv == FLAG_SET_SRV else "clear"
                metrics.flag_requests.labels(action=action, outcome=observation.flag_outcome).inc()
        elif isinstance(observation, DuplicateDelivery):
            metrics.duplicates.labels(redelivered="true").inc()
        elif isinstance(observation, RequestUnreadable):
            metrics.count_request("unknown", Action.REJECT.value)
        elif isinstance(observation, DeviceMessageRouted):
            if observation.kind is DeviceMessageKind.RESPONSE:
                metrics.device_responses.labels(delivery=observation.delivery).inc()
            else:
                category = observation.category or "unknown"
                metrics.alerts.labels(category=category, delivery=observation.delivery).inc()
        elif isinstance(observation, DeadLettered):
            metrics.deadletters.labels(reason=observation.reason).inc()
        elif isinstance(observation, RequestTimedOut):
            metrics.timeouts.inc()
        else:
            metrics.commit_failures.inc()


class LogObserver:
    """One structured event per refusal, rejection, flag request, withheld message and dead letter."""

    def __init__(self, logger: FilteringBoundLogger | None = None) -> None:
        self._log: FilteringBoundLogger = logger or log

    def __call__(self, observation: Observation) -> None:
        if isinstance(observation, RequestDecided):
            _log_decision(self._log, observation)
        elif isinstance(observation, DuplicateDelivery):
            self._log.info("redelivered-duplicate")
        elif isinstance(observation, DeviceMessageRouted):
            if observation.delivery == "withhold":
                response = observation.kind is DeviceMessageKind.RESPONSE
                self._log.info(
                    "response-withheld" if response else "alert-withheld",
                    srv=observation.srv,
                    alert_code=observation.alert_code,
                    device=observation.device,
                    decision=observation.delivery,
                    reason=observation.reason,
                )
            elif observation.delivery in {"late", "duplicate"}:
                # The request has its final answer already (this instance's or another's).
                self._log.info(f"{observation.delivery}-response-dropped", device=observation.device)
        elif isinstance(observation, DeadLettered):
            self._log.info(
                "deadletter", topic=observation.topic, reason=observation.reason, detail=observation.detail
            )
        elif isinstance(observation, RequestTimedOut):
            self._log.info("device-timeout", srv=observation.srv, after_seconds=observation.after_seconds)
        elif isinstance(observation, CommitRolledBack):
            self._log.critical("commit-failed", error=observation.error)


def _log_decision(log: FilteringBoundLogger, decided: RequestDecided) -> None:
    if decided.admission is Admission.AGAIN:
        log.info("redelivered-after-restart")
    fields = {
        "srv": decided.srv,
        "device": ",".join(decided.devices),
        "decision": decided.action.value,
        "reason": decided.reason,
        "response_code": decided.response_code,
    }
    if decided.flag_outcome is not None:
        accepted = decided.flag_outcome in {"accepted", "unchanged"}
        log.info(
            "flag-request",
            **fields | {"decision": "accepted" if accepted else "refused"},
            changed=decided.flag_outcome == "accepted",
        )
    elif decided.action is Action.REFUSE:
        log.info("refused", **fields)
    elif decided.action is Action.REJECT:
        log.info("rejected", **fields)
    else:
        log.debug("forwarded" if decided.action is Action.FORWARD else "handled-locally", **fields)


class OutcomeObserver:
    """Feeds the outcome recorder: every decision, every device outcome and timeout."""

    def __init__(self, recorder: OutcomeRecorder) -> None:
        self._recorder = recorder

    def __call__(self, observation: Observation) -> None:
        recorder = self._recorder
        if isinstance(observation, RequestDecided):
            # A spoofed or unsigned request is not proven the claimed originator's: it stays out of that
            # user's outcomes.
            if observation.admission in {Admission.SPOOFED, Admission.UNSIGNED}:
                return
            request_id = observation.request_id
            recorder.record_decision(
                request_id=str(request_id),
                originator=request_id.originator,
                role=observation.role,
                target=request_id.target,
                srv=observation.srv,
                category=None if observation.category == "unknown" else observation.category,
                command_variant=observation.command_variant,
                received_at=observation.at,
                decision=observation.action.value,
                response_code=observation.response_code,
                reason=observation.reason,
                flagged=observation.flagged,
            )
        elif isinstance(observation, DeviceMessageRouted):
            if observation.outcome is not None and observation.request_id is not None:
                recorder.record_device_outcome(
                    str(observation.request_id),
                    observation.outcome,
                    observation.response_code,
                    observation.at,
                )
        elif isinstance(observation, RequestTimedOut):
            recorder.record_device_outcome(
                str(observation.request_id), "timeout", ResponseCode.DEVICE_TIMEOUT.value, observation.at
            )
