"""Logging: structlog, human on a terminal, JSON lines otherwise.

Events are short snake_case names with key/value context (``group=``,
``conn=``, ``error_code=``), so the journald issue can map the same keys to
indexed fields. Repeated failures are thinned by :class:`RateLimit`.
"""

from __future__ import annotations

import logging
import sys
import time

import structlog

__all__ = ["configure", "get_logger", "RateLimit"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(fmt: str = "auto", level: str = "info", stream=None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer(sort_keys=False)
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
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**context):
    return structlog.get_logger("kmuxd").bind(**context)


class RateLimit:
    """Let an event through at most once per ``interval`` seconds; count the rest.

    A flapping endpoint fails many times a second; operators need the first
    failure, then a periodic line that says how many were suppressed.
    """

    __slots__ = ("interval", "_last", "suppressed")

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last = -1e18
        self.suppressed = 0

    def allow(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now - self._last >= self.interval:
            self._last = now
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n
