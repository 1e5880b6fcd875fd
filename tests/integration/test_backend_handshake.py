"""The per-connection handshake steps (``[[groups.NAME.handshake]]``) against scripted servers.

Real SASL against memcached is in tests/realservers/test_sasl.py. Here the
server does what a real one will not do on cue: take two steps, close in
the middle, stall, answer with the wrong bytes or with more than its reply.
What must hold:

* a connection takes apps' traffic only after every step's reply matched;
  no reply ever reaches an app or counts as unmatched;
* the steps run again on every new connection (an operator's reconnect);
* a mismatch, a close or a time-out is a failed dial whose reason names
  the step and the bytes, counted toward the endpoint's health (never a
  recycle), bounded by ``auth_timeout``.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import kmux

from .helpers import group_record, kmux_cli, log_time, wait_until
from .secure_peers import Peer, ScriptedServer

AUTH_TIMEOUT = 0.5


def step_file(directory: Path, name: str, payload: bytes) -> str:
    path = directory / name
    path.write_bytes(struct.pack(">I", len(payload)) + payload)
    path.chmod(0o600)
    return str(path)


def group(server: ScriptedServer, steps: list[dict], **kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "endpoints": [server.address],
        "connections": 2,
        "handshake": steps,
        "auth_timeout": AUTH_TIMEOUT,
        "reconnect_initial": 0.05,
        "reconnect_max": 0.2,
        "queue_timeout": 1.0,
    }
    cfg.update(kw)
    return cfg


def login_then_echo(peer: Peer) -> None:
    """Two steps (each reply: status 0000 then text), recorded in ``server.results``; then echo every frame."""
    logins = [peer.recv_frame()]
    peer.send_frame(b"\x00\x00OK")
    logins.append(peer.recv_frame())
    peer.send_frame(b"\x00\x00OK, db 3")
    peer.server.results.append(logins)
    while True:
        try:
            frame = peer.recv_frame()
        except (EOFError, OSError):
            return
        peer.send_frame(frame)


def test_two_steps_then_traffic_replies_never_reach_an_app_and_steps_rerun_on_reconnect(daemon_factory, short_dir):
    steps = [
        {"send_file": step_file(short_dir, "login", b"LOGIN alice s3cret"), "expect_offset": 4, "expect_hex": "0000"},
        {"send_file": step_file(short_dir, "select", b"SELECT 3"), "expect_offset": 4, "expect_hex": "0000"},
    ]
    with ScriptedServer(login_then_echo) as server:
        daemon = daemon_factory({"g": group(server, steps, steering="fifo")})
        daemon.wait_log("connected", count=2)
        with kmux.connect("g", daemon.socket_path, timeout=5.0) as c:
            for i in range(20):
                c.send(struct.pack(">I", 6) + b"ping%02d" % i)
                assert c.recv(timeout=5) == struct.pack(">I", 6) + b"ping%02d" % i
            r = kmux_cli(daemon, "reconnect", "g", "0")
            assert r.returncode == 0, r.stderr
            daemon.wait_log("connected", count=3)
            for i in range(20):
                c.send(struct.pack(">I", 6) + b"pong%02d" % i)
                assert c.recv(timeout=5) == struct.pack(">I", 6) + b"pong%02d" % i
        logins = [r for r in server.results if isinstance(r, list)]
        assert len(logins) >= 3 and all(x == [b"LOGIN alice s3cret", b"SELECT 3"] for x in logins), logins
        g = wait_until(lambda: (g := group_record(daemon, "g"))["requests_in_flight"] == 0 and g, 5, "settled")
        assert g["unmatched_responses"] == 0 and g["rx_msgs"] == 40, g
        assert g["security"]["handshake_steps"] == 2 and not daemon.logs("dial_failed")
        assert not server.errors, server.errors


def failing(daemon, count: int = 2) -> list[dict]:
    lines = daemon.wait_log("dial_failed", count=count, timeout=10)
    g = group_record(daemon, "g")
    assert g["connections_up"] == 0 and g["recycles"] == 0, g
    health = g["endpoint_health"][0]
    assert health["failures"] >= 1 and health["recycles"] == 0, health
    return lines


def test_a_close_during_the_handshake_is_a_failure_never_a_recycle(daemon_factory, short_dir):
    def close_after_login(peer: Peer) -> None:
        peer.recv_frame()

    with ScriptedServer(close_after_login) as server:
        steps = [{"send_file": step_file(short_dir, "login", b"LOGIN"), "expect_offset": 4, "expect_hex": "0000"}]
        daemon = daemon_factory({"g": group(server, steps)})
        lines = failing(daemon)
        assert lines[0]["error"] == ("handshake step 1: the server closed the connection "
                                     "(a close during the handshake is a failure)"), lines


def test_a_stalled_step_fails_within_auth_timeout(daemon_factory, short_dir):
    def stall_at_step_two(peer: Peer) -> None:
        peer.recv_frame()
        peer.send_frame(b"\x00\x00")
        peer.recv_frame()
        peer.wait_closed()

    with ScriptedServer(stall_at_step_two) as server:
        steps = [{"send_file": step_file(short_dir, "a", b"A"), "expect_offset": 4, "expect_hex": "0000"},
                 {"send_file": step_file(short_dir, "b", b"B"), "expect_offset": 4, "expect_hex": "0000"}]
        t0 = time.time()
        daemon = daemon_factory({"g": group(server, steps)})
        lines = failing(daemon)
        assert lines[0]["error"] == f"handshake step 2: no reply within auth_timeout={AUTH_TIMEOUT}s", lines
        assert log_time(lines[0]) - t0 < AUTH_TIMEOUT + 2.0, (log_time(lines[0]) - t0)


def test_the_wrong_bytes_name_the_step_and_the_bytes(daemon_factory, short_dir):
    def refuse(peer: Peer) -> None:
        peer.recv_frame()
        peer.send_frame(b"\x00\x20denied")
        peer.wait_closed()  # like memcached after a failed SASL_AUTH: kmuxd must close

    with ScriptedServer(refuse) as server:
        steps = [{"send_file": step_file(short_dir, "a", b"A"), "expect_offset": 4, "expect_hex": "0000"}]
        daemon = daemon_factory({"g": group(server, steps)})
        lines = failing(daemon)
        assert lines[0]["error"] == "handshake step 1: bytes 4..5 are 0020, expected 0000", lines
        # Each refused connection was closed by kmuxd (the server waits for that).
        wait_until(lambda: server.accepted >= 2 and len(server.results) >= 2, 5, "kmuxd closed refused connections")


def test_bytes_beyond_the_reply_fail_the_step(daemon_factory, short_dir):
    def chatty(peer: Peer) -> None:
        peer.recv_frame()
        peer.sock.sendall(struct.pack(">I", 2) + b"\x00\x00" + struct.pack(">I", 3) + b"hey")
        peer.wait_closed()

    with ScriptedServer(chatty) as server:
        steps = [{"send_file": step_file(short_dir, "a", b"A"), "expect_offset": 4, "expect_hex": "0000"}]
        daemon = daemon_factory({"g": group(server, steps)})
        lines = failing(daemon)
        assert lines[0]["error"] == "handshake step 1: the server sent 7 bytes after its 6-byte reply", lines


def test_every_make_before_break_replacement_runs_the_steps(daemon_factory, short_dir):
    """max_requests_per_connection recycles a connection every 10 requests: each replacement logs in
    before it takes traffic, and no request is lost or answered by a login reply."""
    steps = [
        {"send_file": step_file(short_dir, "login", b"LOGIN alice s3cret"), "expect_offset": 4, "expect_hex": "0000"},
        {"send_file": step_file(short_dir, "select", b"SELECT 3"), "expect_offset": 4, "expect_hex": "0000"},
    ]
    with ScriptedServer(login_then_echo) as server:
        daemon = daemon_factory({"g": group(server, steps, steering="fifo", connections=1,
                                            max_requests_per_connection=10, request_timeout=5.0)})
        daemon.wait_log("connected")
        with kmux.connect("g", daemon.socket_path, timeout=5.0) as c:
            for i in range(60):
                c.send(struct.pack(">I", 6) + b"req%03d" % i)
                assert c.recv(timeout=5) == struct.pack(">I", 6) + b"req%03d" % i
        logins = [r for r in server.results if isinstance(r, list)]
        assert len(logins) >= 6 and all(x == [b"LOGIN alice s3cret", b"SELECT 3"] for x in logins), logins
        g = group_record(daemon, "g")
        assert g["recycles"] >= 5 and g["unmatched_responses"] == 0 and g["requests_failed"] == 0, g
        assert not daemon.logs("dial_failed")
