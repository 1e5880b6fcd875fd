"""Per-client limits against a real kmuxd: clients per uid, idle clients, descriptors in packets.

* ``max_clients_per_uid`` beside ``max_clients``: one uid (a real process
  under its own uid) cannot take every slot; other uids still get in, and
  a slot it frees is its own again.
* ``client_idle_timeout``: a client that neither sends nor receives is
  detached with an ``idle_timeout`` notice; clients that send, or only
  receive, are not; a group without the setting keeps idle clients.
* ``SCM_RIGHTS``: a packet carrying descriptors is refused with
  ``ancillary_refused`` (naming the DATA message's seq) and the descriptors
  never stay in the daemon: its ``/proc/PID/fd`` count does not grow after
  tens of thousands of them.
"""

from __future__ import annotations

import array
import json
import os
import socket
import time

import msgpack
import pytest

import kmux

from .as_user import AppPeer, need_root
from .helpers import Receiver, SenderThreads, group_config, make_frame, summarize_frame, u32be, wait_until
from .test_cli import cli

MAX = 65536


def refused_by_code(daemon) -> dict:
    return json.loads(cli(daemon.control_socket, "status", "-j").stdout)["refused_by_code"]


def clients_by_name(daemon) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(cli(daemon.control_socket, "clients", "-j").stdout)}


def test_one_uid_cannot_take_every_slot(backend_factory, daemon_factory, short_dir):
    need_root()
    short_dir.chmod(0o755)
    backend = backend_factory(summarize=summarize_frame, max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=1)}, socket_mode="0666",
                            max_clients=5, max_clients_per_uid=2)
    backend.wait_open(1)
    with AppPeer(daemon.socket_path, uid=4242, gid=4242) as greedy, AppPeer(daemon.socket_path, uid=4243, gid=4243) as other:
        first, second, third = (greedy.connect(group="echo", name=f"greedy{i}") for i in range(3))
        assert first["ok"] and second["ok"]
        assert (third["ok"], third["code"]) == (False, "too_many_clients_for_user")
        assert third["message"] == "uid 4242 already has 2 clients (max_clients_per_uid=2)"
        # Other uids still get in: root twice, uid 4243 once.
        own = [daemon.connect(name=f"root{i}") for i in range(2)]
        try:
            assert other.connect(group="echo", name="other0")["ok"]
            # A slot uid 4242 frees is its own again.
            greedy.disconnect(client=first["client"])
            wait_until(lambda: "greedy0" not in clients_by_name(daemon), 5, "greedy0 detached")
            assert greedy.connect(group="echo", name="greedy3")["ok"]
            # max_clients still holds for everyone: 5 attached.
            full = other.connect(group="echo", name="other1")
            assert (full["ok"], full["code"]) == (False, "too_many_clients")
            with pytest.raises(kmux.TooManyClients):
                daemon.connect(name="root2")
            names = clients_by_name(daemon)
            assert sorted(names) == ["greedy1", "greedy3", "other0", "root0", "root1"]
            assert sorted(c["uid"] for c in names.values()) == [0, 0, 4242, 4242, 4243]
        finally:
            for c in own:
                c.close()
    assert refused_by_code(daemon) == {"too_many_clients_for_user": 1, "too_many_clients": 2}


def test_idle_clients_are_detached_busy_ones_are_not(backend_factory, daemon_factory):
    idle_timeout = 0.6
    backend = backend_factory(echo=True, summarize=summarize_frame, max_frame=MAX)
    daemon = daemon_factory({
        "echo": group_config(backend, connections=1, client_idle_timeout=idle_timeout),
        "quiet": group_config(backend, connections=1),
    })
    backend.wait_open(2)
    idle = daemon.connect(name="idle")
    patient = daemon.connect(group="quiet", name="patient")  # idle too, in a group without the timeout
    receiver = Receiver(daemon.connect(name="receiver"))  # only receives (the sender's echoes)
    sender = SenderThreads(daemon, 1, size=lambda rng: 64, prefix="sender", pace=idle_timeout / 6)
    try:
        with pytest.raises(kmux.IdleTimeout) as notice:
            idle.recv(timeout=10 * idle_timeout)
        assert notice.value.seq is None
        assert f"client_idle_timeout={idle_timeout}s" in notice.value.message
        with pytest.raises(kmux.IdleTimeout, match="the daemon ended the session"):
            idle.recv(timeout=5)  # then it is closed: every later call says why
        daemon.wait_log("client_idle", client=idle.client_id)
        # Three timeouts later the busy ones and the other group's idle one are still there.
        time.sleep(3 * idle_timeout)
        assert sorted(clients_by_name(daemon)) == ["patient", "receiver", "sender0"]
        assert receiver.count() > 0 and sender.sent[0] > 0
    finally:
        sender.close()
        receiver.close()
        idle.close()
        patient.close()


def test_after_a_failed_send_the_library_still_reports_why_the_daemon_closed(backend_factory, daemon_factory):
    backend = backend_factory(summarize=summarize_frame, max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=1, client_idle_timeout=0.3)})
    backend.wait_open(1)
    with daemon.connect(name="idle") as idle:
        daemon.wait_log("client_detached", reason="idle")  # its idle_timeout notice waits in its socket
        # EPIPE: the daemon has closed. The library reads what it sent before
        # closing, so the send itself can already say why.
        with pytest.raises((kmux.DaemonShutdown, kmux.IdleTimeout)):
            idle.send(make_frame(1, 1, 64))
        with pytest.raises(kmux.IdleTimeout):
            idle.recv(timeout=5)  # the reason is still there to read


# -- descriptors in packets -----------------------------------------------------------

#: Descriptors per packet (the kernel allows 253) and packets sent.
FDS_PER_PACKET = 200
PACKETS = 150


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raw_client(daemon, group: str = "echo") -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5.0)
    s.connect(daemon.socket_path)
    s.send(msgpack.packb({"kmux": 1, "group": group, "receive": False}))
    answer = msgpack.unpackb(s.recv(65536))
    assert answer["ok"] is True, answer
    return s


def send_with_fds(sock: socket.socket, packet: bytes, fds: list[int]) -> None:
    sock.sendmsg([packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def notice(sock: socket.socket) -> dict:
    packet = sock.recv(65536)
    assert packet[:1] == b"\x01", packet
    return msgpack.unpackb(packet[1:])


def test_packets_with_descriptors_are_refused_and_the_descriptors_closed(backend_factory, daemon_factory):
    backend = backend_factory(summarize=summarize_frame, max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=1)})
    backend.wait_open(1)
    pid = daemon.proc.pid
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(FDS_PER_PACKET)]
    try:
        s = raw_client(daemon)
        before = open_fds(pid)
        seq = 0
        for _ in range(PACKETS):
            seq += 1
            send_with_fds(s, b"\x00" + make_frame(1, seq, 64), fds)
            got = notice(s)
            assert (got["code"], got["seq"]) == ("ancillary_refused", seq), got
        # A control packet with descriptors: refused, no seq (it is not a message).
        send_with_fds(s, b"\x01" + msgpack.packb({"op": "receive", "on": True}), fds)
        got = notice(s)
        assert got["code"] == "ancillary_refused" and "seq" not in got, got
        # A continued message with descriptors on its first piece, then one with them on a
        # middle piece: each is one message refused by its seq, its other pieces dropped with it.
        frame = make_frame(1, 0, 96)
        send_with_fds(s, b"\x80" + frame[:30], fds)
        s.send(b"\x00" + frame[30:])
        s.send(b"\x80" + frame[:30])
        send_with_fds(s, b"\x80" + frame[30:60], fds)
        s.send(b"\x00" + frame[60:])
        # The session goes on, counting messages as the app does: the next ones are seq + 3, + 4.
        s.send(b"\x00" + make_frame(1, seq + 3, 64))
        s.send(b"\x00" + u32be(b"x")[:-1])  # a bad frame: its notice names the seq the daemon counted
        got = [notice(s) for _ in range(3)]
        assert [(n["code"], n["seq"]) for n in got] == [
            ("ancillary_refused", seq + 1), ("ancillary_refused", seq + 2), ("bad_frame", seq + 4)
        ], got
        backend.wait_count(1, timeout=5)
        assert [rec for _, rec in backend.records()] == [(1, seq + 3, 64)]  # only the good message
        # Nothing stayed open in the daemon: tens of thousands of descriptors went through.
        assert wait_until(lambda: open_fds(pid) == before, 5, f"the daemon's fd count back at {before}")
        s.close()
    finally:
        for fd in fds:
            os.close(fd)


def test_a_hello_with_descriptors_is_refused_and_they_are_closed(backend_factory, daemon_factory):
    backend = backend_factory(summarize=summarize_frame, max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=1)})
    backend.wait_open(1)
    pid = daemon.proc.pid
    before = open_fds(pid)
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(FDS_PER_PACKET)]
    try:
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(5.0)
            s.connect(daemon.socket_path)
            send_with_fds(s, msgpack.packb({"kmux": 1, "group": "echo"}), fds)
            answer = msgpack.unpackb(s.recv(65536))
            s.close()
            assert (answer["ok"], answer["code"]) == (False, "ancillary_refused"), answer
    finally:
        for fd in fds:
            os.close(fd)
    assert wait_until(lambda: open_fds(pid) == before, 5, f"the daemon's fd count back at {before}")


def test_a_reconnect_storm_is_logged_at_client_log_rate_and_every_line_counted(backend_factory, daemon_factory):
    """300 apps connect and close back to back with ``client_log_rate = 20``: at most the
    burst plus the rate's share of the elapsed time is written, and the lines written plus
    every ``suppressed`` count add up to exactly one attach and one detach per app."""
    rate, apps = 20, 300
    backend = backend_factory(summarize=summarize_frame, max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=1)}, client_log_rate=rate)
    backend.wait_open(1)
    before = len(daemon.logs("client_attached")) + len(daemon.logs("client_detached"))
    assert before == 0
    t0 = time.monotonic()
    for i in range(apps):
        daemon.connect(name=f"storm{i}").close()

    def accounted():
        written = daemon.logs("client_attached") + daemon.logs("client_detached")
        summaries = daemon.logs("client_lines_suppressed")
        counted = sum(e.get("suppressed") or 0 for e in written + summaries)
        return len(written) + counted == 2 * apps and (written, summaries)

    written, summaries = wait_until(accounted, 15.0, "every client line written or counted")
    elapsed = time.monotonic() - t0
    print(f"storm of {apps} apps in {elapsed:.2f} s at client_log_rate={rate}: {len(written)} lines written, "
          f"{2 * apps - len(written)} counted in suppressed= ({len(summaries)} client_lines_suppressed lines)")
    assert len(written) <= rate + rate * elapsed + 1, (len(written), elapsed)
    assert len(written) < 2 * apps
