"""Hostile packets the fuzz targets found, against a real kmuxd: each gets its documented error.

Before the fixes in ``kmux.protocol`` and ``kmuxd.io.control.parse_request``
(see ``docs/fuzzing.md``), a 9-byte CONTROL packet ``{"op": []}`` from any
local app, or a control request with a value nested 1000 deep, raised
``TypeError``/``RecursionError`` inside the daemon, which stopped it.
"""

from __future__ import annotations

import socket

import msgpack
import pytest

from kmux.control import ControlClient
from kmux.protocol import Hello, decode_notice, encode_hello

from .helpers import group_config, u32be

#: A list nested 1010 deep: under msgpack's stack limit (1024), over Python's recursion limit.
DEEP = b"\x91" * 1010 + b"\xc0"

HOSTILE_CONTROL_BODIES = {
    "list op": msgpack.packb({"op": []}),
    "map op": msgpack.packb({"op": {}}),
    "deep op": b"\x81\xa2op" + DEEP,
    "deep on": b"\x82\xa2op\xa7receive\xa2on" + DEEP,
    "bin key": b"\x82\xa2op\xa7receive\xc4\x02on\xc3",
}


def _seqpacket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def test_an_apps_hostile_control_packets_get_bad_packet_and_kmuxd_keeps_serving(backend_factory, daemon_factory):
    backend = backend_factory(echo=True)
    daemon = daemon_factory({"echo": group_config(backend, connections=1)})
    backend.wait_open(1)
    with _seqpacket(daemon.socket_path) as app:
        app.send(encode_hello(Hello("echo")))
        assert msgpack.unpackb(app.recv(65536))["ok"] is True
        for what, body in HOSTILE_CONTROL_BODIES.items():
            app.send(b"\x01" + body)
            packet = app.recv(65536)
            assert packet[:1] == b"\x01", what
            assert decode_notice(packet[1:]).code == "bad_packet", what
        # The same session still carries messages, and kmuxd still accepts apps.
        app.send(b"\x00" + u32be(b"ping"))
        assert app.recv(65536) == b"\x00" + u32be(b"ping")
    assert daemon.proc.poll() is None
    with daemon.connect() as client:
        client.send(u32be(b"pong"))
        assert client.recv(timeout=10) == u32be(b"pong")


@pytest.mark.parametrize(
    "request_bytes",
    [msgpack.packb({"op": []}), b"\x82\xa2op\xa5stats\xa5group" + DEEP, b"\x81\xa2op" + DEEP],
    ids=["list op", "deep argument", "deep op"],
)
def test_a_hostile_control_request_gets_bad_request(backend_factory, daemon_factory, request_bytes):
    backend = backend_factory()
    daemon = daemon_factory({"echo": group_config(backend, connections=1)})
    with _seqpacket(daemon.control_socket) as control:
        control.send(request_bytes)
        answer = msgpack.unpackb(control.recv(65536))
    assert (answer["ok"], answer["code"]) == (False, "bad_request")
    assert daemon.proc.poll() is None
    with ControlClient(daemon.control_socket) as c:
        assert c.request("ping")["ok"] is True
