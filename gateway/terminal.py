"""Tables for the terminal that never cut a cell, whatever its width.

rich squeezes a table wider than the terminal and cuts cells with an ellipsis (`9,4…`, `E0815…`). A
figure cut that way is wrong, so a table is printed whole only if it fits at its natural width;
otherwise its value columns are split across several tables that each fit, every one repeating the
key columns (the row's names); and if that takes more than three tables, each row is printed as
lines of `heading: value`, which the terminal wraps without losing a character.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.table import Table

# A table split into more parts than this is harder to read than its rows printed as lines.
_MAX_PARTS = 3

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rich.console import Console


@dataclass(frozen=True, slots=True)
class Column:
    heading: str
    numeric: bool = False
    """Right-justified and never wrapped; a text column may wrap (folding, so no character is lost)."""


@dataclass(frozen=True, slots=True)
class FittedTable:
    title: str
    keys: Sequence[Column]
    """The columns that name a row; repeated in every part of a split table."""
    values: Sequence[Column]
    rows: Sequence[Sequence[str]]
    """Each row: the key cells, then the value cells."""
    bold_last_row: bool = False


def _table(spec: FittedTable, title: str, value_indexes: Sequence[int]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in spec.keys:
        table.add_column(column.heading, overflow="fold")
    for index in value_indexes:
        column = spec.values[index]
        if column.numeric:
            table.add_column(column.heading, justify="right", no_wrap=True)
        else:
            table.add_column(column.heading, overflow="fold")
    width = len(spec.keys)
    for number, row in enumerate(spec.rows):
        cells = [*row[:width], *(row[width + index] for index in value_indexes)]
        bold = spec.bold_last_row and number == len(spec.rows) - 1
        table.add_row(*cells, style="bold" if bold else None)
    return table


# Wide enough for any table: measured within the terminal's width, rich reports at most that width.
_UNBOUNDED = 100_000


def _fits(console: Console, table: Table) -> bool:
    natural = console.measure(table, options=console.options.update_width(_UNBOUNDED)).maximum
    return natural <= console.width


def _split(console: Console, spec: FittedTable) -> list[list[int]] | None:
    """Value columns in as few groups as fit, as even as fit; None if that takes more than _MAX_PARTS."""
    groups: list[list[int]] = []
    for index in range(len(spec.values)):
        if groups and _fits(console, _table(spec, spec.title, [*groups[-1], index])):
            groups[-1].append(index)
        elif len(groups) < _MAX_PARTS and _fits(console, _table(spec, spec.title, [index])):
            groups.append([index])
        else:
            return None
    size = -(-len(spec.values) // len(groups))
    even = [
        list(range(start, min(start + size, len(spec.values)))) for start in range(0, len(spec.values), size)
    ]
    if len(even) == len(groups) and all(_fits(console, _table(spec, spec.title, group)) for group in even):
        return even
    return groups


def print_fitted(console: Console, spec: FittedTable) -> None:
    """Print `spec` as one table if it fits, split into tables that fit, or as lines per row."""
    everything = list(range(len(spec.values)))
    if _fits(console, _table(spec, spec.title, everything)):
        console.print(_table(spec, spec.title, everything))
        return
    groups = _split(console, spec)
    if groups is not None:
        for part, group in enumerate(groups, start=1):
            console.print(_table(spec, f"{spec.title} ({part}/{len(groups)})", group))
        return
    console.print(spec.title, style="italic")
    width = len(spec.keys)
    for row in spec.rows:
        if width:
            console.print(" · ".join(row[:width]), style="bold", overflow="fold")
        for column, cell in zip(spec.values, row[width:], strict=True):
            console.print(f"  {column.heading}: {cell}", overflow="fold")
