"""`mp169 demo` as a newcomer meets it: a bad argument is one line, exit 2, and leaves the previous
results alone; Ctrl-C in the middle of a run keeps them too."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from tests.terminal import Terminal

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.slow


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    """A work folder holding the results of an earlier demo."""
    workdir = tmp_path / "demo"
    workdir.mkdir()
    (workdir / "mp169.sqlite3").write_bytes(b"the last demo's store")
    return workdir


def untouched(workdir: Path) -> bool:
    siblings = sorted(path.name for path in workdir.parent.iterdir())
    return (workdir / "mp169.sqlite3").read_bytes() == b"the last demo's store" and siblings == ["demo"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--rules", "/nonexistent.toml"],
            "mp169 demo: --rules: /nonexistent.toml: cannot read the rules table",
        ),
        (["--recording", "/nonexistent.jsonl"], "mp169 demo: --recording: "),
        (["--failure-rate", "2"], "mp169 demo: --failure-rate 2.0, --timeout-rate 0.01: failure_rate and"),
        (
            ["--broker", "http://x"],
            "mp169 demo: --broker http://x: url: Value error, broker.url must look like",
        ),
        (
            ["--save-traffic", "/no/such/dir/t.jsonl"],
            "mp169 demo: --save-traffic /no/such/dir/t.jsonl: no such",
        ),
        (["--premises", "0"], "mp169 demo: --premises and --requests must be at least 1"),
    ],
)
def test_a_bad_argument_is_one_line_and_keeps_the_previous_results(
    arguments: list[str], message: str, previous: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--workdir", str(previous), *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(message), done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stdout == ""
    assert untouched(previous)


def test_ctrl_c_during_a_demo_keeps_the_previous_results(previous: Path) -> None:
    terminal = Terminal.mp169("demo", "--workdir", str(previous), cwd=previous.parent)
    try:
        terminal.read_until("publish")  # the progress bar: the run is under way
        terminal.press_ctrl_c()
        status = terminal.wait()
    finally:
        terminal.close()
    assert status == 130, terminal.text
    assert "interrupted;" in terminal.text
    assert "keeps the previous results" in terminal.text
    assert "Traceback" not in terminal.text
    assert untouched(previous)


def test_a_completed_demo_replaces_the_previous_results(previous: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "demo",
            "--workdir",
            str(previous),
            "--no-progress",
            "--premises",
            "40",
            "--requests",
            "300",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (previous / "mp169.sqlite3").read_bytes().startswith(b"SQLite format 3")
    assert sorted(path.name for path in previous.parent.iterdir()) == ["demo"]
