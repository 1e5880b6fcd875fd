"""Who is on the other end of a Unix socket: pid, uid, gid, supplementary groups, comm.

Theory of operation
-------------------
The kernel records the peer's credentials when it calls ``connect()``, so
what we read is who connected, not who holds the socket now (a descriptor
passed on or a process that changed its ids later does not change them).

* ``SO_PEERCRED`` gives pid, uid and gid (``struct ucred``, three ints).
* ``SO_PEERGROUPS`` (option 59; Python has no constant for it) gives the
  supplementary groups as an array of ``gid_t``. The kernel fails with
  ``ERANGE`` when the buffer is too small and writes the size it needs
  into ``optlen``. CPython's ``getsockopt`` refuses buffers over 1024
  bytes (256 groups), so the common case goes through it and only a peer
  with more groups is read again through libc with the exact size.
* ``comm`` is ``/proc/PID/comm``, best effort: the process may have exited
  (or the pid been reused), or live in another pid namespace (pid 0).
  It is for logs and ``kmux-cli``, never for decisions.

Invariants
----------
* Everything a decision may use (uid, gid, groups) comes from the kernel,
  never from the peer's own words.
* Bounded: at most :data:`GROUPS_MAX` groups are read (the kernel's own
  ``NGROUPS_MAX``), so no peer makes the daemon allocate more than 256 KiB.
  A peer with more groups than the bound is read as having none: groups
  only ever grant access, so what is left unread can take rights away but
  never give them, and no arbitrary subset is ever used.
* A kernel that has no ``SO_PEERGROUPS`` (before Linux 4.13) gives
  ``groups == ()`` rather than an error: the peer is then admitted on uid
  and primary gid alone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct

__all__ = ["PeerCred", "SO_PEERGROUPS", "GROUPS_MAX", "peer_groups"]

#: ``SO_PEERGROUPS`` from <asm-generic/socket.h>; Python's socket module lacks it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: Most supplementary groups read from one peer: the kernel's NGROUPS_MAX.
GROUPS_MAX = 65536
#: Largest buffer CPython's ``getsockopt`` accepts (bytes); beyond it, libc.
_PY_GETSOCKOPT_MAX = 1024
#: Longest ``/proc/PID/comm`` read: TASK_COMM_LEN is 16, with room to spare.
COMM_MAX = 64

_UCRED = struct.Struct("=iII")  # pid_t pid; uid_t uid; gid_t gid
_GID_SIZE = 4  # sizeof(gid_t) on Linux


class PeerCred:
    """A peer's credentials as the kernel recorded them at ``connect()``.

    :meth:`of` reads everything at once. The daemon's hello path uses
    :meth:`basic` (one ``getsockopt``) and reads the rest only when needed:
    supplementary groups (:meth:`with_groups`) for a group with
    ``allow_groups``, ``comm`` on first use (statistics, a log line), so an
    app's hello costs no ``/proc`` read.
    """

    __slots__ = ("pid", "uid", "gid", "groups", "_comm")

    def __init__(self, pid: int, uid: int, gid: int, comm: str | None = None, groups: tuple[int, ...] = ()) -> None:
        self.pid = pid
        self.uid = uid
        #: Primary group.
        self.gid = gid
        #: Supplementary groups (``SO_PEERGROUPS``), sorted, without duplicates
        #: (empty until read: see :meth:`with_groups`).
        self.groups = groups
        self._comm = comm

    @classmethod
    def basic(cls, sock: socket.socket) -> "PeerCred":
        """pid, uid and gid only (``SO_PEERCRED``)."""
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        return cls(pid, uid, gid)

    @classmethod
    def of(cls, sock: socket.socket) -> "PeerCred":
        """Read the credentials of ``sock``'s peer (an ``AF_UNIX`` socket), all of them."""
        cred = cls.basic(sock)
        return cls(cred.pid, cred.uid, cred.gid, read_comm(cred.pid), peer_groups(sock))

    def with_groups(self, sock: socket.socket) -> "PeerCred":
        return PeerCred(self.pid, self.uid, self.gid, self._comm, peer_groups(sock))

    @property
    def comm(self) -> str:
        """Process name (``/proc/PID/comm``), "" when it could not be read."""
        if self._comm is None:
            self._comm = read_comm(self.pid)
        return self._comm

    def in_group(self, gid: int) -> bool:
        """Whether ``gid`` is the primary or a supplementary group."""
        return gid == self.gid or gid in self.groups

    def _key(self) -> tuple:
        return (self.pid, self.uid, self.gid, self.comm, self.groups)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PeerCred) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"PeerCred(pid={self.pid}, uid={self.uid}, gid={self.gid}, comm={self.comm!r}, groups={self.groups})"


def peer_groups(sock: socket.socket, limit: int = GROUPS_MAX) -> tuple[int, ...]:
    """The peer's supplementary gids, sorted; ``()`` if the kernel cannot tell."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _PY_GETSOCKOPT_MAX)
    except OSError as exc:
        if exc.errno == errno.ERANGE:
            raw = _peer_groups_libc(sock.fileno(), limit)
        elif exc.errno in (errno.ENOPROTOOPT, errno.ENODATA):
            return ()
        else:
            raise
    count = len(raw) // _GID_SIZE
    if count > limit:
        return ()
    return tuple(sorted(set(struct.unpack(f"={count}I", raw[: count * _GID_SIZE]))))


def _peer_groups_libc(fd: int, limit: int) -> bytes:
    """``SO_PEERGROUPS`` through libc, sized from the kernel's ``ERANGE`` answer.

    Peer credentials are fixed at connect time, so the second call cannot
    find more groups than the first announced; the loop is bounded anyway.
    """
    libc = _libc()
    size = _PY_GETSOCKOPT_MAX * 2
    for _ in range(3):
        size = min(size, limit * _GID_SIZE)
        buf = ctypes.create_string_buffer(size)
        optlen = ctypes.c_uint32(size)
        if libc.getsockopt(fd, socket.SOL_SOCKET, SO_PEERGROUPS, buf, ctypes.byref(optlen)) == 0:
            return buf.raw[: optlen.value]
        err = ctypes.get_errno()
        if err != errno.ERANGE:
            raise OSError(err, f"getsockopt(SO_PEERGROUPS): {os.strerror(err)}")
        if size >= limit * _GID_SIZE:
            return b""  # more groups than the bound: none (see the invariants)
        size = optlen.value  # the kernel wrote the size it needs
    raise OSError(errno.ERANGE, "getsockopt(SO_PEERGROUPS): the group list kept growing")


_LIBC: list[ctypes.CDLL] = []


def _libc() -> ctypes.CDLL:
    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


def read_comm(pid: int) -> str:
    """``/proc/PID/comm`` without its newline, or "" (exited, other namespace, pid 0)."""
    if pid <= 0:
        return ""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read(COMM_MAX).decode("utf-8", "replace").rstrip("\n")
    except OSError:
        return ""
