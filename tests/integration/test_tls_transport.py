"""TlsTransport alone, over a real socket pair: the contract Conn relies on.

The client side is kmuxd's :class:`~kmuxd.io.tls.TlsTransport` (non-blocking,
as in the event core); the server side is a plain blocking ``ssl`` socket.
What must hold:

* ``send`` takes a whole batch with one write and returns its length, even
  when the kernel refuses part of the ciphertext; that part is the
  ``backlog``, and the next ``send`` refuses (``BlockingIOError``) until
  ``push`` has written it (rule 1);
* ``recv_into`` fills a small space and says ``buffered`` while plaintext
  waits inside, and the rest comes out on later calls with nothing new on
  the socket (rule 2);
* a close of the peer reads as 0, after every byte it sent.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from pathlib import Path

import pytest

from kmuxd.io.tls import TlsClient
from kmuxd.system.config import Endpoint, TlsConfig

from .certs import SERVER_NAME, make_pki


@pytest.fixture
def pair(short_dir: Path):
    """(transport, server ssl socket), handshake done."""
    pki = make_pki(short_dir / "pki")
    a, b = socket.socketpair()
    a.setblocking(False)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    holder: dict = {}

    def serve() -> None:
        holder["s"] = server_ctx.wrap_socket(b, server_side=True)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client = TlsClient(TlsConfig(ca=str(pki.ca), server_name=SERVER_NAME))
    transport = client.wrap(a, Endpoint("127.0.0.1", 1), 4096)
    for _ in range(1000):  # bounded: the handshake takes a few round trips
        done = transport.handshake()
        while not transport.push():
            select.select([], [a], [], 5)
        if done:
            break
        select.select([a], [], [], 5)
        try:
            transport.feed()
        except BlockingIOError:
            pass
    t.join(10)
    assert transport.verified and "s" in holder
    s = holder["s"]
    s.settimeout(10)
    try:
        yield transport, s
    finally:
        s.close()
        a.close()


def test_a_batch_is_taken_whole_and_the_refused_ciphertext_waits_as_backlog(pair):
    transport, server = pair
    batch = bytes(range(256)) * 4096  # 1 MiB: more than the socket pair's buffers
    assert transport.send(batch) == len(batch)
    assert transport.backlog, "the kernel took 1 MiB of ciphertext at once?"
    with pytest.raises(BlockingIOError):
        transport.send(b"next batch")  # nothing is taken while ciphertext waits
    got = bytearray()

    def drain() -> None:
        while len(got) < len(batch):
            got.extend(server.recv(65536))

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()

    for _ in range(10_000):
        if transport.push():
            break
        select.select([], [transport.sock], [], 5)
    reader.join(10)
    assert not transport.backlog and bytes(got) == batch


def test_plaintext_left_inside_is_served_without_the_socket(pair):
    transport, server = pair
    data = bytes(range(256)) * 64  # 16 KiB: one record
    server.sendall(data)

    select.select([transport.sock], [], [], 5)
    out = bytearray()
    space = bytearray(1000)
    view = memoryview(space)
    for _ in range(100):  # until the record is whole inside
        try:
            n = transport.recv_into(view)
            out += space[:n]
            break
        except BlockingIOError:
            select.select([transport.sock], [], [], 5)
    assert transport.buffered  # the space was full and plaintext waits inside
    transport.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    while transport.buffered:  # no readiness needed: nothing more is on the socket
        n = transport.recv_into(view)
        out += space[:n]
    assert bytes(out) == data
    with pytest.raises(BlockingIOError):
        transport.recv_into(view)


def test_a_close_reads_as_zero_after_everything_sent(pair):
    transport, server = pair
    server.sendall(b"last words")
    server.close()  # a FIN with no close_notify, as many servers close

    out = bytearray()
    space = bytearray(4096)
    for _ in range(100):
        select.select([transport.sock], [], [], 5)
        try:
            n = transport.recv_into(memoryview(space))
        except BlockingIOError:
            continue
        if n == 0:
            break
        out += space[:n]
    assert bytes(out) == b"last words" and transport.eof
