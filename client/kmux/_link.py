"""One connected SEQPACKET socket, as the driver sees it: the calls that never block.

The driver (:mod:`kmux._driver`) asks its transport for everything that may
block; what cannot block it calls directly on the connection's link:

* :meth:`SocketLink.recv_nowait`: the next packet if one is queued (the
  receive fast path, and draining a lost connection);
* :meth:`SocketLink.kick`: ``shutdown(SHUT_RDWR)``: a thread or task blocked
  on the socket wakes (reads return what is queued, then 0; sends fail with
  ``EPIPE``), and the daemon sees the end of the session;
* :meth:`SocketLink.unread_bytes` and :meth:`SocketLink.hung_up`: whether
  the daemon has read what we sent, and whether it closed its end
  (``flush``);
* :meth:`SocketLink.close`.

Each transport subclasses it with what its waiting needs (a ``poll``
object; trio's ``notify_closing``).
"""

from __future__ import annotations

import array
import fcntl
import socket
import termios
from typing import Any

from .sockbuf import hung_up

__all__ = ["SocketLink", "MSG_TRUNC"]

#: As a plain int: ``flags & socket.MSG_TRUNC`` goes through enum.IntFlag,
#: which costs microseconds per packet.
MSG_TRUNC = int(socket.MSG_TRUNC)
_DONTWAIT = int(socket.MSG_DONTWAIT)
#: SIOCOUTQ: on a Unix socket, the bytes of packets sent and not yet read by the peer.
_SIOCOUTQ = termios.TIOCOUTQ


class SocketLink:
    """A connected socket; blocking or not, these calls return at once."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_nowait(self, buffers: list[Any]) -> tuple[int, bool] | None:
        """``(nbytes, truncated)`` of the next packet, or None if none is queued. Raises OSError."""
        try:
            n, _, flags, _ = self.sock.recvmsg_into(buffers, 0, _DONTWAIT)
        except BlockingIOError:
            return None
        return n, bool(flags & MSG_TRUNC)

    def unread_bytes(self) -> int:
        """Bytes of our packets the daemon has not read yet (0 also once it closed its end)."""
        out = array.array("i", [0])
        fcntl.ioctl(self.sock.fileno(), _SIOCOUTQ, out, True)
        return out[0]

    def hung_up(self) -> bool:
        """Whether the daemon closed its end (or the socket has an error), without waiting."""
        return hung_up(self.sock)

    def kick(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more, or closed

    def close(self) -> None:
        self.sock.close()
