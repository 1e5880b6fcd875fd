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

**A departed app's unread packets** (:func:`discard_unread`). An app that
closes its SEQPACKET socket while our notices sit unread in its queue
leaves ``ECONNRESET`` pending on our end. The kernel reports it once, on
the next call, *before* the packets the app had sent and we had not read;
those are still there behind it. So the first ``ECONNRESET`` is taken as
that report and reading goes on: the packets are counted
(``dropped_unread``), never dropped uncounted.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from kmux.sockbuf import hung_up

from kmuxd.system.log import RateLimit

__all__ = ["PEER_GONE_ERRNOS", "SOCKET_ERROR_LOG_INTERVAL", "SocketErrors", "discard_unread", "errno_name", "hung_up"]

#: Errnos that mean the peer closed or reset its end.
PEER_GONE_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNABORTED})
#: Seconds between log lines of one object's socket errors (all are counted).
SOCKET_ERROR_LOG_INTERVAL = 10.0


_MSG_TRUNC_DONTWAIT = int(socket.MSG_TRUNC | socket.MSG_DONTWAIT)
#: Where a discarded packet is "read" to (MSG_TRUNC: its bytes are dropped by the kernel).
_SCRATCH = bytearray(1)


def discard_unread(sock: socket.socket, limit: int) -> int:
    """Read and drop what the peer sent that was never read, at most ``limit`` packets; return how many.

    For a session that is closing: closing a Unix socket with unread
    packets makes the peer's next read fail with ``ECONNRESET``, which
    would hide our final notice and the clean EOF behind it. A pending
    ``ECONNRESET`` (the peer left our packets unread, module docstring) is
    skipped once; EOF, ``EAGAIN`` or any other error ends the count.
    """
    dropped = 0
    reset_seen = False
    while dropped < limit:
        try:
            if not sock.recv_into(_SCRATCH, 1, _MSG_TRUNC_DONTWAIT):
                break
        except ConnectionResetError:
            if reset_seen:
                break
            reset_seen = True  # the kernel's one report that the peer left; its packets follow
            continue
        except OSError:
            break  # EAGAIN: nothing left; anything else: the app is gone and its packets with it
        dropped += 1
    return dropped


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
