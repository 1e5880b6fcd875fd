"""Attaching a TCP connection an app made (KCM's ``SIOCKCMATTACH``): who may, and which descriptors.

Theory of operation
-------------------
A trusted process dials a service itself (to run a challenge and response
no static configuration can describe, say), then hands the connected socket
to kmuxd with ``SCM_RIGHTS`` on the control socket (op ``attach``). The
shell reads facts from the kernel and asks this module twice, with no I/O:

1. :func:`may_attach`: the peer's credentials (``SO_PEERCRED``,
   ``SO_PEERGROUPS``) against the group's ``attach_users`` /
   ``attach_groups``. Root and kmuxd's own uid always may; a group that
   names neither list admits nobody else (attaching is off by default,
   unlike ``allow_users``, whose absence means open).
2. :func:`check_descriptor`: the descriptor's :class:`SocketFacts` against
   :data:`DESCRIPTOR_CHECKS`, a table read in order; the first row whose
   test fails refuses the descriptor with its ``reason`` (a stable word that
   travels in the ``attach_refused`` error's details).

The shell closes a refused descriptor at once, whatever the reason, so a
peer that attaches in a loop never grows the daemon's descriptor table.

Why each row: the daemon writes and reads a byte *stream* to a service,
so the socket must be TCP (``SO_DOMAIN`` AF_INET/AF_INET6, ``SO_TYPE``
SOCK_STREAM, ``SO_PROTOCOL`` IPPROTO_TCP; MPTCP and SCTP streams are
refused too), connected (``getpeername`` works) and not listening
(``SO_ACCEPTCONN`` 0). ``SIOCINQ`` must be 0: bytes already queued belong
to a conversation the daemon did not start, and framing them would steer
someone else's answer to an app.

The numbers below are the Linux ABI (``<linux/socket.h>``, ``<linux/in.h>``);
the core may not import :mod:`socket`, and a unit test checks they agree.

Invariant: an attached connection is numbered from :data:`ATTACHED_BASE`, above
any dialled slot (``connections`` is at most 1024), so a reload that adds
dialled slots never renumbers an attached one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from .access import AccessPolicy

__all__ = [
    "AF_INET", "AF_INET6", "SOCK_STREAM", "IPPROTO_TCP", "ATTACHED_BASE",
    "SocketFacts", "DescriptorCheck", "DESCRIPTOR_CHECKS", "REFUSAL_REASONS",
    "AttachedPeer", "may_attach", "check_descriptor",
]

AF_INET = 2
AF_INET6 = 10
SOCK_STREAM = 1
IPPROTO_TCP = 6
#: The first number an attached connection gets (dialled slots are 0..connections-1 <= 1023).
ATTACHED_BASE = 1024


@dataclass(frozen=True, slots=True)
class SocketFacts:
    """What the shell read from a passed descriptor (``getsockopt``, ``getpeername``, ``ioctl``)."""

    domain: int
    type: int
    protocol: int
    #: SO_ACCEPTCONN: it is a listening socket.
    listening: bool
    #: getpeername() succeeded.
    connected: bool
    #: SIOCINQ: bytes queued to read (0 when not a stream socket, or not readable).
    unread: int


@dataclass(frozen=True, slots=True)
class DescriptorCheck:
    """One row: ``test`` must hold, or the descriptor is refused with ``reason``."""

    reason: str
    test: Callable[[SocketFacts], bool]
    #: Why, in words, for the refusal's text (``{facts}`` fields may be named).
    text: str


DESCRIPTOR_CHECKS: tuple[DescriptorCheck, ...] = (
    DescriptorCheck("not_inet", lambda f: f.domain in (AF_INET, AF_INET6),
                    "is not an IPv4 or IPv6 socket (SO_DOMAIN {domain})"),
    DescriptorCheck("not_stream", lambda f: f.type == SOCK_STREAM,
                    "is not a stream socket (SO_TYPE {type})"),
    DescriptorCheck("not_tcp", lambda f: f.protocol == IPPROTO_TCP,
                    "is not TCP (SO_PROTOCOL {protocol})"),
    DescriptorCheck("listening", lambda f: not f.listening,
                    "is a listening socket (SO_ACCEPTCONN)"),
    DescriptorCheck("not_connected", lambda f: f.connected,
                    "is not connected (getpeername failed)"),
    DescriptorCheck("unread_data", lambda f: f.unread == 0,
                    "has {unread} bytes queued unread (SIOCINQ); attach before the service sends anything"),
)
#: Every reason a descriptor may be refused for (a stable vocabulary, in docs/protocol.md).
REFUSAL_REASONS = tuple(row.reason for row in DESCRIPTOR_CHECKS)


def check_descriptor(facts: SocketFacts) -> tuple[str, str] | None:
    """None if the descriptor may join a pool, else ``(reason, text)`` of the first failed row."""
    for row in DESCRIPTOR_CHECKS:
        if not row.test(facts):
            return row.reason, "the descriptor " + row.text.format(
                domain=facts.domain, type=facts.type, protocol=facts.protocol, unread=facts.unread)
    return None


def may_attach(policy: AccessPolicy | None, uid: int, gid: int, supplementary: Iterable[int] = (), *,
               daemon_uid: int = 0) -> bool:
    """Whether a peer may attach to a group whose ``attach_users``/``attach_groups`` is ``policy``
    (None: neither is set, so root and kmuxd's own uid only)."""
    if uid in (0, daemon_uid):
        return True
    if policy is None:
        return False
    return policy.admits(uid, gid, supplementary)


@dataclass(frozen=True, slots=True)
class AttachedPeer:
    """Where an attached connection goes and who attached it; stands where a dialled
    connection has its configured endpoint. Never equal to a configured endpoint, so
    the endpoint pool keeps no health for it (it is never redialled)."""

    host: str
    port: int
    #: The attacher's uid and pid (SO_PEERCRED of its control connection).
    uid: int
    pid: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
