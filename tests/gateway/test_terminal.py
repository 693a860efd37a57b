"""Tables fitted to the terminal: whatever the width, every cell is printed whole."""

from __future__ import annotations

import io

from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from gateway.terminal import Column, FittedTable, print_fitted

HEADINGS = ("Requests", "Fwd", "OK", "Failed", "Timeout", "Pending", "Rejected", "Local", "Success")


def printed(spec: FittedTable, width: int) -> str:
    console = Console(record=True, width=width, color_system=None, file=io.StringIO())
    print_fitted(console, spec)
    return console.export_text()


def spec(rows: list[list[str]]) -> FittedTable:
    values = [Column(heading, numeric=True) for heading in HEADINGS]
    return FittedTable("By user", [Column("User")], values, rows)


EUI = "90-B3-D5-1F-30-01-00-00"
NUMBERS = st.integers(0, 10**9).map(lambda n: f"{n:,}")


@given(st.integers(30, 200), st.lists(st.lists(NUMBERS, min_size=9, max_size=9), min_size=1, max_size=4))
def test_no_cell_is_ever_cut(width: int, figures: list[list[str]]) -> None:
    text = printed(spec([[EUI, *row] for row in figures]), width)
    assert "…" not in text
    tokens = text.replace("│", " ").replace("┃", " ").split()
    for row in figures:
        for cell in row:
            assert cell in tokens
    assert all(len(line) <= width for line in text.splitlines())


def test_a_table_that_fits_is_printed_whole() -> None:
    text = printed(spec([[EUI, *["1"] * 9]]), 140)
    assert text.splitlines()[0].rstrip() == "By user"
    assert "(1/" not in text


def test_a_table_too_wide_is_split_repeating_its_keys() -> None:
    text = printed(spec([[EUI, *["9,466"] * 9]]), 80)
    assert "By user (1/2)" in text
    assert "By user (2/2)" in text
    assert text.count(EUI) == 2


def test_a_very_narrow_terminal_gets_one_line_per_figure() -> None:
    text = printed(spec([[EUI, *[str(n) for n in range(9)]]]), 30)
    assert "(1/" not in text
    assert "  Requests: 0\n" in text
    assert "  Success: 8\n" in text
