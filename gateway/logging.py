"""structlog configuration: one JSON object per line (or, on a terminal, one human-readable line),
filtered by level before any work is done. The daemon always logs JSON (for log collectors); the
interactive commands log for a person when stderr is a terminal.

Per-request events are logged at debug level; with the filtering bound logger a debug call at info
level is a no-op method, so the hot path pays nothing for them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _StderrLogger:
    """Writes each line to the current sys.stderr, looked up per line: a stream bound at configuration
    time may be replaced and closed later (test capture, daemonisers), and a log line must never raise
    into the task that logs it (a dead MQTT supervisor would stop reconnecting)."""

    def __init__(self, *_: object) -> None:
        pass

    def msg(self, message: str) -> None:
        with contextlib.suppress(ValueError, OSError):
            print(message, file=sys.stderr, flush=True)  # noqa: T201 - this is the log sink

    log = debug = info = warn = warning = err = error = critical = exception = failure = fatal = msg


def configure_logging(level: str = "info", *, stream: TextIO | None = None, json: bool | None = None) -> None:
    """Logs go to `stream`, by default stderr (stdout is for command output such as `--json`).

    json None: JSON unless the stream is a terminal.
    """
    if json is None:
        target = stream or sys.stderr
        json = not (hasattr(target, "isatty") and target.isatty())
    # gmqtt logs every reconnect attempt through the standard library at INFO/WARNING; our transport
    # logs those as structured events already.
    logging.getLogger("gmqtt").setLevel(logging.ERROR)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream) if stream else _StderrLogger,
        cache_logger_on_first_use=True,
    )
