"""Ctrl-C and SIGTERM stop every broker command promptly, also while the broker is unreachable, and
the interactive ones give up on their own after --connect-timeout. Run in a real pseudo-terminal."""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from simulator.server import free_port
from tests.stores import empty_store
from tests.terminal import Terminal

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.slow

# Longer than any test runs: only the signal can end these commands.
FOREVER = "600"


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("stream")
    for command in (
        ["simulate", "estate", "--premises", "5", "--out", str(folder / "estate")],
        ["simulate", "traffic", "--requests", "20", "--estate", str(folder / "estate"), "--out", "t.jsonl"],
    ):
        subprocess.run([sys.executable, "-m", "gateway.cli", *command], cwd=folder, check=True)
    return folder / "t.jsonl"


@pytest.fixture
def nowhere() -> str:
    """A broker URL nobody listens on."""
    return f"mqtt://127.0.0.1:{free_port()}"


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    started: list[Terminal] = []
    yield started
    for terminal in started:
        terminal.close()


@pytest.fixture
def commands(stream: Path, nowhere: str, tmp_path: Path) -> dict[str, list[str]]:
    """Each broker command, pointed at a broker nobody listens on, run where a store is."""
    empty_store(tmp_path)
    out = tmp_path
    interactive = ["--broker", nowhere, "--connect-timeout", FOREVER]
    return {
        "record": ["record", str(out / "capture.jsonl"), *interactive],
        "simulate devices": ["simulate", "devices", *interactive],
        "replay": ["replay", str(stream), *interactive],
        "demo --broker": ["demo", "--broker", nowhere, "--connect-timeout", FOREVER, "--workdir", "demo"],
        "run": ["run", "--broker", nowhere, "--metrics-port", "0"],
    }


def assert_clean(text: str) -> None:
    assert "Traceback" not in text, text
    assert "KeyboardInterrupt" not in text, text
    assert "Event loop is closed" not in text, text


@pytest.mark.parametrize("name", ["record", "simulate devices", "replay", "demo --broker", "run"])
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_signal_stops_a_command_waiting_for_an_unreachable_broker(
    name: str, how: str, commands: dict[str, list[str]], tmp_path: Path, terminals: list[Terminal]
) -> None:
    argv = commands[name]
    terminal = Terminal.mp169(*argv, cwd=tmp_path)
    terminals.append(terminal)
    # It is retrying: the second attempt failed, so the first wait between attempts was survived.
    terminal.read_until("attempt=2" if name != "run" else '"attempt": 2')
    if how == "ctrl-c":
        terminal.press_ctrl_c()
    else:
        terminal.signal(signal.SIGTERM)
    status = terminal.wait()
    assert status in {0, 130}, terminal.text
    assert_clean(terminal.text)
    assert not (tmp_path / "capture.jsonl").exists()
    if name == "demo --broker":
        assert not (tmp_path / "demo").exists(), "an interrupted demo leaves nothing behind"


@pytest.mark.parametrize("name", ["record", "simulate devices", "replay", "demo --broker"])
def test_an_interactive_command_gives_up_on_an_unreachable_broker(
    name: str, commands: dict[str, list[str]], nowhere: str, tmp_path: Path
) -> None:
    argv = [a if a != FOREVER else "1" for a in commands[name]]
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 3, done.stderr
    assert f"no connection to the broker at {nowhere}" in done.stderr
    assert "is the broker running?" in done.stderr
    assert_clean(done.stderr + done.stdout)
    assert not (tmp_path / "capture.jsonl").exists(), "no empty recording is left"
