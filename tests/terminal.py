"""Run `mp169` in a real pseudo-terminal, as a person at a shell does, and press Ctrl-C.

The child is a session leader with the pty as its controlling terminal, so the ^C byte written to
the master makes the terminal driver send SIGINT to it, exactly as a keyboard does.
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

# Turns a hang into a failure; never a measure of speed.
GUARD_SECONDS = 60.0
CTRL_C = b"\x03"


class Terminal:
    def __init__(self, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str] | None = None) -> None:
        environment = {**os.environ, "COLUMNS": "100", **(env or {})}
        pid, fd = pty.fork()
        if pid == 0:  # the child: becomes the command
            try:
                os.chdir(cwd)
                os.execvpe(argv[0], list(argv), environment)
            finally:
                os._exit(127)
        self.pid = pid
        self.fd = fd
        self.output = b""
        self.status: int | None = None

    @classmethod
    def mp169(cls, *args: str, cwd: Path, env: Mapping[str, str] | None = None) -> Terminal:
        return cls([sys.executable, "-m", "gateway.cli", *args], cwd=cwd, env=env)

    def read_until(self, text: str, seconds: float = GUARD_SECONDS) -> str:
        """Everything printed so far once `text` appeared; AssertionError if it does not in time."""
        deadline = time.monotonic() + seconds
        while text.encode() not in self.output:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                message = f"{text!r} did not appear; the terminal shows:\n{self.text}"
                raise AssertionError(message)
        return self.text

    def press_ctrl_c(self) -> None:
        os.write(self.fd, CTRL_C)

    def signal(self, signum: signal.Signals) -> None:
        os.kill(self.pid, signum)

    def wait(self, seconds: float = GUARD_SECONDS) -> int:
        """The exit status (negative: killed by that signal), reading the output until it exits."""
        deadline = time.monotonic() + seconds
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                self.kill()
                message = f"still running after {seconds} s; the terminal shows:\n{self.text}"
                raise AssertionError(message)
            self._read(0.05)
        while self._read(0.05):
            pass
        return self.status

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self.status = -signal.SIGKILL

    def close(self) -> None:
        if self.status is None:
            self.kill()
        with contextlib.suppress(OSError):
            os.close(self.fd)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace").replace("\r\n", "\n")

    def _read(self, seconds: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], max(seconds, 0))
        if not ready:
            return False
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.output += chunk
        return bool(chunk)
