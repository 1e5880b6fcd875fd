"""Attaching a TCP connection an app made (op ``attach``, KCM's ``SIOCKCMATTACH``), against a real memcached.

The attacher is a real process running as uid :data:`ATTACHER_UID`
(``setpriv``, no capabilities), listed in the group's ``attach_users``. It
reaches the control socket through ``control_group`` (a supplementary
group), dials memcached itself, passes the socket with ``SCM_RIGHTS``, and
closes its own descriptor. The group has no ``endpoints``: every connection
it has was attached. Unprivileged apps (other uids) then carry ``id``
traffic through it with the same opaques, so only kmuxd's rewrite keeps
them apart: 0 mismatches. Refusals are each checked by code and reason, and
the daemon's ``/proc/PID/fd`` count is back to its baseline after 2000 of
them.
"""

from __future__ import annotations

import grp
import json
import os
import socket
import sys
from typing import Any

import pytest

from kmux.control import ControlClient
from kmux.errors import AttachRefused, PermissionDenied

from . import OP_SET, STATUS_OK, mc_parse, mc_set
from .conftest import group_stats
from .mc_app import run_mc_apps
from .test_tls import totals
from tests.integration.as_user import json_as, need_root
from tests.integration.helpers import wait_until

ATTACHER_UID = 4300
STRANGER_UID = 4301
APP_UID_BASE = 4310
CONTROL_GROUP = "daemon"
APPS = 8
ROUNDS = 100
REFUSALS = 2000

#: The attacher: dial HOST:PORT, attach it to GROUP, close its own copy, print the answer.
ATTACH_AS = """
import json, socket, sys
from kmux.control import ControlClient
from kmux.errors import KmuxError
control, group, host, port, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
out = []
with ControlClient(control) as c:
    for _ in range(count):
        s = socket.create_connection((host, port))
        try:
            out.append({"ok": True, **c.attach(group, s)})
        except KmuxError as e:
            out.append({"ok": False, "code": e.code, "reason": e.details.get("reason")})
        finally:
            s.close()
print(json.dumps(out))
"""


def attached_group(**kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "attach_users": [ATTACHER_UID],
        "framing": "memcached-binary",
        "steering": "id",
        "id": {"request_offset": 12, "response_offset": 12, "size": 4, "rewrite": True},
        "max_message": 65536,
        "request_timeout": 10.0,
        "min_connections": 1,
    }
    cfg.update(kw)
    return cfg


def control_gid() -> int:
    return grp.getgrnam(CONTROL_GROUP).gr_gid


def attach_as(daemon, memcached, uid: int, count: int = 1) -> list[dict]:
    return json_as(ATTACH_AS, uid=uid, gid=uid, groups=[control_gid()],
                   args=[daemon.control_socket, "g", "127.0.0.1", str(memcached.port), str(count)])


@pytest.fixture
def attach_daemon(daemon_factory, memcached, short_dir):
    need_root()
    short_dir.chmod(0o755)  # only the sockets' own modes decide who connects
    return daemon_factory({"g": attached_group()}, control_group=CONTROL_GROUP, socket_mode="0666",
                          control_socket=str(short_dir / "control.sock"))


def test_an_attached_memcached_connection_carries_id_traffic_from_unprivileged_apps(attach_daemon, memcached):
    daemon = attach_daemon
    assert group_stats(daemon)["connections_up"] == 0
    answers = attach_as(daemon, memcached, ATTACHER_UID, count=2)
    assert [a["ok"] for a in answers] == [True, True], answers
    assert [a["conn"] for a in answers] == [1024, 1025]
    g = wait_until(lambda: (g := group_stats(daemon))["connections_up"] == 2 and g, 5.0, "2 attached up")
    origins = {c["index"]: c["origin"] for c in g["connections"]}
    assert {o["kind"] for o in origins.values()} == {"attached"}
    assert {o["uid"] for o in origins.values()} == {ATTACHER_UID}
    assert not g["connections_degraded"]
    # The attacher has exited and closed its descriptors: that changes nothing.
    results = run_mc_apps(daemon.socket_path, "g", APPS, ROUNDS, [], uid_base=APP_UID_BASE)
    t = totals(results)
    figures = {"apps": APPS, "requests": t["requests"], "checked": t["checked"], "mismatches": t["mismatches"],
               "attached": 2}
    print(f"\nattached memcached: {json.dumps(figures)}", file=sys.stderr)
    assert t["mismatches"] == 0 and t["requests"] == APPS * ROUNDS * 2 and t["checked"] == APPS * ROUNDS, results
    assert {r["uid"] for r in results} == {APP_UID_BASE + i for i in range(APPS)}
    g = group_stats(daemon)
    assert g["connections_up"] == 2 and sum(c["tx_msgs"] for c in g["connections"]) == APPS * ROUNDS * 2
    assert all(c["tx_msgs"] > 0 for c in g["connections"]), "both attached connections carried traffic"
    assert g["unmatched_responses"] == 0 and g["requests_failed"] == 0


def test_an_attached_connection_that_ends_is_not_redialled(attach_daemon, memcached):
    daemon = attach_daemon
    (a,) = attach_as(daemon, memcached, ATTACHER_UID)
    wait_until(lambda: group_stats(daemon)["connections_up"] == 1, 5.0, "attached up")
    memcached.stop()
    g = wait_until(lambda: (g := group_stats(daemon))["connections_up"] == 0 and g, 10.0, "attached gone")
    assert g["connections"] == [] and g["connections_degraded"]
    assert not daemon.logs("dial_failed")


def _udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", 9))
    return s


def _listening() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def _unix() -> socket.socket:
    a, b = socket.socketpair()
    b.close()
    return a


def test_refusals_each_with_its_code_and_the_descriptor_closed(attach_daemon, memcached):
    daemon = attach_daemon
    stranger = attach_as(daemon, memcached, STRANGER_UID)
    assert stranger == [{"ok": False, "code": "permission_denied", "reason": None}]

    # Unread data: memcached answers a request the attacher sent and never read.
    unread = socket.create_connection(("127.0.0.1", memcached.port))
    unread.sendall(mc_set(b"k", b"v"))
    wait_until(lambda: _inq(unread) > 0, 5.0, "memcached's answer queued unread")
    cases = {"not_stream": _udp(), "listening": _listening(), "not_inet": _unix(), "unread_data": unread}
    with ControlClient(daemon.control_socket) as c:
        for reason, sock in cases.items():
            with pytest.raises(AttachRefused) as info:
                c.attach("g", sock)
            if sock is not unread:
                sock.close()
            assert info.value.code == "attach_refused" and info.value.details["reason"] == reason
        with pytest.raises(AttachRefused) as info:
            c.request("attach", group="g")
        assert info.value.details["reason"] == "no_descriptor"
    # The attacher's own copy of the refused one still works: kmuxd closed only its copy.
    with unread:
        got = mc_parse(_recv_message(unread))
    assert (got.opcode, got.status) == (OP_SET, STATUS_OK)
    g = group_stats(daemon)
    assert g["connections"] == [] and g["connections_up"] == 0


def test_fd_count_is_back_to_baseline_after_thousands_of_refused_attaches(attach_daemon, memcached):
    daemon = attach_daemon
    baseline = daemon.fd_count()
    kinds = [_udp, _listening, _unix]
    with ControlClient(daemon.control_socket) as c:
        for i in range(REFUSALS):
            with kinds[i % 3]() as sock, pytest.raises(AttachRefused):
                c.attach("g", sock)
    # The control connection's own descriptor goes once the daemon sees it closed.
    after = wait_until(lambda: (n := daemon.fd_count()) <= baseline and n, 5.0, "fds back to baseline")
    assert after == baseline, (baseline, after)
    print(f"\nrefused attaches: {REFUSALS}, daemon fds before {baseline}, after {after}", file=sys.stderr)
    with ControlClient(daemon.control_socket) as c:
        refused = c.request("stats")["control"]["errors"]
    assert refused >= REFUSALS


def _inq(sock: socket.socket) -> int:
    import fcntl
    import struct
    import termios

    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def _recv_message(sock: socket.socket) -> bytes:
    sock.settimeout(5.0)
    head = b""
    while len(head) < 24:
        head += sock.recv(24 - len(head))
    body_len = int.from_bytes(head[8:12], "big")
    body = b""
    while len(body) < body_len:
        body += sock.recv(body_len - len(body))
    return head + body
