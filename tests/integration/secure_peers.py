"""A loopback TCP server whose connections each run a script: for what real servers will not do on cue.

The real-server tests (tests/realservers/test_tls.py, test_sasl.py) cover
TLS and SASL against memcached and unbound. These scripts cover what no
real server does when asked: stall in the middle of a TLS handshake, close
in it, answer a ClientHello with garbage, reply to a login with extra
bytes, send a burst of TLS records and go silent, read slowly.

:class:`ScriptedServer` accepts on 127.0.0.1 (an ephemeral port) and runs
``script(peer)`` in a thread per connection; :class:`Peer` gives the script
blocking u32be framing (``recv_frame``/``send_frame``) with bounded waits,
over TLS when the server has a context. Everything is closed by
:meth:`ScriptedServer.close`.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from typing import Any, Callable

#: Seconds a script's blocking read waits before giving up.
PEER_TIMEOUT = 10.0


class Peer:
    def __init__(self, server: "ScriptedServer", sock: socket.socket, index: int) -> None:
        self.server = server
        self.sock: Any = sock
        self.index = index
        sock.settimeout(PEER_TIMEOUT)

    def start_tls(self) -> None:
        assert self.server.tls is not None
        self.sock = self.server.tls.wrap_socket(self.sock, server_side=True)

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"peer closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def recv_frame(self) -> bytes:
        """One u32be frame's payload."""
        (n,) = struct.unpack(">I", self.recv_exact(4))
        return self.recv_exact(n)

    def send_frame(self, payload: bytes) -> None:
        self.sock.sendall(struct.pack(">I", len(payload)) + payload)

    def wait_closed(self) -> None:
        """Read until the client closes (or PEER_TIMEOUT): a stalled server."""
        try:
            while self.sock.recv(65536):
                pass
        except OSError:
            pass


class ScriptedServer:
    def __init__(self, script: Callable[[Peer], None], *, tls: ssl.SSLContext | None = None,
                 rcvbuf: int | None = None) -> None:
        self.script = script
        self.tls = tls
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf is not None:  # inherited by accepted sockets
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.errors: list[str] = []
        self.results: list[Any] = []
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._closing = False
        self._thread = threading.Thread(target=self._accept, name=f"scripted:{self.port}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closing:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                index = self.accepted
                self._socks.append(sock)
            threading.Thread(target=self._serve, args=(sock, index), daemon=True).start()

    def _serve(self, sock: socket.socket, index: int) -> None:
        peer = None
        try:
            peer = Peer(self, sock, index)  # the server may be closing already: EBADF
            result = self.script(peer)
            with self._lock:
                self.results.append(result)
        except (OSError, EOFError) as exc:
            if not self._closing:
                with self._lock:
                    self.errors.append(f"conn {index}: {exc!r}")
        finally:
            try:
                (peer.sock if peer is not None else sock).close()
            except OSError:
                pass

    def close(self) -> None:
        self._closing = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._thread.join(5)

    def __enter__(self) -> "ScriptedServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def server_context(pki: Any, *, client_cert: bool = False) -> ssl.SSLContext:
    """A server context with the test PKI's server certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    if client_cert:
        ctx.load_verify_locations(cafile=str(pki.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
