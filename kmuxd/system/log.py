"""Logging: structlog, human on a terminal, JSON lines otherwise.

Events are short snake_case names with key/value context (``group=``,
``conn=``, ``error_code=``). Under systemd the same keys become indexed
journal fields (GROUP=, CONN=, CLIENT_PID=, ERROR_CODE=), key events carry a
MESSAGE_ID= and levels map to PRIORITY=. Repeated failures are thinned by
:class:`RateLimit`, so a flapping endpoint cannot flood the journal, and the
per-client lines (``client_attached``, ``client_detached``) by
:class:`LineBudget`, so a reconnect storm of 10,000 apps costs neither the
journal nor the daemon's CPU 20,000 lines: a line costs about as much CPU as
the rest of the client's connect, hello and close together.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import structlog

__all__ = ["configure", "get_logger", "LineBudget", "RateLimit"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


#: MESSAGE_ID= for the events operators search the journal for
#: (``journalctl MESSAGE_ID=...``); stable across versions.
MESSAGE_IDS = {
    "ready": "5f0c3e2a9b4d4a0f8e51d6c7b2a91e01",
    "stopping": "5f0c3e2a9b4d4a0f8e51d6c7b2a91e02",
    "group_up": "5f0c3e2a9b4d4a0f8e51d6c7b2a91e03",
    "group_retired": "5f0c3e2a9b4d4a0f8e51d6c7b2a91e04",
    "connection_failed": "5f0c3e2a9b4d4a0f8e51d6c7b2a91e05",
    "dial_failed": "5f0c3e2a9b4d4a0f8e51d6c7b2a91e06",
    "reload_applied": "5f0c3e2a9b4d4a0f8e51d6c7b2a91e07",
    "reload_refused": "5f0c3e2a9b4d4a0f8e51d6c7b2a91e08",
    "watchdog_check_failed": "5f0c3e2a9b4d4a0f8e51d6c7b2a91e09",
}
#: Context keys that become indexed journal fields of their own.
JOURNAL_FIELDS = {"group": "GROUP", "conn": "CONN", "client_pid": "CLIENT_PID", "error_code": "ERROR_CODE",
                  "client": "CLIENT_ID", "endpoint": "ENDPOINT"}
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def under_journald(stream) -> bool:
    """systemd's test: $JOURNAL_STREAM names the device:inode of our stderr."""
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False  # no descriptor to compare (closed, or not a real file): not journald's stream
    return expected == f"{st.st_dev}:{st.st_ino}"


class JournalRenderer:
    """Send each event to journald with indexed fields; return nothing to print."""

    def __init__(self) -> None:
        from systemd import journal

        self._send = journal.send

    def __call__(self, logger, method_name, event_dict):
        event = event_dict.pop("event")
        level = event_dict.pop("level", method_name)
        event_dict.pop("timestamp", None)
        fields = {"PRIORITY": str(_PRIORITY.get(level, 6)), "SYSLOG_IDENTIFIER": "kmuxd", "KMUX_EVENT": event}
        if event in MESSAGE_IDS:
            fields["MESSAGE_ID"] = MESSAGE_IDS[event]
        for key, name in JOURNAL_FIELDS.items():
            if event_dict.get(key) is not None:
                fields[name] = str(event_dict[key])
        # A key without a value (suppressed=None: nothing was) is left out of the line, as JSON cannot.
        text = " ".join(f"{k}={v}" for k, v in event_dict.items() if v is not None)
        self._send(f"{event} {text}".rstrip(), **fields)
        raise structlog.DropEvent


def configure(fmt: str = "auto", level: str = "info", stream=None) -> None:
    """``auto``: journald when systemd connected our stderr to it, console on a terminal, JSON otherwise."""
    stream = stream or sys.stderr
    if fmt == "auto":
        if under_journald(stream):
            fmt = "journal"
        else:
            fmt = "console" if stream.isatty() else "json"
    if fmt == "journal":
        renderer = JournalRenderer()
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
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


class LineBudget:
    """At most ``rate`` lines per second, in bursts of up to ``rate``; count the rest.

    A token bucket: the everyday trickle of clients is logged line by line,
    a storm is logged at ``rate`` and the lines not logged are counted
    (:meth:`take_suppressed`: the next line carries the count). ``rate`` 0
    lets every line through.
    """

    __slots__ = ("rate", "tokens", "_last", "suppressed")

    def __init__(self, rate: int, now: float | None = None) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self._last = time.monotonic() if now is None else now
        self.suppressed = 0

    def allow(self, now: float) -> bool:
        rate = self.rate
        if rate <= 0:
            return True
        tokens = min(float(rate), self.tokens + (now - self._last) * rate)
        self._last = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int | None:
        """Lines not logged since the last call (None: none, so a log line can leave the key out)."""
        n, self.suppressed = self.suppressed, 0
        return n or None
