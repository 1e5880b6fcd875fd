"""One connected SEQPACKET socket, as the driver sees it: a transport's link.

The driver (:mod:`kmux._driver`) asks its transport for everything that may
block, with requests; a few calls it makes directly on the connection's
link, which the transport made:

* the fast lane (the driver's "The fast lane"): ``send_packet`` and
  ``recv_into``, the socket's own calls, one system call each on the
  common path. The blocking link's block (a send for room, a receive up
  to the bound the link keeps in ``wait``), trio's never do;
* :meth:`SocketLink.recv_nowait`: the next packet if one is queued
  (draining a lost connection);
* :meth:`SocketLink.kick`: ``shutdown(SHUT_RDWR)``: a thread or task blocked
  on the socket wakes (reads return what is queued, then 0; sends fail with
  ``EPIPE``), and the daemon sees the end of the session;
* :meth:`SocketLink.unread_bytes` and :meth:`SocketLink.hung_up`: whether
  the daemon has read what we sent, and whether it closed its end
  (``flush``);
* :meth:`SocketLink.close`.

Receiving is one plain ``recv_into`` into the session's receive buffer
(kind byte, then the message), which returns the packet's size. The buffer
has a spare byte (:mod:`kmux._session`, "Receiving"), so a packet cut
short is one that fills it: no ``recvmsg`` and no ``MSG_TRUNC`` flag,
whose argument parsing alone costs more per packet than the session's
classification (instructions counted with valgrind; docs/benchmark.md).
"""

from __future__ import annotations

import array
import fcntl
import socket
import termios
from typing import Any

from .sockbuf import hung_up

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # not a dependency: mypyc reads the decorator when it compiles, Python needs only a name

    def mypyc_attr(*args: Any, **kwargs: Any) -> Any:  # type: ignore[no-redef,misc]
        return lambda cls: cls

__all__ = ["SocketLink", "SEND_FLAGS"]

#: As plain ints: an enum.IntFlag costs microseconds per packet.
_DONTWAIT = int(socket.MSG_DONTWAIT)
#: Every send: a daemon gone away is EPIPE, never SIGPIPE.
SEND_FLAGS = int(socket.MSG_NOSIGNAL)
#: SIOCOUTQ: on a Unix socket, the bytes of packets sent and not yet read by the peer.
_SIOCOUTQ = termios.TIOCOUTQ


@mypyc_attr(allow_interpreted_subclasses=True)  # trio's link subclasses it, not compiled
class SocketLink:
    """A connected socket. A transport subclasses it with ``set_wait``, ``recv_packet`` and what its waiting needs.

    The calls that run per message are the socket's own bound methods, not
    wrappers:

    * ``send_packet(packet, send_flags)``: ``send``, blocking or not as the
      transport made the socket: one packet. Raises OSError; if it raises,
      nothing was sent (SEQPACKET sends are atomic).
    * ``recv_into(buffer)``: the next packet into ``buffer``, its size.
      Waits at most :attr:`wait` seconds (None: as long as it takes; 0:
      not at all), then raises BlockingIOError.

    ``set_wait(timeout)`` makes ``recv_into`` wait at most ``timeout``; False
    if it cannot, and ``recv_packet(buffer, timeout)`` then does the same
    as ``recv_into`` with that bound, in more calls (its size, or None if
    no packet came).
    """

    __slots__ = ("sock", "send_packet", "recv_into", "wait", "send_flags")

    def __init__(self, sock: socket.socket, wait: float | None) -> None:
        self.sock = sock
        #: The flags every ``send_packet`` takes. A slot, not a class
        #: attribute: CPython 3.11 specializes the load of a slot, not of a
        #: class attribute read through an instance (a type lookup per message).
        self.send_flags: int = SEND_FLAGS
        self.send_packet: Any = sock.send
        self.recv_into: Any = sock.recv_into
        #: How long ``recv_into`` waits now (None: as long as it takes).
        self.wait: float | None = wait

    def set_wait(self, timeout: float | None) -> bool:
        """Make ``recv_into`` wait at most ``timeout``; False if this link cannot (the transport's say)."""
        raise NotImplementedError

    def recv_packet(self, buffer: Any, timeout: float | None) -> int | None:
        """``recv_into`` bounded by ``timeout``, in more calls; the packet's size, or None if none came."""
        raise NotImplementedError

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_nowait(self, buffer: Any) -> int | None:
        """The size of the next packet, received into ``buffer``; None if none is queued. Raises OSError."""
        try:
            return self.sock.recv_into(buffer, 0, _DONTWAIT)
        except BlockingIOError:
            return None

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
