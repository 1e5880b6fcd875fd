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
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kmux.control import ControlClient
from kmux.errors import AttachRefused, BadRequest, KmuxError

from . import OP_SET, STATUS_OK, mc_parse, mc_set, run_threads
from .conftest import group_stats, response_over
from .mc_app import run_mc_apps
from .test_tls import totals
from tests.integration.as_user import json_as, need_root
from tests.integration.helpers import kmux_cli, wait_until

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
        unread.settimeout(5.0)
        got = response_over(unread)
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
        # A descriptor on any other op, or several on attach: refused, all closed.
        for i in range(REFUSALS // 10):
            with socket.create_connection(("127.0.0.1", memcached.port)) as sock:
                with pytest.raises(BadRequest):
                    c.request("ping", _fds=[sock.fileno()])
                with pytest.raises(AttachRefused) as info:
                    c.request("attach", group="g", _fds=[sock.fileno()] * 3)
                assert info.value.details["reason"] == "no_descriptor"
    # The control connection's own descriptor goes once the daemon sees it closed.
    after = wait_until(lambda: (n := daemon.fd_count()) <= baseline and n, 5.0, "fds back to baseline")
    assert after == baseline, (baseline, after)
    print(f"\nrefused attaches: {REFUSALS} (+{REFUSALS // 10} with 3 fds, +{REFUSALS // 10} fds on ping), daemon fds before {baseline}, after {after}", file=sys.stderr)
    with ControlClient(daemon.control_socket) as c:
        refused = c.request("stats")["control"]["errors"]
    assert refused >= REFUSALS


def _inq(sock: socket.socket) -> int:
    import fcntl
    import struct
    import termios

    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


# -- unattach ---------------------------------------------------------------------------------

LOAD_CLIENTS = 6
WINDOW = 16


def test_unattach_under_load_loses_nothing(daemon_factory, memcached, short_dir):
    """6 clients keep 16 requests each in flight on 2 attached connections; one is unattached
    mid-run. Every request gets its own answer or connection_lost; none goes missing."""
    need_root()
    daemon = daemon_factory({"g": attached_group(unattach_timeout=2.0)})
    socks = [socket.create_connection(("127.0.0.1", memcached.port)) for _ in range(2)]
    with ControlClient(daemon.control_socket) as c:
        conns = [c.attach("g", s)["conn"] for s in socks]
    for s in socks:
        s.close()  # the attacher's copies: closing them changes nothing
    wait_until(lambda: group_stats(daemon)["connections_up"] == 2, 5.0, "2 attached up")
    started = threading.Event()
    stop = threading.Event()

    def work(i: int) -> Counter:
        counts: Counter = Counter()
        with daemon.connect(name=f"load{i}", timeout=10.0) as client:
            sent: dict[int, int] = {}  # seq -> opaque
            n = 0
            while not stop.is_set() or sent:
                while not stop.is_set() and len(sent) < WINDOW:
                    n += 1
                    sent[client.send(mc_set(b"k%d-%d" % (i, n), b"v" * (n % 300), opaque=n))] = n
                    counts["requests"] += 1
                try:
                    got = mc_parse(client.recv(timeout=10.0))
                except KmuxError as exc:
                    counts[exc.code] += 1
                    sent.pop(exc.seq, None)
                    continue
                seq = next((s for s, o in sent.items() if o == got.opaque), None)
                if seq is None or got.status != STATUS_OK:
                    counts["mismatches"] += 1
                    continue
                del sent[seq]
                counts["answered"] += 1
                if counts["answered"] >= 200:
                    started.set()
        return counts

    results: list[Counter] = []
    t = threading.Thread(target=lambda: results.extend(run_threads(LOAD_CLIENTS, work, 60.0)), daemon=True)
    t.start()
    assert started.wait(20.0), "load running"
    answer = kmux_cli(daemon, "--json", "unattach", "g", str(conns[0]), timeout=30)
    assert answer.returncode == 0, answer.stderr
    info = json.loads(answer.stdout)
    time.sleep(0.5)  # the other connection carries on meanwhile
    stop.set()
    t.join(60.0)
    total: Counter = Counter()
    for r in results:
        total.update(r)
    print(f"\nunattach under load: {json.dumps({**dict(total), **info})}", file=sys.stderr)
    assert len(results) == LOAD_CLIENTS
    assert total["requests"] == total["answered"] + total["connection_lost"], total
    assert total["mismatches"] == 0 and set(total) <= {"requests", "answered", "connection_lost"}, total
    g = group_stats(daemon)
    assert [c["index"] for c in g["connections"]] == [conns[1]] and g["connections_up"] == 1
    assert info["conn"] == conns[0] and info["seconds"] <= 2.0 + 1.0


def test_kmux_cli_attach_dials_or_takes_an_inherited_fd_and_group_shows_the_origin(daemon_factory, memcached):
    daemon = daemon_factory({"g": attached_group()})
    r = kmux_cli(daemon, "attach", "g", f"127.0.0.1:{memcached.port}")
    assert r.returncode == 0 and "attached as connection 1024" in r.stdout, r.stderr
    with socket.create_connection(("127.0.0.1", memcached.port)) as s:
        script = Path(sys.executable).with_name("kmux-cli")
        r = subprocess.run([str(script), "--control", daemon.control_socket, "attach", "g", "--fd", str(s.fileno())],
                           capture_output=True, text=True, timeout=10, pass_fds=[s.fileno()])
    assert r.returncode == 0 and "attached as connection 1025" in r.stdout, r.stderr
    r = kmux_cli(daemon, "group", "g")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.lstrip().startswith("102")]
    assert len(rows) == 2 and all(f"attached uid={os.geteuid()}" in row for row in rows), r.stdout
    assert "ORIGIN" in r.stdout
    # A refusal has its exit code and names its code.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.connect(("127.0.0.1", 9))
        r = subprocess.run([str(script), "--control", daemon.control_socket, "attach", "g", "--fd", str(u.fileno())],
                           capture_output=True, text=True, timeout=10, pass_fds=[u.fileno()])
    assert r.returncode == 1 and "attach_refused" in r.stderr, (r.returncode, r.stderr)
    r = kmux_cli(daemon, "unattach", "g", "1024")
    assert r.returncode == 0 and "unattached" in r.stdout, r.stderr
    r = kmux_cli(daemon, "unattach", "g", "1024")
    assert r.returncode == 5, (r.returncode, r.stderr)


def test_unattach_of_a_stalled_connection_answers_what_is_owed_with_connection_lost(daemon_factory, memcached):
    """The service stops answering (SIGSTOP): unattach waits unattach_timeout, then every
    request still owed gets connection_lost, by its seq; the attacher's stream stays open."""
    daemon = daemon_factory({"g": attached_group(unattach_timeout=0.5)})
    sock = socket.create_connection(("127.0.0.1", memcached.port))
    with ControlClient(daemon.control_socket) as c:
        conn = c.attach("g", sock)["conn"]
    wait_until(lambda: group_stats(daemon)["connections_up"] == 1, 5.0, "attached up")
    with daemon.connect(name="owed", timeout=10.0) as client:
        memcached.pause()
        try:
            seqs = {client.send(mc_set(b"k%d" % n, b"v", opaque=n)) for n in range(5)}
            wait_until(lambda: group_stats(daemon)["requests_in_flight"] == 5, 5.0, "5 written")
            r = kmux_cli(daemon, "--json", "unattach", "g", str(conn), timeout=20)
            assert r.returncode == 0, r.stderr
            info = json.loads(r.stdout)
            assert (info["owed"], info["unanswered"]) == (5, 5) and 0.4 <= info["seconds"] <= 2.0, info
            lost = set()
            for _ in range(5):
                with pytest.raises(KmuxError) as e:
                    client.recv(timeout=5.0)
                assert e.value.code == "connection_lost", e.value
                lost.add(e.value.seq)
            assert lost == seqs
        finally:
            memcached.resume()
    # kmuxd closed its copy only: the attacher's stream still works (its late answers arrive there).
    with sock:
        sock.settimeout(5.0)
        sock.sendall(mc_set(b"mine", b"v", opaque=99))
        got = [response_over(sock) for _ in range(6)]
    assert got[-1].opaque == 99 and got[-1].status == STATUS_OK
    assert group_stats(daemon)["connections"] == []
