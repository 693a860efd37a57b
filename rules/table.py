"""The MP169 rules table: rules/table.toml loaded, validated and frozen.

The table is data (like h11's state table): every SRV and alert code with its category and the MP169
decision for a flagged device. Loading validates the whole file and fails with a TableError naming the row;
nothing is half-loaded. The SRV matrix (rules/duis/srv-matrix.json) is the authority for each SRV's name,
critical, non-device, DCC-scheduled and eligible roles: the table must agree with it.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from rules.domain import FLAG_SRVS, DeviceType, Role

if TYPE_CHECKING:
    from collections.abc import Mapping

PACKAGED_TABLE = Path(__file__).with_name("table.toml")
SRV_MATRIX = Path(__file__).parent / "duis" / "srv-matrix.json"


_SRV_RE = re.compile(r"[1-9][0-9]*(?:\.[0-9]+){1,2}")
_ALERT_CODE_RE = re.compile(r"[0-9A-F]{4}|AD[0-9]+|N[0-9]+")
"""A GBCS alert code (two bytes in hex) or a DUIS DCC alert code (AD1, N1...)."""


class Category(StrEnum):
    CONSUMPTION = "consumption"
    BILLING = "billing"
    PREPAYMENT = "prepayment"
    NETWORK_DATA = "network-data"
    DEMAND = "demand"
    SCHEDULE = "schedule"
    TARIFF = "tariff"
    FIRMWARE = "firmware"
    SECURITY = "security"
    SAFETY = "safety"
    SUPPLY = "supply"
    POWER_OUTAGE = "power-outage"
    CONFIGURATION = "configuration"
    INVENTORY = "inventory"
    INSTALLATION = "installation"
    EVENT_LOG = "event-log"
    DISPLAY = "display"
    LOAD_CONTROL = "load-control"
    CONSUMER_CHOICE_FLAG = "consumer-choice-flag"
    OTHER = "other"


ALWAYS_FLOWING = frozenset(
    {Category.FIRMWARE, Category.SECURITY, Category.SAFETY, Category.SUPPLY, Category.POWER_OUTAGE}
)
"""MP169 lets these through whatever the flag: no row of these categories may be refused or withheld."""


@dataclass(frozen=True, slots=True)
class SrvRule:
    srv: str
    service_reference: str
    name: str
    category: Category
    critical: StrictBool
    non_device: StrictBool
    dcc_scheduled: StrictBool
    eligible_roles: frozenset[Role]
    device_types: frozenset[DeviceType]
    """The device types the SRV may address (DUIS E11 for any other)."""
    device_relationship: StrictBool
    """The requester must be registered for the device in a role that has a relationship (DUIS E4)."""
    refused_when_flagged: StrictBool
    rationale: str


@dataclass(frozen=True, slots=True)
class AlertRule:
    code: str
    name: str
    category: Category
    withheld_when_flagged: StrictBool
    redacted_when_flagged: StrictBool
    """A Critical alert carrying consumption values: delivered with its payload emptied when flagged."""
    notify_network_operator: StrictBool
    rationale: str


class RulesTable:
    """Read-only SRV and alert rules, keyed by SRV and by upper-case alert code."""

    __slots__ = ("alerts", "srvs")

    srvs: Mapping[str, SrvRule]
    alerts: Mapping[str, AlertRule]

    def __init__(self, srvs: Mapping[str, SrvRule], alerts: Mapping[str, AlertRule]) -> None:
        object.__setattr__(self, "srvs", MappingProxyType(dict(srvs)))
        object.__setattr__(self, "alerts", MappingProxyType(dict(alerts)))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"RulesTable is read-only ({name})")

    def srv(self, srv: str) -> SrvRule | None:
        return self.srvs.get(srv)

    def alert(self, code: str) -> AlertRule | None:
        rule = self.alerts.get(code)
        return rule if rule is not None else self.alerts.get(code.upper())

    def __repr__(self) -> str:
        return f"RulesTable({len(self.srvs)} SRVs, {len(self.alerts)} alert codes)"


class TableError(Exception):
    """The rules table is unusable; the message names the file and the offending row."""


# -- file schema (pydantic validates, then frozen dataclasses are built) ------------------------------

_ERRORS_SHOWN = 5
_Text = Annotated[StrictStr, Field(min_length=1)]


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class _SrvRow(_Row):
    srv: _Text
    service_reference: _Text
    name: _Text
    category: Category
    critical: StrictBool
    non_device: StrictBool
    dcc_scheduled: StrictBool
    eligible_roles: list[Role]
    device_types: list[DeviceType]
    device_relationship: StrictBool
    refused_when_flagged: StrictBool
    rationale: _Text


class _AlertRow(_Row):
    code: _Text
    name: _Text
    category: Category
    withheld_when_flagged: StrictBool
    redacted_when_flagged: StrictBool
    notify_network_operator: StrictBool
    rationale: _Text


class _TableFile(_Row):
    srv: list[_SrvRow]
    alert: list[_AlertRow]


def load_table(path: Path | None = None) -> RulesTable:
    """Load and validate a rules table (None: the packaged rules/table.toml); TableError if unusable."""
    path = path or PACKAGED_TABLE
    try:
        with path.open("rb") as file:
            raw = tomllib.load(file)
    except OSError as exc:
        raise TableError(f"{path}: cannot read the rules table: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise TableError(f"{path}: not valid TOML: {exc}") from exc
    try:
        parsed = _TableFile.model_validate(raw)
    except ValidationError as exc:
        raise TableError(f"{path}: {_describe(exc, raw)}") from exc
    try:
        return _build(parsed, _load_matrix())
    except TableError as exc:
        raise TableError(f"{path}: {exc}") from exc


@cache
def default_table() -> RulesTable:
    """The packaged table, loaded once."""
    return load_table()


def _describe(exc: ValidationError, raw: dict[str, Any]) -> str:
    """Pydantic's errors, each naming its row (`srv row 12 (4.1.1)`) and field."""
    lines = []
    for error in exc.errors():
        loc = error["loc"]
        where = ".".join(str(part) for part in loc)
        if len(loc) >= 2 and loc[0] in {"srv", "alert"} and isinstance(loc[1], int):
            row = raw[str(loc[0])][loc[1]]
            key = row.get("srv" if loc[0] == "srv" else "code", "?") if isinstance(row, dict) else "?"
            field = ".".join(str(part) for part in loc[2:]) or "row"
            where = f"{loc[0]} row {loc[1] + 1} ({key}): {field}"
        lines.append(f"{where}: {error['msg']}")
    shown = "; ".join(lines[:_ERRORS_SHOWN])
    return shown if len(lines) <= _ERRORS_SHOWN else f"{shown}; and {len(lines) - _ERRORS_SHOWN} more"


def _load_matrix() -> dict[str, dict[str, Any]]:
    rows = json.loads(SRV_MATRIX.read_text(encoding="utf-8"))
    return {row["Service Reference Variant"]: row for row in rows}


def _normalise(text: str) -> str:
    """Collapse whitespace runs (some matrix names contain newlines)."""
    return " ".join(text.split())


def _build(parsed: _TableFile, matrix: Mapping[str, Mapping[str, Any]]) -> RulesTable:
    srvs: dict[str, SrvRule] = {}
    for number, row in enumerate(parsed.srv, start=1):
        where = f"srv row {number} ({row.srv})"
        _check_srv_row(row, where)
        if row.srv in srvs:
            raise TableError(f"{where}: duplicate SRV {row.srv}")
        if row.srv in matrix:
            _check_against_matrix(row, matrix[row.srv], where)
        srvs[row.srv] = SrvRule(
            srv=row.srv,
            service_reference=row.service_reference,
            name=row.name,
            category=row.category,
            critical=row.critical,
            non_device=row.non_device,
            dcc_scheduled=row.dcc_scheduled,
            eligible_roles=frozenset(row.eligible_roles),
            device_types=frozenset(row.device_types),
            device_relationship=row.device_relationship,
            refused_when_flagged=row.refused_when_flagged,
            rationale=row.rationale,
        )
    missing = sorted(set(matrix).union(FLAG_SRVS) - set(srvs), key=_srv_key)
    if missing:
        raise TableError(f"SRVs missing from the table: {', '.join(missing)}")

    alerts: dict[str, AlertRule] = {}
    for number, alert_row in enumerate(parsed.alert, start=1):
        code = alert_row.code.upper()
        where = f"alert row {number} ({alert_row.code})"
        if _ALERT_CODE_RE.fullmatch(code) is None:
            raise TableError(f"{where}: malformed alert code (want 4 hex digits, ADn or Nn)")
        if code in alerts:
            raise TableError(f"{where}: duplicate alert code {code}")
        if alert_row.withheld_when_flagged and alert_row.category in ALWAYS_FLOWING:
            raise TableError(
                f"{where}: a {alert_row.category} alert cannot be withheld_when_flagged "
                "(MP169 lets it through)"
            )
        if alert_row.withheld_when_flagged and alert_row.redacted_when_flagged:
            raise TableError(f"{where}: an alert is withheld_when_flagged or redacted_when_flagged, not both")
        alerts[code] = AlertRule(
            code=code,
            name=alert_row.name,
            category=alert_row.category,
            withheld_when_flagged=alert_row.withheld_when_flagged,
            redacted_when_flagged=alert_row.redacted_when_flagged,
            notify_network_operator=alert_row.notify_network_operator,
            rationale=alert_row.rationale,
        )
    return RulesTable(srvs, alerts)


def _check_srv_row(row: _SrvRow, where: str) -> None:
    if _SRV_RE.fullmatch(row.srv) is None:
        raise TableError(f"{where}: malformed SRV (want digits separated by dots, e.g. 4.8.1)")
    if row.srv != row.service_reference and not row.srv.startswith(f"{row.service_reference}."):
        raise TableError(f"{where}: service_reference {row.service_reference} is not the SRV's prefix")
    if row.refused_when_flagged and (
        row.category in ALWAYS_FLOWING or row.category is Category.CONSUMER_CHOICE_FLAG
    ):
        raise TableError(
            f"{where}: a {row.category} SRV cannot be refused_when_flagged (MP169 lets it through)"
        )
    if not row.device_types:
        raise TableError(f"{where}: device_types is empty (name the device types the SRV may address)")
    if row.srv in FLAG_SRVS and row.category is not Category.CONSUMER_CHOICE_FLAG:
        raise TableError(f"{where}: the flag request must have category {Category.CONSUMER_CHOICE_FLAG}")


def _check_against_matrix(row: _SrvRow, entry: Mapping[str, Any], where: str) -> None:
    expected = {
        "name": _normalise(entry["Service Request Name"]),
        "critical": entry["Critical"] == "Yes",
        "non_device": entry["Non-Device Request"] == "Yes",
        "dcc_scheduled": entry["DCC Scheduled"] == "Yes",
        "eligible_roles": sorted(entry["Eligible User Roles"]),
    }
    actual = {
        "name": _normalise(row.name),
        "critical": row.critical,
        "non_device": row.non_device,
        "dcc_scheduled": row.dcc_scheduled,
        "eligible_roles": sorted(role.value for role in row.eligible_roles),
    }
    for key, value in expected.items():
        if actual[key] != value:
            raise TableError(f"{where}: {key} is {actual[key]!r} but the SRV matrix says {value!r}")


def _srv_key(srv: str) -> tuple[int, ...]:
    return tuple(int(part) for part in srv.split("."))
