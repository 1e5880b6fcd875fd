"""Errors, end to end: bad configs, bad handshakes, bad messages, dying clients, a second daemon.

A mistake costs its maker, never the shared streams or the other clients:
refused messages never reach the server, refused handshakes get a refusal
map and a closed socket, and the daemon goes on serving.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import msgpack
import pytest

import kmux
from kmux.control import ControlClient

from .helpers import (
    MIN_FRAME,
    check_order_per_connection,
    group_config,
    kmuxd_command,
    make_frame,
    summarize_frame,
    u32be,
    wait_flat,
    wait_until,
    write_config,
)

MAX = 65536
REPO = Path(__file__).resolve().parents[2]


# -- configuration -----------------------------------------------------------------

GOOD_GROUP = {"endpoints": ["127.0.0.1:9"], "connections": 2}


def _check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*kmuxd_command(), "--config", str(path), "--check"], capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("key_path", "daemon", "group", "version"),
    [
        ("groups.echo.connections", {}, {"connections": 0}, 1),
        ("groups.echo.framing.length_size", {}, {"framing": {"length_size": 9}}, 1),
        ("groups.echo.framing", {}, {"framing": "u24be"}, 1),
        ("groups.echo.endpoints[1]", {}, {"endpoints": ["127.0.0.1:9", "localhost"]}, 1),
        ("daemon.socket_mode", {"socket_mode": 660}, {}, 1),
        ("daemon.max_clients", {"max_clients": "many"}, {}, 1),
        ("groups.echo.conections", {}, {"conections": 4}, 1),
        ("groups.echo.reconnect_initial", {}, {"reconnect_initial": 5.0, "reconnect_max": 1.0}, 1),
        ("groups.echo.max_message", {}, {"max_message": 1 << 30}, 1),
        ("groups.echo.max_skip", {}, {"max_message": 65536, "max_skip": 4096}, 1),
        ("groups.echo.steering", {}, {"steering": "hash"}, 1),
        ("version", {}, {}, None),
        ("version", {}, {}, 2),
    ],
)
def test_check_names_the_bad_key(short_dir, key_path, daemon, group, version):
    path = write_config(short_dir / "bad.toml", daemon, {"echo": {**GOOD_GROUP, **group}}, version=version)
    result = _check(path)
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert f"kmuxd: invalid configuration: {key_path}: " in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_check_refuses_a_file_that_is_not_toml(short_dir):
    path = short_dir / "broken.toml"
    path.write_text("version = 1\n[groups.echo\n")
    result = _check(path)
    assert result.returncode == 1
    assert "is not valid TOML" in result.stderr
    result = _check(short_dir / "missing.toml")
    assert result.returncode == 1
    assert "cannot read" in result.stderr


def test_check_accepts_a_good_config(short_dir):
    path = write_config(
        short_dir / "good.toml",
        {"socket": str(short_dir / "k.sock"), "socket_mode": "0660", "log_format": "json"},
        {"echo": {**GOOD_GROUP, "framing": {"length_size": 2, "length_adjust": 2}, "max_message": 4096}},
    )
    result = _check(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"kmuxd: {path}: ok (1 group(s): echo)"


# -- handshake ---------------------------------------------------------------------


def _raw(daemon) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    s.connect(daemon.socket_path)
    return s


def _refusal(daemon, hello: bytes | None) -> dict:
    """Send ``hello`` (or nothing) on a raw socket; returns the refusal; checks the socket closes."""
    with _raw(daemon) as s:
        if hello is not None:
            s.send(hello)
        answer = msgpack.unpackb(s.recv(65536))
        assert s.recv(65536) == b"", "the daemon did not close a refused socket"
    assert set(answer) == {"kmux", "ok", "code", "error"}, answer
    assert answer["kmux"] == 1 and answer["ok"] is False and answer["error"]
    return answer


@pytest.fixture
def echo_daemon(backend_factory, daemon_factory):
    backend = backend_factory(summarize=summarize_frame, max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=2)}, handshake_timeout=0.5)
    backend.wait_open(2)
    return backend, daemon


def _works(backend, daemon, cid: int = 50) -> None:
    """The daemon still serves: a fresh client's message reaches the server."""
    before = backend.count()
    with daemon.connect(receive=False) as c:
        c.send(make_frame(cid, 1, 64))
        backend.wait_count(before + 1, timeout=5)
    assert backend.records()[-1][1][:2] == (cid, 1)


def test_unknown_group_is_refused(echo_daemon):
    backend, daemon = echo_daemon
    with pytest.raises(kmux.UnknownGroup) as info:
        daemon.connect(group="nope")
    assert info.value.code == "unknown_group"
    assert "nope" in info.value.message and "echo" not in info.value.message  # never names other groups
    assert _refusal(daemon, msgpack.packb({"kmux": 1, "group": "nope"}))["code"] == "unknown_group"
    _works(backend, daemon)


@pytest.mark.parametrize(
    ("hello", "code"),
    [
        (b"\xc1\xc1 not msgpack", "handshake_invalid"),
        (msgpack.packb([1, "echo"]), "handshake_invalid"),
        (msgpack.packb({"group": "echo"}), "handshake_invalid"),
        (msgpack.packb({"kmux": 1, "group": "echo", "colour": "red"}), "handshake_invalid"),
        (msgpack.packb({"kmux": 1, "group": "echo", "receive": "yes"}), "handshake_invalid"),
        (msgpack.packb({"kmux": 1, "group": "echo", "pad": "x" * 5000}), "handshake_invalid"),
        (msgpack.packb({"kmux": 2, "group": "echo"}), "version_unsupported"),
        (None, "handshake_invalid"),  # nothing within handshake_timeout
    ],
    ids=["garbage", "list", "no-version", "unknown-key", "bad-receive", "oversized", "version-2", "silence"],
)
def test_malformed_handshake_is_refused_and_closed(echo_daemon, hello, code):
    backend, daemon = echo_daemon
    assert _refusal(daemon, hello)["code"] == code
    assert daemon.wait_log("client_refused", error_code=code, timeout=5)
    _works(backend, daemon)


def test_too_many_clients_is_refused_until_one_leaves(backend_factory, daemon_factory):
    backend = backend_factory(summarize=summarize_frame, max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=1)}, max_clients=2)
    backend.wait_open(1)
    first, second = daemon.connect(), daemon.connect()
    try:
        answer = _refusal(daemon, msgpack.packb({"kmux": 1, "group": "echo"}))
        assert answer["code"] == "too_many_clients", answer
        daemon.wait_log("client_refused", error_code="too_many_clients", timeout=5)
        first.close()
        daemon.wait_log("client_detached", client=first.client_id, timeout=5)
        with daemon.connect(receive=False) as third:
            third.send(make_frame(3, 1, 64))
            backend.wait_count(1, timeout=5)
    finally:
        first.close()
        second.close()
    assert [rec[:2] for _, rec in backend.records()] == [(3, 1)]


def test_library_always_reports_too_many_clients(backend_factory, daemon_factory):
    backend = backend_factory(max_frame=MAX)
    daemon = daemon_factory({"echo": group_config(backend, connections=1)}, max_clients=1)
    backend.wait_open(1)
    # Regression: the refusal used to race the client's hello (EPIPE -> DaemonUnavailable).
    with daemon.connect():
        for _ in range(200):
            with pytest.raises(kmux.TooManyClients):
                daemon.connect()


# -- bad messages --------------------------------------------------------------------


def _handshake(daemon, receive: bool = False) -> socket.socket:
    s = _raw(daemon)
    s.send(msgpack.packb({"kmux": 1, "group": "echo", "receive": receive}))
    answer = msgpack.unpackb(s.recv(65536))
    assert answer["ok"] is True, answer
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX)
    return s


def test_bad_messages_are_refused_and_never_reach_the_server(echo_daemon):
    backend, daemon = echo_daemon
    # Valid traffic from another client flows throughout.
    good = daemon.connect(receive=False)
    good_count = 3000
    failures: list[BaseException] = []

    def run_good() -> None:
        try:
            for seq in range(1, good_count + 1):
                good.send(make_frame(2, seq, 14 + (seq * 131) % 3000))
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run_good, daemon=True)
    thread.start()
    try:
        with daemon.connect(receive=False, validate=False) as bad:
            bad_id = bad.client_id
            short_header = struct.pack(">I", 196) + make_frame(1, 2, 100)[4:]  # announces 200 bytes, has 100
            long_header = struct.pack(">I", 40) + make_frame(1, 3, 100)[4:]  # announces 44, has 100
            plan = [
                (make_frame(1, 1, 100), None),
                (short_header, kmux.BadFrame),
                (long_header, kmux.BadFrame),
                (b"\x00\x00", kmux.BadFrame),  # shorter than the header
                (b"", kmux.BadFrame),
                (make_frame(1, 6, MAX + 1), kmux.MessageTooBig),  # one byte over, header right
                (make_frame(1, 7, 3 * MAX), kmux.MessageTooBig),  # over the daemon's buffer room
                (make_frame(1, 8, MAX), None),  # exactly max_message is fine
                (make_frame(1, 9, MIN_FRAME), None),
            ]
            for seq, (msg, _) in enumerate(plan, 1):
                assert bad.send(msg) == seq
            for seq, (_, err) in enumerate(plan, 1):
                if err is None:
                    continue
                with pytest.raises(err) as info:
                    bad.recv(timeout=5)
                assert info.value.seq == seq, (seq, info.value)
            with pytest.raises(TimeoutError):
                bad.recv(timeout=0.2)  # exactly one notice per refused message
            # The session goes on.
            bad.send(make_frame(1, 10, 500))
            thread.join(30)
            assert not thread.is_alive() and not failures, failures
            total = good_count + 4
            backend.wait_count(total, timeout=20)
            assert wait_flat(backend.count, quiet=0.3, timeout=10) == total
    finally:
        thread.join(5)
        good.close()
    records = backend.records()
    assert all(rec[0] != "bad" for _, rec in records), [r for r in records if r[1][0] == "bad"][:3]
    assert all(c.parse_error is None and c.buffered == 0 for c in backend.conns())
    got = Counter(rec[:2] for _, rec in records)
    assert got == Counter([(1, 1), (1, 8), (1, 9), (1, 10)] + [(2, s) for s in range(1, good_count + 1)])
    check_order_per_connection(records)
    # Every refusal got its notice (above) and is counted; the log is rate
    # limited per client (a buggy app must not flood it): the first one shows.
    refused = daemon.wait_log("message_refused", count=1, timeout=5)
    assert refused[0]["seq"] == 2 and refused[0]["suppressed"] == 0
    with ControlClient(daemon.control_socket, timeout=5) as control:
        group = control.request("stats", group="echo")["groups"][0]
    assert group["refused"] == 6
    # Its detach line follows every refusal line it could have caused, in log order.
    daemon.wait_log("client_detached", client=bad_id, timeout=5)
    assert len(daemon.logs("message_refused")) == 1


def test_library_validation_refuses_locally_without_counting(echo_daemon):
    backend, daemon = echo_daemon
    with daemon.connect(receive=False) as c:
        with pytest.raises(kmux.BadFrame):
            c.send(struct.pack(">I", 10) + b"abc")
        with pytest.raises(kmux.MessageTooBig):
            c.send(make_frame(1, 1, MAX + 1))
        assert c.seq == 0
        assert c.send(make_frame(1, 1, 64)) == 1
        backend.wait_count(1, timeout=5)
    assert [rec[:2] for _, rec in backend.records()] == [(1, 1)]
    assert daemon.logs("message_refused") == []


def test_bad_packets_cost_a_notice_not_the_session(echo_daemon):
    backend, daemon = echo_daemon
    with _handshake(daemon) as s:
        s.send(b"\x07junk")  # unknown kind
        s.send(b"\x01" + msgpack.packb({"op": "launch"}))  # unknown control op
        s.send(b"\x02" + u32be(b"never delivered"))  # REQUEUE of a message never delivered
        notices = [msgpack.unpackb(s.recv(65536)[1:]) for _ in range(3)]
        assert [n["code"] for n in notices] == ["bad_packet"] * 3, notices
        assert all("seq" not in n for n in notices)
        s.send(b"\x00" + make_frame(3, 1, 100))
        backend.wait_count(1, timeout=5)
    assert [rec[:2] for _, rec in backend.records()] == [(3, 1)]


# -- dying clients -----------------------------------------------------------------------

_CLIENT_SCRIPT = """
import random, sys
import kmux
from tests.integration.helpers import make_frame
client = kmux.connect("echo", sys.argv[1], receive=False)
rng = random.Random(99)
seq = 0
while True:
    seq += 1
    client.send(make_frame(99, seq, rng.randint(14, 65536), rng))
"""


def test_a_client_killed_mid_stream_hurts_nobody(echo_daemon):
    backend, daemon = echo_daemon
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLIENT_SCRIPT, daemon.socket_path], cwd=REPO, env=env, stderr=subprocess.PIPE
    )
    others = [daemon.connect(receive=False) for _ in range(3)]
    errors: list[BaseException] = []
    per_client = 1500

    def run(i: int, c) -> None:
        try:
            for seq in range(1, per_client + 1):
                c.send(make_frame(10 + i, seq, 14 + (seq * 7919) % 20000))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(others)]
    try:
        for t in threads:
            t.start()
        wait_until(
            lambda: sum(1 for _, rec in backend.records() if rec[0] == 99) >= 300 or proc.poll() is not None,
            20,
            "traffic from the client process",
        )
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        daemon.wait_log("client_detached", client_pid=proc.pid, timeout=10)
        for t in threads:
            t.join(30)
            assert not t.is_alive()
        assert not errors, errors
        wait_until(lambda: backend.count() >= 3 * per_client, 20, "the other clients' messages")
        wait_flat(backend.count, quiet=0.3, timeout=10)
        _works(backend, daemon)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()
        for c in others:
            c.close()
    records = backend.records()
    assert all(rec[0] != "bad" for _, rec in records)
    assert all(c.parse_error is None and c.buffered == 0 and c.open for c in backend.conns())
    assert len(backend.conns()) == 2
    check_order_per_connection(records)
    got = Counter(rec[:2] for _, rec in records)
    assert max(got.values()) == 1
    for i in range(3):
        assert {s for (cid, s) in got if cid == 10 + i} == set(range(1, per_client + 1))
    # The killed client's messages: each whole and once, a gapless prefix of what it sent.
    dead = sorted(s for (cid, s) in got if cid == 99)
    assert dead == list(range(1, len(dead) + 1)) and len(dead) >= 300


# -- stopping ---------------------------------------------------------------------------------


def test_sigterm_on_an_idle_daemon_exits_cleanly(echo_daemon, short_dir):
    backend, daemon = echo_daemon
    _works(backend, daemon)
    assert daemon.stop() == 0, daemon.stderr_text()[-3000:]
    assert "Traceback" not in daemon.stderr_text()
    assert daemon.logs("group_final", group="echo", tx_msgs=1)
    assert not Path(daemon.socket_path).exists()
    wait_until(lambda: all(not c.open for c in backend.conns()), 5, "the daemon to close its connections")


# -- a second daemon ------------------------------------------------------------------------


def _second_daemon(daemon) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*kmuxd_command(), "--config", str(daemon.config_path)], capture_output=True, text=True, timeout=30
    )


def test_second_daemon_on_the_same_socket_refuses_to_start(echo_daemon):
    backend, daemon = echo_daemon
    result = _second_daemon(daemon)
    assert result.returncode == 1, result
    assert f"{daemon.socket_path}: another daemon is listening there" in result.stderr
    # The first daemon keeps its socket and goes on serving.
    assert daemon.proc.poll() is None
    assert Path(daemon.socket_path).is_socket()
    _works(backend, daemon)


def test_second_daemon_reports_the_refusal_in_one_line(echo_daemon):
    backend, daemon = echo_daemon
    result = _second_daemon(daemon)
    assert result.returncode == 1
    assert f"kmuxd: {daemon.socket_path}: another daemon is listening there\n" in result.stderr
    assert "Traceback" not in result.stderr
