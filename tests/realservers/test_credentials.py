"""``kmuxd handshake memcached-sasl-plain`` writes a file that a real memcached with SASL accepts.

memcached from Debian, started with ``-S`` (SASL on: every command but
VERSION and the SASL ones is refused until the connection authenticates)
and a sasldb made by ``saslpasswd2`` (``secure.start_memcached_sasl``).
The file is written the way docs/systemd.md tells an operator to, with the
password in a file or on standard input and never on the command line,
then sent as it is, as kmuxd's handshake runner sends a ``send_file``; the
reply is checked at the offset the writer prints (status, bytes 6..7).
"""

from __future__ import annotations

import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from . import MC_HEADER, OP_GET, STATUS_OK, mc_get, mc_parse, mc_set, recv_exact
from .secure import SASL_PASSWORD, SASL_USER, STATUS_AUTH_ERROR, sasl_plain_auth, start_memcached_sasl


@pytest.fixture
def sasl_memcached(short_dir: Path):
    server = start_memcached_sasl(short_dir)
    try:
        yield server
    finally:
        server.stop()


def write_handshake(out: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "kmuxd", "handshake", "memcached-sasl-plain", *args, "-o", str(out)],
                          input=stdin, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc


def exchange(sock: socket.socket, request: bytes) -> bytes:
    """One binary-protocol request and its whole response (bytes as received)."""
    sock.sendall(request)
    head = recv_exact(sock, MC_HEADER.size)
    (bodylen,) = struct.unpack_from(">I", head, 8)
    return head + recv_exact(sock, bodylen)


def test_the_written_file_authenticates_and_the_connection_then_serves(sasl_memcached, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text(SASL_PASSWORD + "\n")
    pw.chmod(0o600)
    handshake = tmp_path / "mc-sasl"
    proc = write_handshake(handshake, "--user", SASL_USER, "--password-file", str(pw))
    assert stat.S_IMODE(handshake.stat().st_mode) == 0o600
    # The same bytes as the tests' own reading of the protocol (RFC 4616 inside SASL_AUTH).
    assert handshake.read_bytes() == sasl_plain_auth(SASL_USER, SASL_PASSWORD)
    assert b"expect_offset = 6" in proc.stderr and b'expect_hex = "0000"' in proc.stderr
    with socket.create_connection(("127.0.0.1", sasl_memcached.port), timeout=5) as s:
        # SASL is really on: an unauthenticated command is refused.
        assert mc_parse(exchange(s, mc_get(b"k", opaque=1))).status == STATUS_AUTH_ERROR
    with socket.create_connection(("127.0.0.1", sasl_memcached.port), timeout=5) as s:
        reply = exchange(s, handshake.read_bytes())
        assert reply[6:8] == bytes.fromhex("0000"), mc_parse(reply)  # the check the group's handshake step makes
        assert mc_parse(exchange(s, mc_set(b"cred-key", b"value", opaque=2))).status == STATUS_OK
        got = mc_parse(exchange(s, mc_get(b"cred-key", opaque=3)))
        assert (got.opcode, got.status, got.value) == (OP_GET, STATUS_OK, b"value")


def test_a_wrong_password_is_refused_at_the_checked_offset(sasl_memcached, tmp_path: Path) -> None:
    handshake = tmp_path / "mc-sasl-wrong"
    write_handshake(handshake, "--user", SASL_USER, "--password-file", "-", stdin=b"not-the-password\n")
    with socket.create_connection(("127.0.0.1", sasl_memcached.port), timeout=5) as s:
        reply = exchange(s, handshake.read_bytes())
        assert reply[6:8] == STATUS_AUTH_ERROR.to_bytes(2, "big"), mc_parse(reply)
        # memcached keeps the connection open, unauthenticated.
        assert mc_parse(exchange(s, mc_get(b"cred-key", opaque=4))).status == STATUS_AUTH_ERROR


def test_the_password_from_standard_input_authenticates(sasl_memcached, tmp_path: Path) -> None:
    handshake = tmp_path / "mc-sasl-stdin"
    write_handshake(handshake, "--user", SASL_USER, "--password-file", "-", stdin=SASL_PASSWORD.encode())
    with socket.create_connection(("127.0.0.1", sasl_memcached.port), timeout=5) as s:
        assert exchange(s, handshake.read_bytes())[6:8] == b"\0\0"
