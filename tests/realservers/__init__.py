"""kmuxd in front of real servers that no one here wrote.

The servers come from Debian packages (``./dev.sh test`` installs them:
``memcached``, ``unbound`` and ``dnsmasq-base``) and run on 127.0.0.1 ports picked at
test time; see ``conftest.py``. This module holds the wire formats the tests
speak, written from the protocols' specifications, not from kmuxd:

* memcached's binary protocol (24-byte header, big endian, ``opaque`` at
  offset 12 echoed in every response);
* DNS over TCP (RFC 1035 4.2.2: a 2-byte length prefix, then the message).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

# -- memcached binary protocol -------------------------------------------------------

MC_HEADER = struct.Struct(">BBHBBHIIQ")  # magic, opcode, keylen, extlen, datatype, vbucket|status, bodylen, opaque, cas
MC_REQUEST = 0x80
MC_RESPONSE = 0x81
OP_GET = 0x00
OP_SET = 0x01
OP_GETK = 0x0C
OP_VERSION = 0x0B
STATUS_OK = 0x0000
STATUS_KEY_NOT_FOUND = 0x0001


def mc_request(opcode: int, *, key: bytes = b"", extras: bytes = b"", value: bytes = b"", opaque: int = 0,
               cas: int = 0) -> bytes:
    body = extras + key + value
    return MC_HEADER.pack(MC_REQUEST, opcode, len(key), len(extras), 0, 0, len(body), opaque, cas) + body


def mc_set(key: bytes, value: bytes, opaque: int = 0, flags: int = 0, expiry: int = 0) -> bytes:
    return mc_request(OP_SET, key=key, extras=struct.pack(">II", flags, expiry), value=value, opaque=opaque)


def mc_get(key: bytes, opaque: int = 0, *, with_key: bool = False) -> bytes:
    return mc_request(OP_GETK if with_key else OP_GET, key=key, opaque=opaque)


@dataclass(frozen=True)
class McResponse:
    opcode: int
    status: int
    opaque: int
    cas: int
    extras: bytes
    key: bytes
    value: bytes


def mc_parse(msg: bytes) -> McResponse:
    """One whole binary-protocol response; AssertionError if it is not one."""
    assert len(msg) >= MC_HEADER.size, f"{len(msg)}-byte message is shorter than a memcached header: {msg!r}"
    magic, opcode, keylen, extlen, _dtype, status, bodylen, opaque, cas = MC_HEADER.unpack_from(msg)
    assert magic == MC_RESPONSE, f"magic {magic:#x} is not a response: {msg[:32]!r}"
    assert len(msg) == MC_HEADER.size + bodylen, f"header announces {bodylen} body bytes, message has {len(msg) - 24}"
    body = msg[MC_HEADER.size:]
    return McResponse(opcode, status, opaque, cas, body[:extlen], body[extlen:extlen + keylen], body[extlen + keylen:])


# -- DNS over TCP ------------------------------------------------------------------------

DNS_HEADER = struct.Struct(">HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
TYPE_A = 1
CLASS_IN = 1


def dns_question(name: str, qtype: int = TYPE_A, qclass: int = CLASS_IN) -> bytes:
    """The question section's bytes: QNAME as labels, QTYPE, QCLASS."""
    out = bytearray()
    for label in name.rstrip(".").split("."):
        raw = label.encode("ascii")
        assert 0 < len(raw) < 64, f"bad label {label!r}"
        out += bytes([len(raw)]) + raw
    out += b"\x00" + struct.pack(">HH", qtype, qclass)
    return bytes(out)


def dns_query(qid: int, name: str, qtype: int = TYPE_A) -> bytes:
    """A DNS-over-TCP query message: 2-byte length prefix, header (RD set), one question."""
    msg = DNS_HEADER.pack(qid, 0x0100, 1, 0, 0, 0) + dns_question(name, qtype)
    return struct.pack(">H", len(msg)) + msg


@dataclass(frozen=True)
class DnsAnswer:
    id: int
    flags: int
    rcode: int
    question: bytes  # the raw question section, as the server echoed it
    addresses: tuple[str, ...]  # the A records of the answer section, in order


def _skip_name(msg: bytes, pos: int) -> int:
    """Position after the (possibly compressed) name at ``pos``."""
    while True:
        assert pos < len(msg), "name runs past the end of the message"
        n = msg[pos]
        if n == 0:
            return pos + 1
        if n & 0xC0 == 0xC0:
            return pos + 2
        assert n < 64, f"bad label length {n:#x}"
        pos += 1 + n


def dns_parse(framed: bytes) -> DnsAnswer:
    """A DNS-over-TCP response (length prefix included); AssertionError if malformed."""
    assert len(framed) >= 2 + DNS_HEADER.size, f"{len(framed)}-byte message is too short for DNS: {framed!r}"
    (length,) = struct.unpack_from(">H", framed)
    assert length + 2 == len(framed), f"length prefix says {length} bytes, message has {len(framed) - 2}"
    msg = framed[2:]
    qid, flags, qd, an, _ns, _ar = DNS_HEADER.unpack_from(msg)
    assert flags & 0x8000, f"QR bit not set: flags {flags:#06x}"
    assert qd == 1, f"qdcount {qd}"
    pos = DNS_HEADER.size
    qend = _skip_name(msg, pos) + 4
    question = msg[pos:qend]
    pos = qend
    addresses = []
    for _ in range(an):
        pos = _skip_name(msg, pos)
        rtype, rclass, _ttl, rdlen = struct.unpack_from(">HHIH", msg, pos)
        pos += 10
        rdata = msg[pos:pos + rdlen]
        assert len(rdata) == rdlen, "record data runs past the end of the message"
        pos += rdlen
        if rtype == TYPE_A and rclass == CLASS_IN:
            assert rdlen == 4, f"A record with {rdlen} bytes"
            addresses.append(socket.inet_ntoa(rdata))
    return DnsAnswer(qid, flags, flags & 0x000F, question, tuple(addresses))


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


# -- concurrency -------------------------------------------------------------------------------


def run_threads(n: int, work: Callable[[int], Any], timeout: float) -> list[Any]:
    """Run ``work(i)`` for i in 0..n-1, one thread each, started together.

    Returns the results in order. Fails (AssertionError) if a thread is still
    running after ``timeout`` s, or re-raises the first exception a thread hit
    (the others are listed in the message).
    """
    results: list[Any] = [None] * n
    errors: list[tuple[int, BaseException]] = []
    start = threading.Barrier(n, timeout=10)

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((i, exc))

    threads = [threading.Thread(target=run, args=(i,), name=f"client{i}", daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    if errors:
        i, first = errors[0]
        others = "; ".join(f"client{j}: {e!r}" for j, e in errors[1:6])
        raise AssertionError(f"client{i} failed: {first!r}" + (f" (also {others})" if others else "")) from first
    assert not stuck, f"clients still running after {timeout}s: {stuck}"
    return results
