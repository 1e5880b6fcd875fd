"""Socket errors of the daemon's own sockets: which are a peer's normal end, and how the rest are logged.

Theory of operation
-------------------
A socket call that fails with ``BlockingIOError`` (``EAGAIN``) only means
"not now" and is never an error. Any other ``OSError`` is one of two kinds:

* **The peer is gone.** An app that closed or reset its socket makes our
  sends fail with ``EPIPE``/``ECONNRESET``. Its hang-up (``EPOLLHUP``,
  ``EPOLLRDHUP``, ``EPOLLERR``) is then pending in the reactor, and the
  session ends with a ``client_detached`` line that names why. A line for
  each failed send would only say that again, so these are logged at
  debug level.
* **Anything else.** ``ENOBUFS``/``ENOMEM`` (the kernel is short of
  memory), ``EBADF`` (a bug), or ``EPIPE`` from an app that shut down only
  its *reading* side (``shutdown(SHUT_RD)``): that app never hangs up, so
  its session stays and everything sent to it is lost. These are logged
  as warnings.

The two are told apart at the moment of logging, by asking the kernel
whether the socket has hung up (:func:`kmux.sockbuf.hung_up`, one ``poll`` with no
timeout). A send can fail once per message, so each object that owns a
socket (a session, the server's hellos, the control server) keeps one
:class:`SocketErrors`: every error is counted, the first is logged, then
at most one line per :data:`SOCKET_ERROR_LOG_INTERVAL`, whose
``suppressed`` says how many were not logged since the line before.

Invariant: no ``OSError`` from a socket is dropped without being counted
here or ending something that logs it (a connection's
``connection_failed``, a session's ``client_detached``).
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from kmux.errors import KmuxError
from kmux.sockbuf import hung_up

from kmuxd.system.log import RateLimit

__all__ = ["PEER_GONE_ERRNOS", "SOCKET_ERROR_LOG_INTERVAL", "SocketErrors", "describe_error", "errno_name", "hung_up"]

#: Errnos that mean the peer closed or reset its end.
PEER_GONE_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNABORTED})
#: Seconds between log lines of one object's socket errors (all are counted).
SOCKET_ERROR_LOG_INTERVAL = 10.0


def describe_error(exc: BaseException) -> str:
    """An error as the logs and statistics name it (a connection's ``last_error``)."""
    if isinstance(exc, KmuxError):
        return exc.message
    if isinstance(exc, OSError) and exc.errno:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return repr(exc)


def errno_name(exc: BaseException) -> str:
    """``EPIPE``, ``ECONNRESET``, ... (the exception's class name if it has no errno)."""
    code = getattr(exc, "errno", None)
    if code is None:
        return type(exc).__name__
    return errno.errorcode.get(code, str(code))


class SocketErrors:
    """Socket errors of one owner: all counted, logged at most once per interval."""

    __slots__ = ("log", "event", "count", "_limit")

    def __init__(self, log: Any, event: str, interval: float = SOCKET_ERROR_LOG_INTERVAL) -> None:
        self.log = log
        #: The log event, e.g. ``client_socket_error``.
        self.event = event
        #: Errors since the owner was created.
        self.count = 0
        self._limit = RateLimit(interval)

    def note(self, op: str, exc: OSError, sock: socket.socket | None, now: float | None = None,
             **context: Any) -> None:
        """``op`` (``send``, ``receive``, ...) on ``sock`` failed with ``exc`` (not EAGAIN).

        ``now`` (``time.monotonic()`` by default) is for tests that step the clock.
        """
        self.count += 1
        if not self._limit.allow(now):
            return
        gone = exc.errno in PEER_GONE_ERRNOS and sock is not None and hung_up(sock)
        emit = self.log.debug if gone else self.log.warning
        emit(self.event, op=op, errno=errno_name(exc), error=exc.strerror or str(exc), peer_gone=gone,
             suppressed=self._limit.take_suppressed(), **context)
