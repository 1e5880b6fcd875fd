"""How large one SEQPACKET packet may be, and the socket buffers that decide it.

Theory of operation
-------------------
On Linux a ``SOCK_SEQPACKET`` packet must fit the *sender's* send buffer:
``send`` fails with ``EMSGSIZE`` when ``len > sk_sndbuf - 32``. An
unprivileged process may raise ``SO_SNDBUF`` only up to
``net.core.wmem_max`` (the kernel stores twice the value asked for), and a
stock kernel has ``wmem_max = 212992``, so about 416 KiB is the largest
packet there. Messages larger than that travel as several packets with the
continuation bit (:data:`kmux.protocol.KIND_MORE`), the way KCM's SEQPACKET
sockets let one message span ``sendmsg`` calls until ``MSG_EOR``.

Both ends size their sockets with :func:`size_send_buffer`, which asks for
what ``max_message`` needs, lets the kernel cap it, and returns the largest
packet the socket will really take. Nothing here raises on a capped buffer:
a smaller buffer only means more pieces per large message.

:func:`hung_up` asks the kernel, without waiting, whether the peer has
closed its end (both ends use it: the daemon to tell a peer that left from
a socket error, the client's ``flush`` to tell "read" from "dropped").

Tests can force the stock limit without root: ``$KMUX_WMEM_MAX`` overrides
what :func:`wmem_max` reads, and every buffer request is capped by it, so
the kernel refuses larger packets exactly as on a stock machine.
"""

from __future__ import annotations

import os
import select
import socket
from pathlib import Path

__all__ = ["STOCK_WMEM_MAX", "WMEM_MAX_ENV", "PACKET_OVERHEAD", "wmem_max", "forget_wmem_max", "size_send_buffer", "max_packet",
           "hung_up"]

#: ``net.core.wmem_max`` of a stock Linux kernel.
STOCK_WMEM_MAX = 212992
#: Environment variable that caps every send buffer request (tests, or an
#: operator who wants to see how kmux behaves on a stock kernel).
WMEM_MAX_ENV = "KMUX_WMEM_MAX"
#: The kernel refuses a packet over ``sk_sndbuf - 32``; we keep a little more.
PACKET_OVERHEAD = 64


#: ``/proc/sys/net/core/wmem_max`` as read once per process (see :func:`wmem_max`).
_proc_wmem_max: int | None = None


def wmem_max() -> int:
    """The largest ``SO_SNDBUF`` an unprivileged process may ask for.

    ``$KMUX_WMEM_MAX`` if set, else ``/proc/sys/net/core/wmem_max``, else the
    stock value. The file is read once per process, because the daemon asks
    at every hello and a read costs more than the rest of the hello's
    buffer sizing; :func:`forget_wmem_max` makes the next call read it again
    (the daemon does so at reload).
    """
    global _proc_wmem_max
    override = os.environ.get(WMEM_MAX_ENV)
    if override:
        return max(4096, int(override))
    if _proc_wmem_max is None:
        try:
            _proc_wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
        except (OSError, ValueError):
            _proc_wmem_max = STOCK_WMEM_MAX
    return _proc_wmem_max


def forget_wmem_max() -> None:
    """Read ``net.core.wmem_max`` afresh at the next :func:`wmem_max` call."""
    global _proc_wmem_max
    _proc_wmem_max = None


def max_packet(sock: socket.socket) -> int:
    """The largest packet, kind byte included, that ``sock`` can send now."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - PACKET_OVERHEAD


def size_send_buffer(sock: socket.socket, want_packet: int) -> int:
    """Ask for a send buffer that carries ``want_packet`` bytes in one packet.

    The request is capped at :func:`wmem_max` (the kernel would cap it
    anyway, unless the process has ``CAP_NET_ADMIN``; capping here keeps
    ``$KMUX_WMEM_MAX`` honest for root too). Returns the largest packet the
    socket takes afterwards, which may be less than ``want_packet``.
    """
    # The kernel doubles the value asked for; ask for half of what is needed.
    ask = min((want_packet + PACKET_OVERHEAD + 1) // 2 + 1, wmem_max())
    try:
        if ask * 2 > sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, ask)
    except OSError:
        pass
    return max_packet(sock)


#: The peer hung up, or the socket has a pending error.
_HUNG_UP = select.POLLHUP | select.POLLRDHUP | select.POLLERR


def hung_up(sock: socket.socket) -> bool:
    """Whether the peer has hung up (or the socket has a pending error), without waiting."""
    try:
        fd = sock.fileno()
    except OSError:
        return True
    if fd < 0:
        return True  # closed already
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    return any(events & _HUNG_UP for _, events in poller.poll(0))
