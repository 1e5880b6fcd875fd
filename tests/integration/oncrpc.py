"""ONC RPC over TCP for the tests (RFC 5531), and a scripted TCP server for any framing.

Written from the RFC, not from :mod:`kmux.framing`: record marks are built
and walked here with ``struct``, so a test that checks a record kmuxd passed
through reads it independently of the decoder under test.

* :func:`record` cuts a body into fragments of chosen sizes (zero allowed);
  :func:`fragments_of` and :func:`body_of` read one back.
* :func:`call` / :func:`parse_reply` are the portmapper's call and reply
  bodies (AUTH_NONE); ``PMAPPROC_*`` and :func:`mapping` its procedures and
  argument (RFC 1833 section 3).
* :class:`ScriptedServer` is a threaded TCP server on 127.0.0.1 that cuts
  what it receives with a framing and answers each message as the test's
  ``respond(message)`` says: byte strings to send and pauses between them.
  It can trickle a reply byte by byte, announce a record that never ends,
  never send its last fragment, or close mid-reply (:data:`CLOSE`). Every
  wait in it is bounded.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from kmux.framing import Framing, Reassembler

LAST_FRAGMENT = 0x80000000
#: Call and reply (RFC 5531 section 9).
CALL, REPLY = 0, 1
MSG_ACCEPTED, SUCCESS = 0, 0
PMAP_PROG, PMAP_VERS = 100000, 2
PMAPPROC_NULL, PMAPPROC_SET, PMAPPROC_UNSET, PMAPPROC_GETPORT, PMAPPROC_DUMP = 0, 1, 2, 3, 4
IPPROTO_TCP = 6
#: Bytes of a call before its arguments: xid, type, rpcvers, prog, vers, proc, and two empty AUTH_NONE.
CALL_HEADER = 40
#: Program numbers 0x20000000..0x3fffffff are for users to define (RFC 5531 appendix A).
USER_PROGRAMS = 0x20000000


def record(body: bytes, fragments: list[int] | None = None) -> bytes:
    """``body`` as one record: fragments of these sizes (cut short at the body's end), then the rest."""
    out = []
    pos = 0
    for size in fragments or ():
        piece = body[pos : pos + size]
        out.append(struct.pack(">I", len(piece)) + piece)
        pos += len(piece)
    rest = body[pos:]
    out.append(struct.pack(">I", LAST_FRAGMENT | len(rest)) + rest)
    return b"".join(out)


def fragments_of(rec: bytes) -> list[int]:
    """The data sizes of a record's fragments; AssertionError if ``rec`` is not exactly one record."""
    sizes = []
    pos = 0
    while True:
        assert len(rec) - pos >= 4, f"record ends inside a mark at {pos} ({len(rec)} bytes)"
        (word,) = struct.unpack_from(">I", rec, pos)
        size = word & ~LAST_FRAGMENT
        sizes.append(size)
        pos += 4 + size
        if word & LAST_FRAGMENT:
            assert pos == len(rec), f"the last fragment ends at {pos}, the record has {len(rec)} bytes"
            return sizes
        assert pos < len(rec), f"fragment {len(sizes)} runs to {pos}, past the record's {len(rec)} bytes"


def body_of(rec: bytes) -> bytes:
    """A record's fragment data, joined (the RPC message)."""
    out = []
    pos = 0
    for size in fragments_of(rec):
        out.append(rec[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return b"".join(out)


def call(xid: int, proc: int, args: bytes = b"", prog: int = PMAP_PROG, vers: int = PMAP_VERS) -> bytes:
    """A call's body with AUTH_NONE credentials and verifier."""
    return struct.pack(">IIIIII", xid, CALL, 2, prog, vers, proc) + struct.pack(">IIII", 0, 0, 0, 0) + args


def reply(xid: int, result: bytes) -> bytes:
    """An accepted, successful reply's body (AUTH_NONE verifier)."""
    return struct.pack(">IIIIII", xid, REPLY, MSG_ACCEPTED, 0, 0, SUCCESS) + result


@dataclass(frozen=True)
class Reply:
    xid: int
    result: bytes


def parse_reply(body: bytes) -> Reply:
    """An accepted, successful reply; AssertionError for anything else."""
    xid, mtype, stat, flavor, vlen = struct.unpack_from(">IIIII", body)
    assert mtype == REPLY and stat == MSG_ACCEPTED, f"xid {xid}: not an accepted reply ({mtype}, {stat})"
    pos = 20 + (vlen + 3) // 4 * 4
    (accept,) = struct.unpack_from(">I", body, pos)
    assert accept == SUCCESS, f"xid {xid}: accept_stat {accept} (flavor {flavor})"
    return Reply(xid, body[pos + 4 :])


def mapping(prog: int, vers: int = 1, prot: int = IPPROTO_TCP, port: int = 0) -> bytes:
    """The portmapper's ``struct mapping`` (RFC 1833 section 3.1)."""
    return struct.pack(">IIII", prog, vers, prot, port)


def dump_entries(result: bytes) -> list[tuple[int, int, int, int]]:
    """PMAPPROC_DUMP's list of mappings: ``(prog, vers, prot, port)`` each."""
    out = []
    pos = 0
    while True:
        (more,) = struct.unpack_from(">I", result, pos)
        pos += 4
        if not more:
            assert pos == len(result), "bytes after the end of the list"
            return out
        out.append(struct.unpack_from(">IIII", result, pos))
        pos += 16


#: What ``respond`` returns: bytes to send, seconds to pause (at most PAUSE_MAX each), or CLOSE.
Script = Iterable["bytes | float | object"]
PAUSE_MAX = 5.0
#: In a script: close the connection now (a FIN, whatever was promised).
CLOSE = object()
#: Bound on every blocking socket call in the server, and on joining its threads.
IO_TIMEOUT = 0.2
JOIN_TIMEOUT = 5.0


@dataclass
class ServedConn:
    """One accepted connection, as the server saw it."""

    received: list[bytes] = field(default_factory=list)
    bytes_sent: int = 0
    #: How the connection ended: "eof" (the peer closed), "reset", "stopped", "closed" (the
    #: script closed it), or None while open.
    ended: str | None = None


class ScriptedServer:
    """A TCP server on 127.0.0.1:0: each message it receives (cut by ``framing``) is
    answered by ``respond(message)``. Runs until :meth:`close` (a context manager)."""

    def __init__(self, framing: Framing, respond: Callable[[bytes], Script], max_message: int = 1 << 20,
                 nodelay: bool = True) -> None:
        self.framing = framing
        self.respond = respond
        self.max_message = max_message
        self.nodelay = nodelay
        self.conns: list[ServedConn] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(IO_TIMEOUT)
        self.port = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, name="scripted-accept", daemon=True)]
        self._threads[0].start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def messages(self) -> list[bytes]:
        with self._lock:
            return [m for c in self.conns for m in c.received]

    def __enter__(self) -> "ScriptedServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        for t in list(self._threads):
            t.join(JOIN_TIMEOUT)
        self._listener.close()
        with self._lock:
            for s in self._socks:
                s.close()
        stuck = [t.name for t in self._threads if t.is_alive()]
        assert not stuck, f"scripted server threads did not stop: {stuck}"
        if self.errors:
            raise AssertionError(f"scripted server failed: {self.errors[0]!r}") from self.errors[0]

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(IO_TIMEOUT)
            if self.nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = ServedConn()
            t = threading.Thread(target=self._serve, args=(sock, conn), name=f"scripted-{len(self.conns)}",
                                 daemon=True)
            with self._lock:
                self._socks.append(sock)
                self.conns.append(conn)
                self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, conn: ServedConn) -> None:
        reasm = Reassembler(self.framing, self.max_message)
        try:
            while not self._stop.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    conn.ended = "eof"
                    return
                for message in reasm.feed(data):
                    with self._lock:
                        conn.received.append(message)
                    for item in self.respond(message):
                        if item is CLOSE:
                            sock.shutdown(socket.SHUT_RDWR)
                            conn.ended = "closed"
                            return
                        if isinstance(item, float):
                            if self._stop.wait(min(item, PAUSE_MAX)):
                                break
                            continue
                        self._send(sock, item)
                        conn.bytes_sent += len(item)
            conn.ended = conn.ended or "stopped"
        except (ConnectionResetError, BrokenPipeError):
            conn.ended = "reset"
        except OSError as exc:
            if self._stop.is_set():
                conn.ended = "stopped"
            else:
                conn.ended = "reset"
                if not isinstance(exc, ConnectionError):
                    self.errors.append(exc)
        except BaseException as exc:  # noqa: BLE001 - reported by close()
            self.errors.append(exc)

    def _send(self, sock: socket.socket, data: bytes) -> None:
        deadline = time.monotonic() + PAUSE_MAX
        view = memoryview(data)
        while view:
            if self._stop.is_set():
                raise OSError("stopped")
            try:
                n = sock.send(view)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
                continue
            view = view[n:]
