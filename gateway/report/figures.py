"""The figures every format shows, in one order, and how a figure is written for people."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.outcomes.tally import Tally
    from gateway.report.compute import InstallationRow, TimelinePoint


# Every group row's figures, in this order, in every format.
GROUP_COLUMNS: tuple[str, ...] = (
    "requests",
    "forwarded",
    "succeeded",
    "failed",
    "timed_out",
    "pending",
    "rejected",
    "handled_locally",
    "refused_flag_request",
    "success_rate",
    "refused_consumer_choice",
    "within_target_share",
)
INSTALLATION_COLUMNS: tuple[str, ...] = (
    "supplier",
    "device_type",
    "installed",
    "communicating_normally",
    "reduced_communications",
)
TIMELINE_COLUMNS: tuple[str, ...] = (
    "start",
    "final",
    "succeeded",
    "refused_consumer_choice",
    "success_rate",
    "success_rate_counting_exceptions",
)
HEADINGS = {
    "requests": "Requests",
    "forwarded": "Fwd",
    "succeeded": "OK",
    "failed": "Failed",
    "timed_out": "Timeout",
    "pending": "Pending",
    "rejected": "Rejected",
    "handled_locally": "Local",
    "refused_flag_request": "Flag refused",
    "success_rate": "Success",
    "refused_consumer_choice": "Excluded",
    "within_target_share": "In time",
    "category": "Category",
    "srv": "SRV",
    "role": "Role",
    "user": "User",
}
LEGEND = (
    "Success = OK / (OK + Failed + Timeout), over forwarded requests with a device outcome. Excluded = "
    "refused for consumer choice (MP169 exceptions, E169): not failures, left out of Success and In time. "
    "In time = the device answered within {target:g} s. Rejected = invalid or unauthorised. Local = "
    "answered by the gateway itself (flag set or clear, 8.2 Read Inventory); Flag refused = a flag "
    "request the gateway refused (E3, E19, E0815nn). Not counted here, having no trustworthy originator: "
    "spoofed requests (E1, RequestID originator not the topic's user; answered to the topic's user) and "
    "unparseable input (dead letters on the dead-letter topic); the gateway's metrics count both "
    "(mp169_requests_total, mp169_deadletters_total)."
)


def _rate(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def tally_figures(tally: Tally) -> dict[str, int | float | None]:
    return {
        "requests": tally.requests,
        "forwarded": tally.forwarded,
        "succeeded": tally.succeeded,
        "failed": tally.failed,
        "timed_out": tally.timed_out,
        "pending": tally.pending,
        "rejected": tally.rejected,
        "handled_locally": tally.handled_locally,
        "refused_flag_request": tally.refused_flag_request,
        "success_rate": _rate(tally.success_rate),
        "refused_consumer_choice": tally.refused_consumer_choice,
        "within_target_share": _rate(tally.within_target_share),
    }


def installation_figures(row: InstallationRow) -> dict[str, str | int | None]:
    return {
        "supplier": row.supplier,
        "device_type": row.device_type,
        "installed": row.installed,
        "communicating_normally": row.communicating_normally,
        "reduced_communications": row.reduced_communications,
    }


def timeline_figures(point: TimelinePoint) -> dict[str, str | int | float | None]:
    return {
        "start": iso(point.start),
        "final": point.tally.final,
        "succeeded": point.tally.succeeded,
        "refused_consumer_choice": point.tally.refused_consumer_choice,
        "success_rate": _rate(point.tally.success_rate),
        "success_rate_counting_exceptions": _rate(point.tally.success_rate_counting_exceptions),
    }


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def cell_text(column: str, value: object) -> str:
    if value is None:
        return "-"
    if column.endswith(("_rate", "_share")):
        return percent(value)  # type: ignore[arg-type]
    return f"{value:,}" if isinstance(value, int) else str(value)
