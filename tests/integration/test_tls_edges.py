"""TLS where no real server misbehaves on cue, and the two places TLS breaks level-triggered epoll.

Against scripted servers (secure_peers.py):

* a server that stalls in the middle of the handshake, one that closes in
  it, one that answers the ClientHello with garbage: each is a failed dial
  with a clear reason, within ``connect_timeout``;
* handshake steps run *inside* TLS, after its handshake;
* **rule 1** (kmuxd.io.tls): ciphertext the kernel refused when the outbox
  is already written must still go out, with no more traffic to push it:
  a server that reads slowly must get every message;
* **rule 2**: plaintext left inside the SSLObject once the receive buffer
  was full (records of 16 KiB, a 4 KiB read buffer) must reach the app,
  though the socket has nothing more to report: a server that answers in
  one burst and goes silent.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import pytest

import kmux

from .certs import SERVER_NAME, make_pki
from .helpers import group_record, log_time, wait_until
from .secure_peers import Peer, ScriptedServer, server_context

CONNECT_TIMEOUT = 0.5


@pytest.fixture
def pki(short_dir: Path):
    return make_pki(short_dir / "pki")


def tls_group(server: ScriptedServer, pki, **kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "endpoints": [server.address],
        "connections": 1,
        "connect_timeout": CONNECT_TIMEOUT,
        "reconnect_initial": 0.05,
        "reconnect_max": 0.2,
        "queue_timeout": 1.0,
        "tls": {"ca": str(pki.ca), "server_name": SERVER_NAME},
    }
    cfg.update(kw)
    return cfg


def garbage(peer: Peer) -> None:
    peer.sock.recv(4096)  # the ClientHello
    peer.sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    peer.wait_closed()


def stall(peer: Peer) -> None:
    peer.sock.recv(4096)
    peer.wait_closed()


def close(peer: Peer) -> None:
    peer.sock.recv(4096)


def half_server_hello(peer: Peer) -> None:
    # A TLS handshake record header announcing 200 bytes, and only 20 of them.
    peer.sock.recv(4096)
    peer.sock.sendall(b"\x16\x03\x03\x00\xc8" + b"\x02" + b"\x00" * 19)
    peer.wait_closed()


CASES = {
    "garbage": (garbage, "the server's answer is not TLS (a plaintext port?) [WRONG_VERSION_NUMBER]"),
    "stall": (stall, f"timed out after {CONNECT_TIMEOUT}s (the server sent 0 bytes)"),
    "half_server_hello": (half_server_hello, f"timed out after {CONNECT_TIMEOUT}s (the server sent 25 bytes)"),
    "close": (close, "failed: the server closed the connection"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_broken_tls_handshake_is_a_failed_dial_within_connect_timeout(daemon_factory, pki, case):
    script, reason = CASES[case]
    with ScriptedServer(script) as server:
        t0 = time.time()
        daemon = daemon_factory({"g": tls_group(server, pki)})
        lines = daemon.wait_log("dial_failed", timeout=10)  # one line per slot per 10 s
        assert lines[0]["error"].startswith(f"TLS handshake with {server.address} "), lines[0]
        assert lines[0]["error"].endswith(reason), lines[0]
        assert log_time(lines[0]) - t0 < CONNECT_TIMEOUT + 2.0
        g = group_record(daemon, "g")
        assert g["connections_up"] == 0 and g["endpoint_health"][0]["failures"] >= 1, g
        with kmux.connect("g", daemon.socket_path, timeout=5.0) as c:
            c.send(struct.pack(">I", 1) + b"x")
            with pytest.raises(kmux.errors.GroupUnavailable) as info:
                c.recv(timeout=5)
        assert reason in info.value.message


def test_handshake_steps_run_inside_tls(daemon_factory, pki, short_dir):
    def login_in_tls(peer: Peer) -> None:
        peer.start_tls()
        assert peer.recv_frame() == b"AUTH token"
        peer.send_frame(b"\x00\x00")
        while True:
            peer.send_frame(peer.recv_frame())

    step = short_dir / "auth"
    step.write_bytes(struct.pack(">I", 10) + b"AUTH token")
    step.chmod(0o600)
    with ScriptedServer(login_in_tls, tls=server_context(pki)) as server:
        daemon = daemon_factory({"g": tls_group(server, pki, steering="fifo", handshake=[
            {"send_file": str(step), "expect_offset": 4, "expect_hex": "0000"}])})
        daemon.wait_log("connected")
        with kmux.connect("g", daemon.socket_path, timeout=5.0) as c:
            c.send(struct.pack(">I", 5) + b"hello")
            assert c.recv(timeout=5) == struct.pack(">I", 5) + b"hello"
        g = group_record(daemon, "g")
        assert g["unmatched_responses"] == 0 and g["connections"][0]["tls"]["verified"], g


MESSAGES = 64
PAYLOAD = 1000


def test_rule_2_plaintext_left_in_the_sslobject_reaches_the_app(daemon_factory, pki):
    """The server answers 64 requests in one burst of 16 KiB records, then says nothing more;
    the group reads 4 KiB at a time: most of the plaintext waits inside the SSLObject."""
    def burst(peer: Peer) -> None:
        peer.start_tls()
        frames = [peer.recv_frame() for _ in range(MESSAGES)]
        peer.sock.sendall(b"".join(struct.pack(">I", len(f)) + f for f in frames))
        peer.wait_closed()

    with ScriptedServer(burst, tls=server_context(pki)) as server:
        daemon = daemon_factory({"g": tls_group(server, pki, read_buffer=4096, connect_timeout=5.0)})
        daemon.wait_log("connected")
        with kmux.connect("g", daemon.socket_path, timeout=5.0) as c:
            sent = [struct.pack(">I", PAYLOAD) + bytes([i]) * PAYLOAD for i in range(MESSAGES)]
            for m in sent:
                c.send(m)
            got = [c.recv(timeout=5) for _ in range(MESSAGES)]
        assert got == sent


def test_rule_1_ciphertext_the_kernel_refused_goes_out_without_more_traffic(daemon_factory, pki):
    """A server that reads slowly (a small receive buffer, a pause per read): the last batch's
    ciphertext is still refused when the outbox is empty, and must go out all the same."""
    messages, size = 600, 16 * 1024
    counted: list[int] = []

    def slow_sink(peer: Peer) -> None:
        peer.start_tls()
        time.sleep(0.3)  # let the kernel's buffers fill
        n = 0
        while n < messages:
            peer.recv_frame()
            n += 1
            if n % 50 == 0:
                time.sleep(0.01)
        counted.append(n)
        peer.wait_closed()

    with ScriptedServer(slow_sink, tls=server_context(pki), rcvbuf=16384) as server:
        # One batch larger than the kernel will take when it has room again (its send buffer
        # autotunes up to tcp_wmem's 4 MiB): its ciphertext is refused part-way, with the
        # outbox already written and the app done sending.
        daemon = daemon_factory({"g": tls_group(server, pki, connect_timeout=5.0, max_message=65536,
                                                write_buffer=8 * 1024 * 1024)})
        daemon.wait_log("connected")
        with kmux.connect("g", daemon.socket_path, timeout=10.0) as c:
            for i in range(messages):
                c.send(struct.pack(">I", size - 4) + bytes([i % 251]) * (size - 4))
            wait_until(lambda: counted == [messages], 20, f"the server read all {messages} messages")
        assert group_record(daemon, "g")["connections"][0]["tx_msgs"] == messages
