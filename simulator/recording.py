"""The recording file format: a request stream, generated or captured live, as JSON Lines.

Line 1 is the header, every further line one item, in time order (docs/simulator.md):

    {"format": "mp169-recording", "version": 1, "created": "2025-01-31T22:00:00+00:00",
     "source": "generated" | "recorded", "topics": [...], "meta": {...}}
    {"t": 0.125, "kind": "publish", "topic": "dsp/in/90-B3-...", "payload": "<base64>",
     "scenario": "daily-read"}
    {"t": 30.0, "kind": "inventory", "rows": [{"device_id": "00-DB-...", ...}],
     "scenario": "change-of-supplier"}

`t` is seconds since the start of the stream (monotonic offsets when recorded live), never
decreasing. `payload` is the exact message bytes, base64. `rows` are inventory CSV rows (the columns
of simulator.estate.INVENTORY_COLUMNS) to upsert at that moment: a Change of Supplier or tariff
change. `scenario` says what a generated item is meant to exercise; it is empty in live recordings.
Readers validate every line and report the first bad one with its line number.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, TextIO

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, field_validator

from gateway.interrupt import unless_stopped
from gateway.transport import Message, Transport, validate_topic

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from pathlib import Path

FORMAT = "mp169-recording"
VERSION = 1


@dataclass(frozen=True, slots=True)
class PublishItem:
    """A message to publish at `t` seconds after the start."""

    t: float
    topic: str
    payload: bytes
    scenario: str = ""


@dataclass(frozen=True, slots=True)
class InventoryChange:
    """Inventory rows to upsert at `t` seconds (Change of Supplier, tariff change)."""

    t: float
    rows: tuple[Mapping[str, str], ...]
    scenario: str = ""


StreamItem = PublishItem | InventoryChange


@dataclass(frozen=True, slots=True)
class RecordingHeader:
    source: str
    created: str
    topics: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Recording:
    header: RecordingHeader
    items: tuple[StreamItem, ...]


class RecordingError(Exception):
    """The file is not a valid recording; the message names the file and line."""


# -- line models (validation) ------------------------------------------------------------------


class _Header(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    format: Literal["mp169-recording"]
    version: Literal[1]
    created: str
    source: str
    topics: list[str] = []
    meta: dict[str, Any] = {}


class _Item(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    t: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    scenario: str = ""


class _PublishLine(_Item):
    kind: Literal["publish"]
    topic: str
    payload: str

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        return validate_topic(value)

    @field_validator("payload")
    @classmethod
    def _base64(cls, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"payload is not base64: {exc}") from exc
        return value


class _InventoryLine(_Item):
    kind: Literal["inventory"]
    rows: Annotated[list[dict[str, str]], Field(min_length=1)]


class _Line(RootModel[Annotated[_PublishLine | _InventoryLine, Field(discriminator="kind")]]):
    pass


def _problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


# -- writing -------------------------------------------------------------------------------------


def _header_line(source: str, topics: Sequence[str], meta: Mapping[str, Any], created: datetime) -> str:
    header = {
        "format": FORMAT,
        "version": VERSION,
        "created": created.isoformat(),
        "source": source,
        "topics": list(topics),
        "meta": dict(meta),
    }
    return json.dumps(header) + "\n"


def item_line(item: StreamItem) -> str:
    """One item as its JSON line (with the newline)."""
    line: dict[str, Any]
    if isinstance(item, PublishItem):
        line = {
            "t": round(item.t, 6),
            "kind": "publish",
            "topic": item.topic,
            "payload": base64.b64encode(item.payload).decode("ascii"),
        }
    else:
        line = {"t": round(item.t, 6), "kind": "inventory", "rows": [dict(row) for row in item.rows]}
    if item.scenario:
        line["scenario"] = item.scenario
    return json.dumps(line) + "\n"


def write_stream(
    items: Iterable[StreamItem],
    path: Path,
    *,
    meta: Mapping[str, Any] | None = None,
    created: datetime | None = None,
) -> int:
    """Write a generated stream as a recording; returns the number of items written."""
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        handle.write(_header_line("generated", (), meta or {}, created or datetime.now(UTC)))
        for item in items:
            handle.write(item_line(item))
            count += 1
    return count


async def record(  # noqa: PLR0913 - what to capture, where, until when, on which clocks
    transport: Transport,
    path: Path,
    topics: Sequence[str] = ("dsp/#",),
    *,
    stop: asyncio.Event,
    echo: Callable[[Message], object] | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    wall: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> int | None:
    """Capture every message on `topics` into `path` until `stop` is set; returns how many.

    `path` is written only once the transport has started, so a broker that is never reached (or a
    `stop` before it is) leaves no file: None is returned then. `echo` sees each message as it is
    captured. The header holds the wall-clock start; each line's `t` is the monotonic offset from it.
    """
    created, start = wall(), monotonic()
    lines: list[str] = []
    """Captured before the file is open (the first messages can arrive while `start` returns)."""
    sink: list[TextIO] = []
    count = 0

    async def capture(message: Message) -> None:
        nonlocal count
        line = item_line(PublishItem(monotonic() - start, message.topic, message.payload))
        if sink:
            sink[0].write(line)
        else:
            lines.append(line)
        count += 1
        if echo is not None:
            echo(message)

    async def started() -> bool:
        await transport.start(list(topics), capture)
        return True

    if not await unless_stopped(started(), stop):
        return None
    try:
        with path.open("w", encoding="utf-8") as handle:
            handle.write(_header_line("recorded", topics, {}, created))
            handle.writelines(lines)
            sink.append(handle)
            await stop.wait()
            await transport.stop()
    finally:
        await transport.stop()
    return count


# -- reading -------------------------------------------------------------------------------------


def read_recording(path: Path) -> Recording:
    """Read and validate a recording; RecordingError names the first bad line."""
    items: list[StreamItem] = []
    header: RecordingHeader | None = None
    last_t = 0.0
    with path.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RecordingError(f"{path}:{number}: not JSON: {exc.msg}") from exc
            if header is None:
                header = _read_header(path, number, data)
                continue
            item = _read_item(path, number, data)
            if item.t < last_t:
                raise RecordingError(f"{path}:{number}: t {item.t} is before the previous line's {last_t}")
            last_t = item.t
            items.append(item)
    if header is None:
        raise RecordingError(f"{path}:1: empty file, expected a {FORMAT} header")
    return Recording(header, tuple(items))


def _read_header(path: Path, number: int, data: object) -> RecordingHeader:
    try:
        header = _Header.model_validate(data)
    except ValidationError as exc:
        raise RecordingError(f"{path}:{number}: not a {FORMAT} v{VERSION} header: {_problem(exc)}") from exc
    return RecordingHeader(header.source, header.created, tuple(header.topics), header.meta)


def _read_item(path: Path, number: int, data: object) -> StreamItem:
    try:
        line = _Line.model_validate(data).root
    except ValidationError as exc:
        raise RecordingError(f"{path}:{number}: {_problem(exc)}") from exc
    if isinstance(line, _PublishLine):
        return PublishItem(line.t, line.topic, base64.b64decode(line.payload), line.scenario)
    return InventoryChange(line.t, tuple(line.rows), line.scenario)
