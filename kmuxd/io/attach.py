"""A group's attached connections: TCP sockets an app dialled and passed in (op ``attach``).

Theory of operation
-------------------
The control server receives the descriptor (``SCM_RIGHTS``) and hands it
here with the attacher's credentials. :func:`adopt` wraps it as a socket;
:func:`read_facts` reads what :func:`kmuxd.core.attach.check_descriptor`
decides on (``SO_DOMAIN``, ``SO_TYPE``, ``SO_PROTOCOL``, ``SO_ACCEPTCONN``,
``getpeername``, ``SIOCINQ``). Whoever may attach was decided before
(:func:`kmuxd.core.attach.may_attach`). A refused descriptor is closed
here at once, on every path: the descriptor table of the daemon is back
where it was after every refusal.

An accepted socket gets the group's post-connect options (``mark``,
``tos``, ``congestion``, ``tcp_notsent_lowat``, then ``TCP_NODELAY`` and
keepalive as a dialled one: :meth:`SocketPlan.apply_connected`), is made
non-blocking and becomes the live connection of a new :class:`Slot` whose
endpoint is an :class:`~kmuxd.core.attach.AttachedPeer` (the peer's
address, the attacher's uid and pid). From then on it carries traffic
like a dialled connection (the same Conn: atomic writes, steering,
salvage, statistics). It is never redialled: when it ends, its slot closes
and moves to the group's removed slots (its totals stay the group's).

``unattach`` retires it (nothing new is written on it; queued messages
are written), waits up to ``unattach_timeout`` for the answers owed on it,
then closes the daemon's copy; answers still owed then are settled as for
any lost connection (retried under ``retry_unanswered``, else
``connection_lost``). The attacher's own descriptor is the attacher's: the
daemon never shuts the connection down, it only closes its copy.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
from typing import TYPE_CHECKING

import trio

from kmux.errors import AttachRefused, UnknownConnection

from kmuxd.core.attach import ATTACHED_BASE, AttachedPeer, SocketFacts, check_descriptor
from kmuxd.core.states import EndReason, RetireReason

from .dial import tune
from .slot import Slot

if TYPE_CHECKING:
    from .group import Group
    from .peercred import PeerCred

__all__ = ["AttachedPool", "adopt", "read_facts"]

_SIOCINQ = getattr(termios, "FIONREAD", 0x541B)
_INT = struct.Struct("i")


def adopt(fd: int) -> socket.socket:
    """``fd`` as a socket object that owns it; a descriptor that is no socket is closed
    and refused (``not_inet``: it is not even a socket)."""
    try:
        return socket.socket(fileno=fd)
    except OSError as exc:
        try:
            os.close(fd)
        except OSError:
            pass
        raise AttachRefused(f"the descriptor is not a socket ({exc.strerror})", reason="not_inet") from None


def read_facts(sock: socket.socket) -> SocketFacts:
    """What the core decides on, from the kernel."""
    level = socket.SOL_SOCKET
    try:
        sock.getpeername()
        connected = True
    except OSError:
        connected = False
    domain = sock.getsockopt(level, socket.SO_DOMAIN)
    type_ = sock.getsockopt(level, socket.SO_TYPE)
    unread = 0
    if domain in (socket.AF_INET, socket.AF_INET6) and type_ == socket.SOCK_STREAM:
        try:
            unread = _INT.unpack(fcntl.ioctl(sock.fileno(), _SIOCINQ, b"\0" * _INT.size))[0]
        except OSError:
            unread = 0  # a listening socket answers EINVAL; its own row refuses it
    return SocketFacts(
        domain=domain,
        type=type_,
        protocol=sock.getsockopt(level, socket.SO_PROTOCOL),
        listening=bool(sock.getsockopt(level, socket.SO_ACCEPTCONN)),
        connected=connected,
        unread=unread,
    )


class AttachedPool:
    """The attached connections of one group (see the module doc)."""

    def __init__(self, group: "Group") -> None:
        self.group = group
        self.slots: list[Slot] = []
        self._next = ATTACHED_BASE
        #: Attaches accepted and refused (any reason) since start.
        self.accepted = 0
        self.refused = 0

    def attach(self, sock: socket.socket, cred: "PeerCred") -> Slot:
        """Check ``sock`` and carry traffic on it (inside a pass). Closes it on any refusal."""
        group = self.group
        try:
            refusal = check_descriptor(read_facts(sock))
            if refusal is not None:
                reason, text = refusal
                raise AttachRefused(text, reason=reason)
            if len(self.slots) >= group.cfg.attach_max:
                raise AttachRefused(f"group {group.cfg.name!r} holds attach_max={group.cfg.attach_max} "
                                    f"attached connections already", reason="attach_max")
            host, port = sock.getpeername()[:2]
            group.sockets.apply_connected(sock)
            tune(sock, group.cfg)
            sock.setblocking(False)
        except OSError as exc:  # the kernel refused a read or an option: the descriptor is unusable
            self.refused += 1
            sock.close()
            raise AttachRefused(f"the descriptor could not be read or set up: {exc.strerror or exc}",
                                reason="socket_error") from None
        except BaseException:
            self.refused += 1
            sock.close()
            raise
        peer = AttachedPeer(host, port, cred.uid, cred.pid)
        slot = Slot(group, self._next, peer, peer)
        self._next += 1
        self.slots.append(slot)
        self.accepted += 1
        group.reactor.call(slot.carry, sock, peer)
        slot.log.info("attached", uid=cred.uid, pid=cred.pid, comm=cred.comm)
        return slot

    def slot(self, index: int) -> Slot:
        for slot in self.slots:
            if slot.index == index:
                return slot
        raise UnknownConnection(f"group {self.group.cfg.name!r} has no attached connection {index}")

    def ended(self, slot: Slot) -> None:
        """Its connection ended (inside a pass): the slot closes; its totals stay the group's."""
        if slot in self.slots:
            self.slots.remove(slot)
            self.group.removed_slots.append(slot)

    async def unattach(self, index: int) -> dict:
        """Take nothing new on it, wait up to ``unattach_timeout`` for what it owes, close our copy."""
        group = self.group
        slot = self.slot(index)
        live = slot.live
        timeout = group.cfg.unattach_timeout
        t0 = trio.current_time()
        if live is not None and not live.sm.closed:
            owed = live.flight.count() if live.flight is not None else 0
            group.reactor.call(live.retire, RetireReason.UNATTACH, False, group.clock() + timeout)
            with trio.move_on_after(timeout):
                await live.wait_closed()
            left = live.flight.count() if live.flight is not None and not live.sm.closed else 0
            group.reactor.call(live.end, EndReason.REQUESTED)
        else:
            owed = left = 0
        group.reactor.call(self.ended, slot)
        return {"conn": index, "owed": owed, "unanswered": left, "seconds": round(trio.current_time() - t0, 3)}

    def close_all(self) -> None:
        for slot in list(self.slots):
            slot.close_all()
