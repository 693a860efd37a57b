"""The Smart Metering Inventory and the user registry as plain records, and their CSV files.

Pure: parsing takes the CSV text as lines and returns frozen records, or raises one
`InventoryFileError` naming every bad line, so a caller imports a file whole or not at all.

Formats (the stable interface: docs/architecture.md; every column: docs/flags.md):
- inventory: `device_id, device_type, smets, status, comms_hub_id, mpxn, import_supplier,
  export_supplier, gas_supplier, tariff, wan` and the optional `network_operator` (the electricity
  distributor of the premises' MPAN) and `gas_transporter` (the gas transporter of its MPRN), in any
  order, with a header line;
- users: `user_id, roles` with the roles space-separated (`IS GS`).

Every row is validated by a pydantic model, which writes the error messages. A million-row
inventory goes through a hand-written fast path first (the same rules, checked without pydantic);
only a row the fast path does not accept as-is is handed to the model, so both paths give the same
records and the model has the last word.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from rules.domain import (
    ELECTRICITY_DEVICES,
    GAS_DEVICES,
    NOT_A_DEVICE,
    DeviceRecord,
    DeviceStatus,
    DeviceType,
    Eui,
    Role,
    Tariff,
    UserRecord,
    parse_eui,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

INVENTORY_COLUMNS = (
    "device_id",
    "device_type",
    "smets",
    "status",
    "comms_hub_id",
    "mpxn",
    "import_supplier",
    "export_supplier",
    "gas_supplier",
    "tariff",
    "wan",
)
OPTIONAL_INVENTORY_COLUMNS = ("network_operator", "gas_transporter")
USERS_COLUMNS = ("user_id", "roles")
MAX_MPXN_LENGTH = 32


@dataclass(frozen=True, slots=True)
class LineProblem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class InventoryFileError(Exception):
    """A CSV file with bad lines; `problems` names every one. Nothing from the file may be imported."""

    def __init__(self, problems: Sequence[LineProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


# -- validation models: the rules, and the messages ------------------------------------------------


def _blank_to_none(value: Any) -> Any:
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


def _eui(value: Any) -> Any:
    return parse_eui(value.strip()) if isinstance(value, str) else value


def _optional_eui(value: Any) -> Any:
    return _eui(_blank_to_none(value))


def _choice(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def _smets(value: Any) -> Any:
    text = str(value).strip()
    if text not in _SMETS:
        raise ValueError(f"smets must be 1 or 2, not {value!r}")
    return _SMETS[text]


def _yes_no(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in {"yes", "no"}:
        raise ValueError(f"wan must be yes or no, not {value!r}")
    return text == "yes"


def _roles(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    names = value.split()
    if not names:
        raise ValueError("at least one role is needed (IS ES GS ED GT RSA OU)")
    unknown = [name for name in names if name not in _ROLE_NAMES]
    if unknown:
        raise ValueError(f"unknown role {' '.join(unknown)!r}: roles are IS ES GS ED GT RSA OU")
    return frozenset(Role(name) for name in names)


_ROLE_NAMES = frozenset(role.value for role in Role)

_EuiField = Annotated[str, BeforeValidator(_eui)]
_OptionalEuiField = Annotated[str | None, BeforeValidator(_optional_eui)]


class _DeviceRow(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device_id: _EuiField
    device_type: Annotated[DeviceType, BeforeValidator(_choice)]
    smets: Annotated[int, BeforeValidator(_smets)]
    status: Annotated[DeviceStatus, BeforeValidator(_choice)]
    comms_hub_id: _OptionalEuiField
    mpxn: Annotated[str | None, BeforeValidator(_blank_to_none)]
    import_supplier: _OptionalEuiField
    export_supplier: _OptionalEuiField
    gas_supplier: _OptionalEuiField
    tariff: Annotated[Tariff, BeforeValidator(_choice)]
    wan: Annotated[bool, BeforeValidator(_yes_no)]
    network_operator: _OptionalEuiField = None
    gas_transporter: _OptionalEuiField = None

    @model_validator(mode="after")
    def _consistent(self) -> _DeviceRow:
        if self.mpxn is not None and len(self.mpxn) > MAX_MPXN_LENGTH:
            raise ValueError(f"mpxn is longer than {MAX_MPXN_LENGTH} characters")
        if self.device_type in ELECTRICITY_DEVICES and self.gas_supplier is not None:
            raise ValueError(f"an {self.device_type} has no gas_supplier (a column shifted?)")
        if self.device_type in GAS_DEVICES and (self.import_supplier or self.export_supplier):
            raise ValueError(f"a {self.device_type} has no import or export supplier (a column shifted?)")
        if self.comms_hub_id == self.device_id:
            raise ValueError("a device is not its own comms hub")
        if NOT_A_DEVICE in {self.device_id, self.comms_hub_id}:
            raise ValueError(f"{NOT_A_DEVICE} is not a Device ID")
        return self

    def record(self) -> DeviceRecord:
        return DeviceRecord(
            device_id=Eui(self.device_id),
            device_type=self.device_type,
            smets=self.smets,
            status=self.status,
            comms_hub_id=_as_eui(self.comms_hub_id),
            mpxn=self.mpxn,
            import_supplier=_as_eui(self.import_supplier),
            export_supplier=_as_eui(self.export_supplier),
            gas_supplier=_as_eui(self.gas_supplier),
            tariff=self.tariff,
            wan=self.wan,
            network_operator=_as_eui(self.network_operator),
            gas_transporter=_as_eui(self.gas_transporter),
        )


class _UserRow(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    user_id: _EuiField
    roles: Annotated[frozenset[Role], BeforeValidator(_roles)]

    def record(self) -> UserRecord:
        return UserRecord(Eui(self.user_id), self.roles)


def _as_eui(value: str | None) -> Eui | None:
    return None if value is None else Eui(value)


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        message = str(item["msg"]).removeprefix("Value error, ")
        field = ".".join(str(part) for part in item["loc"])
        parts.append(f"{field}: {message}" if field else message)
    return "; ".join(parts)


# -- the fast path: the same rules without pydantic, for files of a million rows --------------------

_CANONICAL_EUI = re.compile(r"[0-9A-F]{2}(?:-[0-9A-F]{2}){7}")
_DEVICE_TYPES = {member.value: member for member in DeviceType}
_STATUSES = {member.value: member for member in DeviceStatus}
_TARIFFS = {member.value: member for member in Tariff}
_WAN = {"yes": True, "no": False}
_SMETS = {"1": 1, "2": 2}


class _FastDevices:
    """Accepts a row only when it is already in canonical form and valid; None sends it to the model.

    EUIs of suppliers, comms hubs and network operators repeat a lot: each distinct text is checked
    once and its string shared by every record that names it.
    """

    def __init__(self) -> None:
        self._euis: dict[str, Eui] = {}

    def _optional_eui(self, text: str) -> Eui | None:
        if not text:
            return None
        known = self._euis.get(text)
        if known is None:
            if _CANONICAL_EUI.fullmatch(text) is None:
                raise _NotCanonicalError
            known = self._euis[text] = Eui(text)
        return known

    def device(self, row: dict[str, str]) -> DeviceRecord | None:
        try:
            device_id = row["device_id"]
            device_type = _DEVICE_TYPES[row["device_type"]]
            comms_hub = self._optional_eui(row["comms_hub_id"])
            mpxn = row["mpxn"] or None
            import_supplier = self._optional_eui(row["import_supplier"])
            export_supplier = self._optional_eui(row["export_supplier"])
            gas_supplier = self._optional_eui(row["gas_supplier"])
            network_operator = self._optional_eui(row.get("network_operator", ""))
            gas_transporter = self._optional_eui(row.get("gas_transporter", ""))
            record = DeviceRecord(
                device_id=Eui(device_id),
                device_type=device_type,
                smets=_SMETS[row["smets"]],
                status=_STATUSES[row["status"]],
                comms_hub_id=comms_hub,
                mpxn=mpxn,
                import_supplier=import_supplier,
                export_supplier=export_supplier,
                gas_supplier=gas_supplier,
                tariff=_TARIFFS[row["tariff"]],
                wan=_WAN[row["wan"]],
                network_operator=network_operator,
                gas_transporter=gas_transporter,
            )
        except (KeyError, _NotCanonicalError):
            return None
        # The model's cross-field rules, as cheap checks; anything doubtful goes to the model.
        if (
            _CANONICAL_EUI.fullmatch(device_id) is None
            or (mpxn is not None and (len(mpxn) > MAX_MPXN_LENGTH or mpxn != mpxn.strip()))
            or (device_type in ELECTRICITY_DEVICES and gas_supplier is not None)
            or (device_type in GAS_DEVICES and (import_supplier or export_supplier))
            or comms_hub == device_id
            or NOT_A_DEVICE in {device_id, comms_hub}
        ):
            return None
        return record


class _NotCanonicalError(Exception):
    """Internal: the row is not in canonical form; the pydantic model decides."""


# -- the files ---------------------------------------------------------------------------------------


def _rows(
    lines: Iterable[str], required: Sequence[str], optional: Sequence[str], problems: list[LineProblem]
) -> Iterable[tuple[int, dict[str, str]]]:
    """(line number, {column: text}) for each data row; header and shape problems go to `problems`."""
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        problems.append(LineProblem(1, f"empty file: expected a header line {','.join(required)}"))
        return
    columns = [name.strip() for name in header]
    missing = [name for name in required if name not in columns]
    unknown = [name for name in columns if name not in required and name not in optional]
    duplicated = sorted({name for name in columns if columns.count(name) > 1})
    if missing or unknown or duplicated:
        words = []
        if missing:
            words.append(f"missing column(s) {', '.join(missing)}")
        if unknown:
            words.append(f"unknown column(s) {', '.join(unknown)}")
        if duplicated:
            words.append(f"repeated column(s) {', '.join(duplicated)}")
        problems.append(LineProblem(reader.line_num, f"bad header: {'; '.join(words)}"))
        return
    width = len(columns)
    for fields in reader:
        if not fields:  # a blank line
            continue
        if len(fields) != width:
            problems.append(
                LineProblem(reader.line_num, f"expected {width} fields as in the header, found {len(fields)}")
            )
            continue
        yield reader.line_num, dict(zip(columns, fields, strict=True))


def parse_inventory(lines: Iterable[str]) -> list[DeviceRecord]:
    """Inventory CSV lines -> records; InventoryFileError lists every bad line (and nothing is returned)."""
    problems: list[LineProblem] = []
    records: list[DeviceRecord] = []
    first_line: dict[str, int] = {}
    fast = _FastDevices()
    for line, row in _rows(lines, INVENTORY_COLUMNS, OPTIONAL_INVENTORY_COLUMNS, problems):
        record = fast.device(row)
        if record is None:
            try:
                record = _DeviceRow.model_validate(row).record()
            except ValidationError as exc:
                problems.append(LineProblem(line, _describe(exc)))
                continue
        seen = first_line.setdefault(record.device_id, line)
        if seen != line:
            problems.append(LineProblem(line, f"device {record.device_id} is already on line {seen}"))
            continue
        records.append(record)
    if problems:
        raise InventoryFileError(problems)
    return records


def parse_users(lines: Iterable[str]) -> list[UserRecord]:
    """Users CSV lines -> records; InventoryFileError lists every bad line (and nothing is returned)."""
    problems: list[LineProblem] = []
    records: list[UserRecord] = []
    first_line: dict[str, int] = {}
    for line, row in _rows(lines, USERS_COLUMNS, (), problems):
        try:
            record = _UserRow.model_validate(row).record()
        except ValidationError as exc:
            problems.append(LineProblem(line, _describe(exc)))
            continue
        seen = first_line.setdefault(record.user_id, line)
        if seen != line:
            problems.append(LineProblem(line, f"user {record.user_id} is already on line {seen}"))
            continue
        records.append(record)
    if problems:
        raise InventoryFileError(problems)
    return records


def inventory_row(record: DeviceRecord) -> dict[str, str]:
    """A record as an inventory CSV row (the inverse of parsing)."""
    return {
        "device_id": record.device_id,
        "device_type": record.device_type.value,
        "smets": str(record.smets),
        "status": record.status.value,
        "comms_hub_id": _text(record.comms_hub_id),
        "mpxn": _text(record.mpxn),
        "import_supplier": _text(record.import_supplier),
        "export_supplier": _text(record.export_supplier),
        "gas_supplier": _text(record.gas_supplier),
        "tariff": record.tariff.value,
        "wan": "yes" if record.wan else "no",
        "network_operator": _text(record.network_operator),
        "gas_transporter": _text(record.gas_transporter),
    }


def _text(value: str | None) -> str:
    return value or ""
