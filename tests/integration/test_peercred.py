"""PeerCred against real sockets: peers that really run with the ids we check.

Each peer is a child process that drops from root to its own uid, primary
gid and supplementary groups before it connects; it names itself through
``/proc/self/comm``, connects to a listening SEQPACKET socket and waits for
us to close. What :meth:`PeerCred.of` reads on the accepted socket must be
exactly what the child was given: small group lists (CPython's getsockopt),
long ones (libc, sized from the kernel's ERANGE answer) up to the kernel's
NGROUPS_MAX, none, and more than a caller's bound.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kmuxd.io.peercred import GROUPS_MAX, PeerCred, peer_groups, read_comm

from .as_user import OTHER_GID, OTHER_UID, need_root
from .helpers import wait_until

#: The child starts as root and drops to uid/gid with the groups given as
#: JSON on stdin (65536 of them do not fit in an argument), names itself,
#: connects, says one byte and waits for EOF (the parent has read its
#: credentials by then).
PEER = """
import json, os, socket, sys
path, comm, uid, gid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with open("/proc/self/comm", "w") as f:  # while still root: setuid makes /proc/self root's
    f.write(comm)
os.setgroups(json.load(sys.stdin))
os.setgid(gid)
os.setuid(uid)
assert os.getuid() == os.geteuid() == uid
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(path)
s.send(b"x")
s.recv(1)
"""


@pytest.fixture
def listener(short_dir: Path):
    short_dir.chmod(0o755)
    path = str(short_dir / "peer.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(path)
    os.chmod(path, 0o666)
    sock.listen(4)
    sock.settimeout(20)
    with sock:
        yield sock, path


def cred_of_child(listener, groups: list[int], comm: str = "kmx-peer", **read) -> tuple[PeerCred, int, tuple]:
    """Start a peer with ``groups``; returns what PeerCred read, the child's pid and peer_groups(**read)."""
    sock, path = listener
    child = subprocess.Popen(
        [sys.executable, "-c", PEER, path, comm, str(OTHER_UID), str(OTHER_GID)],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        child.stdin.write(json.dumps(groups))
        child.stdin.close()
        wait_until(lambda: select.select([sock], [], [], 0.05)[0] or child.poll() is not None, 20, "the peer")
        assert child.poll() is None, child.stderr.read()
        conn, _ = sock.accept()
        with conn:
            assert conn.recv(1) == b"x"  # the child has named itself by now
            cred = PeerCred.of(conn)
            bounded = peer_groups(conn, **read) if read else cred.groups
    finally:
        child.wait(20)
    assert child.returncode == 0, child.stderr.read()
    child.stderr.close()
    return cred, child.pid, bounded


def test_own_credentials_through_a_socketpair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        cred = PeerCred.of(a)
    assert (cred.pid, cred.uid, cred.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert cred.groups == tuple(sorted(set(os.getgroups())))
    assert cred.comm == read_comm(os.getpid()) != ""


def test_small_long_and_maximal_group_lists(listener):
    need_root()
    few = [1, 5, 60000]
    cred, pid, _ = cred_of_child(listener, few)
    assert cred == PeerCred(pid, OTHER_UID, OTHER_GID, "kmx-peer", (1, 5, 60000))
    assert cred.in_group(OTHER_GID) and cred.in_group(5) and not cred.in_group(0)
    # 1000 groups: more than CPython's getsockopt can hold, read through libc
    many = list(range(10_000, 11_000))
    cred, _, _ = cred_of_child(listener, many)
    assert cred.groups == tuple(many)
    # the kernel's NGROUPS_MAX, which is also our bound
    most = list(range(100_000, 100_000 + GROUPS_MAX))
    cred, _, _ = cred_of_child(listener, most)
    assert cred.groups == tuple(most)


def test_no_groups_and_more_than_the_bound(listener):
    need_root()
    cred, _, _ = cred_of_child(listener, [])
    assert (cred.uid, cred.gid, cred.groups) == (OTHER_UID, OTHER_GID, ())
    # Past a caller's bound the peer reads as having no supplementary group
    # (groups only grant access), on both read paths.
    _, _, small = cred_of_child(listener, [7, 8, 9], limit=2)
    assert small == ()
    _, _, large = cred_of_child(listener, list(range(20_000, 20_500)), limit=300)
    assert large == ()
    _, _, exact = cred_of_child(listener, list(range(20_000, 20_500)), limit=500)
    assert exact == tuple(range(20_000, 20_500))


def test_comm_is_best_effort(listener):
    need_root()
    cred, pid, _ = cred_of_child(listener, [], comm="a-long-name-cut-by-kernel")
    assert cred.comm == "a-long-name-cut"  # TASK_COMM_LEN: 15 characters
    assert read_comm(pid) == ""  # the child has exited (and been reaped)
    assert read_comm(0) == "" and read_comm(-1) == ""
