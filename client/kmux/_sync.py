"""The blocking client: a thin shell that moves packets for a ClientSession.

Resource handling
-----------------
The socket stays in blocking mode, so :meth:`Client.send` blocks while the
daemon's receive buffer is full. That is the intended backpressure: an app
that outruns its group's TCP connections slows down instead of piling up
memory in the daemon. Receive timeouts use ``poll``, never socket timeouts,
for that reason. One buffer of ``max_message + 1`` bytes (at least
``CONTROL_MAX + 1``) is allocated at connect time and reused: a fresh
large buffer per ``recv`` makes glibc mmap and munmap it every call.

Threads: one thread may send while another receives (a SEQPACKET send is
atomic). Call :meth:`Client.set_receive` from the receiving thread.
"""

from __future__ import annotations

import errno
import math
import os
import select
import socket
import time
from typing import Any

from ._session import ClientSession, HandBack, State
from .errors import BadPacket, DaemonUnavailable, MessageTooBig
from .framing import Framing
from .protocol import DATA_PREFIX

__all__ = ["connect", "Client"]

_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
#: Socket buffer headroom over max_message (docs/protocol.md, "Transport").
_BUFFER_HEADROOM = 65536
_PEER_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)
_DEFAULT = object()


def _unavailable(path: str, exc: OSError) -> DaemonUnavailable:
    """Name the path and the reason: the two things a user can act on."""
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
        reason = "no such socket" if exc.errno == errno.ENOENT else "connection refused"
        return DaemonUnavailable(f"no daemon listening at {path} ({reason}; is kmuxd running?)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return DaemonUnavailable(f"permission denied on {path} (is this user in the daemon's allowed groups?)")
    return DaemonUnavailable(f"cannot connect to {path}: {exc.strerror or exc}")


def _raise_peer_gone(session: ClientSession, exc: OSError) -> None:
    if exc.errno in _PEER_GONE:
        raise session.eof() from None
    raise exc


def connect(
    group: str,
    socket_path: str | os.PathLike[str] | None = None,
    *,
    receive: bool = True,
    name: str = "",
    timeout: float | None = 5.0,
    validate: bool = True,
) -> Client:
    """Join ``group`` and return a connected :class:`Client`.

    ``socket_path`` defaults to ``$KMUX_SOCKET`` or ``/run/kmuxd/kmuxd.sock``.
    ``timeout`` bounds the connect and the handshake (TimeoutError) and is
    the default bound of :meth:`Client.set_receive`. ``receive=False``
    joins as a sender only. A refusal raises its own class
    (:class:`~kmux.errors.UnknownGroup`, ...); an unreachable daemon raises
    :class:`~kmux.errors.DaemonUnavailable`.
    """
    from . import default_socket_path  # late: kmux/__init__ imports this module

    path = os.fspath(socket_path) if socket_path is not None else default_socket_path()
    session = ClientSession(group, receive=receive, name=name, validate=validate)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(timeout)  # only for the handshake; blocking afterwards
        try:
            sock.connect(path)
        except TimeoutError:
            raise TimeoutError(f"connecting to kmuxd at {path} took longer than {timeout} s") from None
        except OSError as e:
            raise _unavailable(path, e) from None
        try:
            sock.sendmsg([session.hello_packet()], (), _SEND_FLAGS)
            buf = bytearray(session.recv_bufsize)
            n, _, flags, _ = sock.recvmsg_into([buf])
        except TimeoutError:
            raise TimeoutError(f"kmuxd at {path} did not answer the hello within {timeout} s") from None
        except OSError as e:
            if e.errno in _PEER_GONE:
                raise session.eof() from None
            raise
        if n == 0:
            raise session.eof()
        if flags & socket.MSG_TRUNC:
            raise BadPacket(f"handshake answer longer than {len(buf)} bytes")
        session.receive_answer(memoryview(buf)[:n])
        sock.settimeout(None)
        size = session.accepted.max_message + _BUFFER_HEADROOM  # type: ignore[union-attr]
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
            except OSError:
                pass  # capped by net.core.wmem_max/rmem_max; send() explains EMSGSIZE
        return Client(sock, session, timeout)
    except BaseException:
        sock.close()
        raise


class Client:
    """A blocking connection to kmuxd, joined to one group. Build it with :func:`connect`."""

    def __init__(self, sock: socket.socket, session: ClientSession, timeout: float | None) -> None:
        self._sock = sock
        self._session = session
        self.timeout = timeout
        self._buf = bytearray(session.recv_bufsize)
        self._view = memoryview(self._buf)
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    # -- properties from the handshake -------------------------------------

    @property
    def group(self) -> str:
        return self._session.accepted.group  # type: ignore[union-attr]

    @property
    def client_id(self) -> int:
        return self._session.accepted.client_id  # type: ignore[union-attr]

    @property
    def max_message(self) -> int:
        return self._session.accepted.max_message  # type: ignore[union-attr]

    @property
    def framing(self) -> Framing:
        return self._session.accepted.framing  # type: ignore[union-attr]

    @property
    def steering(self) -> str:
        return self._session.accepted.steering  # type: ignore[union-attr]

    @property
    def seq(self) -> int:
        """The seq of the last message sent (notices name messages by it)."""
        return self._session.seq

    def fileno(self) -> int:
        """The socket's descriptor, for select/poll. Readable does not promise a
        message: the packet may be a notice that ``recv`` consumes and keeps waiting."""
        return self._sock.fileno()

    # -- data ----------------------------------------------------------------

    def send(self, message: Any) -> int:
        """Send one whole message (header included); returns its seq.

        Blocks while the daemon is not reading (backpressure). Raises
        BadFrame/MessageTooBig without sending if the message's header
        disagrees with its size, and DaemonShutdown if the daemon is gone.
        """
        self._session.check_data(message)
        try:
            # Two buffers, not DATA_PREFIX + message: no copy of the message.
            self._sock.sendmsg([DATA_PREFIX, message], (), _SEND_FLAGS)
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                sndbuf = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                raise MessageTooBig(
                    f"message is {len(message)} bytes, over this socket's send buffer ({sndbuf}); "
                    "raise net.core.wmem_max"
                ) from None
            _raise_peer_gone(self._session, e)
        return self._session.data_sent()

    def recv(self, timeout: float | None = None) -> bytes:
        """Wait for one message (header included) and return it.

        Raises the error of a NOTICE from the daemon (e.g. BadFrame with the
        ``seq`` of the refused message), TimeoutError if nothing arrives
        within ``timeout`` seconds, DaemonShutdown if the daemon closed the
        connection.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            event = self._next_event(deadline)
            if type(event) is memoryview:
                return bytes(event)  # the buffer is reused by the next call
            if type(event) is HandBack:
                self._send_parts(event.packet_parts)

    def set_receive(self, on: bool, timeout: Any = _DEFAULT) -> None:
        """Switch receiving on or off.

        Turning it off blocks until the daemon's ``receive_off`` marker, and
        hands every message that arrives before it back to the daemon, which
        gives it to another receiver; messages the app already took with
        ``recv`` are the app's. ``timeout`` defaults to the connect timeout;
        on TimeoutError the hand-back continues in later ``recv`` calls.
        """
        timeout = self.timeout if timeout is _DEFAULT else timeout
        self._send_parts((self._session.receive_control(on),))
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._session.draining:
            event = self._next_event(deadline)
            if type(event) is HandBack:
                self._send_parts(event.packet_parts)
            elif type(event) is memoryview:  # pragma: no cover - the session requeues while draining
                raise AssertionError("data delivered while draining")

    # -- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Close the connection. Safe to call twice."""
        self._session.close()
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = self._session.state.value
        if self._session.accepted is None:
            return f"<kmux.Client {state}>"
        return f"<kmux.Client group={self.group!r} client_id={self.client_id} {state}>"

    # -- plumbing ------------------------------------------------------------

    def _send_parts(self, parts: tuple[Any, ...]) -> None:
        try:
            self._sock.sendmsg(parts, (), _SEND_FLAGS)
        except OSError as e:
            _raise_peer_gone(self._session, e)

    def _next_event(self, deadline: float | None) -> Any:
        """Receive one packet and let the session classify it."""
        session = self._session
        if session.state is not State.READY:
            session.require_ready()  # ClientClosed/DaemonShutdown, before touching the socket
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._poll.poll(math.ceil(remaining * 1000)):
                raise TimeoutError("no message from kmuxd within the timeout")
        try:
            n, _, flags, _ = self._sock.recvmsg_into([self._buf])
        except OSError as e:
            _raise_peer_gone(session, e)
        if n == 0:
            raise session.eof()
        if flags & socket.MSG_TRUNC:
            raise BadPacket(f"daemon sent a packet longer than {len(self._buf)} bytes")
        return session.receive_packet(self._view[:n])

