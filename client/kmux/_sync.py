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
import threading
import time
from collections import deque
from typing import Any

from ._reconnect import Backoff, ReconnectCore, ReconnectPolicy, UnknownFate, as_policy, is_retryable, translate_seq
from ._session import ClientSession, HandBack, State
from .errors import BadPacket, ClientClosed, DaemonUnavailable, KmuxError, MessageTooBig
from .framing import Framing
from .protocol import DATA_PREFIX

__all__ = ["connect", "Client", "ReconnectingClient"]

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
    reconnect: bool | ReconnectPolicy = False,
) -> Client:
    """Join ``group`` and return a connected :class:`Client`.

    ``socket_path`` defaults to ``$KMUX_SOCKET`` or ``/run/kmuxd/kmuxd.sock``.
    ``timeout`` bounds the connect and the handshake (TimeoutError) and is
    the default bound of :meth:`Client.set_receive`. ``receive=False``
    joins as a sender only. A refusal raises its own class
    (:class:`~kmux.errors.UnknownGroup`, ...); an unreachable daemon raises
    :class:`~kmux.errors.DaemonUnavailable`.

    ``reconnect=True`` (or a :class:`~kmux.ReconnectPolicy`) returns a
    :class:`ReconnectingClient` instead, which survives daemon restarts; the
    connect itself then retries within the policy's bounds.
    """
    from . import default_socket_path  # late: kmux/__init__ imports this module

    path = os.fspath(socket_path) if socket_path is not None else default_socket_path()
    policy = as_policy(reconnect)
    if policy is not None:
        client = ReconnectingClient(group, path, policy, receive=receive, name=name, timeout=timeout, validate=validate)
        try:
            client._connect_initial()
        except BaseException:
            client.close()
            raise
        return client  # type: ignore[return-value]
    return _open(path, ClientSession(group, receive=receive, name=name, validate=validate), timeout)


#: Up to this size a DATA packet is built by concatenation and sent with one
#: send() (a copy is cheaper than sendmsg's list); above, sendmsg() gathers
#: the kind byte and the message without copying the message.
CONCAT_MAX = 4096


def send_data(sock: socket.socket, message: Any) -> None:
    """One DATA packet: the kind byte, then the message."""
    if len(message) <= CONCAT_MAX:
        sock.send(DATA_PREFIX + message, _SEND_FLAGS)
    else:
        sock.sendmsg([DATA_PREFIX, message], (), _SEND_FLAGS)


def finish_handshake(sock: Any, session: ClientSession, buf: bytearray, n: int, flags: int) -> None:
    """Take the daemon's answer (``n`` bytes of ``buf``) and size the socket's buffers.

    Shared by every shell (blocking, trio, reconnecting): raises the refusal's
    error, DaemonShutdown on EOF, or BadPacket on a truncated answer.
    """
    if n == 0:
        raise session.eof()
    if flags & socket.MSG_TRUNC:
        raise BadPacket(f"handshake answer longer than {len(buf)} bytes")
    session.receive_answer(memoryview(buf)[:n])
    size = session.accepted.max_message + _BUFFER_HEADROOM  # type: ignore[union-attr]
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError:
            pass  # capped by net.core.wmem_max/rmem_max; send() explains EMSGSIZE


def _open(path: str, session: ClientSession, timeout: float | None) -> Client:
    """Connect, handshake, size the buffers: one :class:`Client` for ``session``."""
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
        finish_handshake(sock, session, buf, n, flags)
        sock.settimeout(None)
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
            send_data(self._sock, message)
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



_LOST = object()


class ReconnectingClient:
    """A blocking client that reconnects when the daemon goes away.

    Build it with ``kmux.connect(group, ..., reconnect=True)`` (or a
    :class:`~kmux.ReconnectPolicy`). Same methods as :class:`Client`; see
    :mod:`kmux._reconnect` and the README for the accounting.

    Locking: ``_rlock`` is held by whoever reads the socket, ``_wlock`` by
    whoever sends DATA (the seq accounting must follow the socket's order).
    Replacing the connection needs both, taken in that order.
    """

    def __init__(
        self,
        group: str,
        path: str,
        policy: ReconnectPolicy,
        *,
        receive: bool,
        name: str,
        timeout: float | None,
        validate: bool,
    ) -> None:
        ClientSession(group, receive=receive, name=name, validate=validate)  # validates the hello now
        self._group = group
        self._path = path
        self.policy = policy
        self._name = name
        self.timeout = timeout
        self._validate = validate
        self._core = ReconnectCore(policy, receive=receive)
        self._conn: Client | None = None
        self._last: Client | None = None
        self._gen = 0
        self._rlock = threading.Lock()
        self._wlock = threading.Lock()
        #: bytes or KmuxError left in a dead connection's socket, for recv
        self._stash: deque[Any] = deque()
        self._pending: deque[BaseException] = deque()
        self._backoff: Backoff | None = None
        self._next_attempt = 0.0
        self._closed = False
        #: One :class:`~kmux.UnknownFate` per connection that ended without a
        #: shutdown notice while messages were unaccounted. The app may clear it.
        self.unknown_fate: list[UnknownFate] = []

    # -- properties ----------------------------------------------------------

    def _info(self) -> ClientSession:
        conn = self._conn or self._last
        if conn is None:
            raise ClientClosed("the kmux client never connected")
        return conn._session

    @property
    def group(self) -> str:
        return self._group

    @property
    def client_id(self) -> int:
        """The daemon's id of the current (or last) connection; changes on reconnect."""
        return self._info().accepted.client_id  # type: ignore[union-attr]

    @property
    def max_message(self) -> int:
        return self._info().accepted.max_message  # type: ignore[union-attr]

    @property
    def framing(self) -> Framing:
        return self._info().accepted.framing  # type: ignore[union-attr]

    @property
    def steering(self) -> str:
        return self._info().accepted.steering  # type: ignore[union-attr]

    @property
    def seq(self) -> int:
        """Message seq of the last message sent, counted from 1 across reconnects."""
        return self._core.seq

    @property
    def accepted_seq(self) -> int:
        """Every message up to this seq is accounted for (see the README)."""
        return self._core.accepted_seq

    @property
    def reconnects(self) -> int:
        return self._core.counters.reconnects

    @property
    def resent(self) -> int:
        return self._core.counters.resent

    @property
    def guaranteed(self) -> bool:
        """False while a message of unknown fate may have been dropped from the resend buffer."""
        return self._core.guaranteed

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def stats(self) -> dict[str, Any]:
        """Counters: reconnects, resent, resent_unknown, unknown, dropped, accepted_seq, ..."""
        return self._core.stats()

    def fileno(self) -> int:
        """The current socket's descriptor: it changes on every reconnect."""
        if self._conn is None:
            raise DaemonUnavailable("not connected (reconnecting)")
        return self._conn.fileno()

    # -- data ----------------------------------------------------------------

    def send(self, message: Any) -> int:
        """Send one whole message; returns its message seq.

        Blocks while the daemon is not reading, and while reconnecting (at
        most the policy's bound, then DaemonUnavailable; the next call tries
        again). Raises AccountingLost once if a recovery found messages it
        could not re-send; this message was not sent then.
        """
        while True:
            if self._pending:
                raise self._pending.popleft()
            with self._wlock:
                conn, gen = self._conn, self._gen
                if conn is not None and not self._core.resend_queue:
                    conn._session.check_data(message)
                    try:
                        send_data(conn._sock, message)
                    except OSError as e:
                        if e.errno == errno.EMSGSIZE:
                            raise MessageTooBig(f"message is {len(message)} bytes, over this socket's send buffer") from None
                        if e.errno not in _PEER_GONE:
                            raise
                    else:
                        conn._session.data_sent()
                        return self._core.message_sent(message)
            self._repair(gen, None)

    def recv(self, timeout: float | None = None) -> bytes:
        """Wait for one message; messages left in a lost connection come first.

        ``timeout`` also bounds waiting for a reconnect (TimeoutError; the
        reconnect goes on in the next call).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._stash:
                item = self._stash.popleft()
                if isinstance(item, BaseException):
                    raise item
                return item
            if self._pending:
                raise self._pending.popleft()
            if not _acquire(self._rlock, deadline):
                raise TimeoutError("no message from kmuxd within the timeout (another thread is reconnecting)")
            try:
                if self._stash or self._pending:
                    continue
                conn, gen = self._conn, self._gen
                if conn is None or self._core.resend_queue:
                    with self._wlock:
                        self._repair_locked(gen, deadline)
                    continue
                event = self._read_one(conn, deadline)
                if event is _LOST:
                    with self._wlock:
                        if self._gen == gen:
                            self._lost_locked()
                    continue
                if type(event) is memoryview:
                    return bytes(event)
                if type(event) is HandBack:
                    self._hand_back(conn, event)
            finally:
                self._rlock.release()

    def set_receive(self, on: bool, timeout: Any = _DEFAULT) -> None:
        """Switch receiving on or off; the choice is restored on every reconnect.

        Turning it off waits (``timeout``, default the connect timeout) for
        the marker and hands queued messages back, as :meth:`Client.set_receive`.
        If the connection is lost meanwhile, the next connection starts with
        receiving off and nothing is queued for it.
        """
        if not isinstance(on, bool):
            raise TypeError("on must be a bool")
        timeout = self.timeout if timeout is _DEFAULT else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        if not _acquire(self._rlock, deadline):
            raise TimeoutError("set_receive: another thread is reconnecting")
        try:
            self._core.receiving = on
            conn, gen = self._conn, self._gen
            if conn is None:
                return  # the next hello carries it
            session = conn._session
            try:
                conn._sock.sendmsg([session.receive_control(on)], (), _SEND_FLAGS)
            except OSError as e:
                if e.errno not in _PEER_GONE:
                    raise
                with self._wlock:
                    if self._gen == gen:
                        self._lost_locked()
                return
            while session.draining:
                event = self._read_one(conn, deadline)
                if event is _LOST:
                    with self._wlock:
                        if self._gen == gen:
                            self._lost_locked()
                    return
                if type(event) is HandBack:
                    self._hand_back(conn, event)
                elif type(event) is memoryview:  # pragma: no cover - the session requeues while draining
                    self._stash.append(bytes(event))
        finally:
            self._rlock.release()

    # -- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Close the connection. Safe to call twice. Unaccounted messages are not re-sent."""
        self._closed = True
        conn = self._conn
        if conn is not None:
            conn.close()

    def __enter__(self) -> ReconnectingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self._conn is not None else "reconnecting"
        return f"<kmux.ReconnectingClient group={self._group!r} {state} seq={self.seq} reconnects={self.reconnects}>"

    # -- plumbing ------------------------------------------------------------

    def _connect_initial(self) -> None:
        with self._rlock, self._wlock:
            self._establish(None)

    def _repair(self, gen: int, deadline: float | None) -> None:
        """Called without locks by a sender that found connection ``gen`` dead (or absent)."""
        while not self._rlock.acquire(timeout=0.05):
            if self._gen != gen:
                return  # another thread already replaced it
        try:
            with self._wlock:
                self._repair_locked(gen, deadline)
        finally:
            self._rlock.release()

    def _repair_locked(self, gen: int, deadline: float | None) -> None:
        if self._closed:
            raise ClientClosed("the kmux client is closed")
        if self._gen == gen and self._conn is not None and not self._core.resend_queue:
            self._lost_locked()
        self._establish(deadline)

    def _establish(self, deadline: float | None) -> None:
        """Both locks held: connect (with back-off) until connected, then re-send the queue."""
        core = self._core
        while True:
            while self._conn is None:
                if self._closed:
                    raise ClientClosed("the kmux client is closed")
                now = time.monotonic()
                if self._backoff is None:
                    self._backoff = Backoff(self.policy, now)
                    self._next_attempt = now
                wait = self._next_attempt - now
                if wait > 0:
                    if deadline is not None and self._next_attempt > deadline:
                        time.sleep(max(0.0, deadline - now))
                        raise TimeoutError("no connection to kmuxd within the timeout (still reconnecting)")
                    time.sleep(wait)
                attempt_timeout = self.timeout
                if deadline is not None:
                    left = max(0.001, deadline - time.monotonic())
                    attempt_timeout = left if attempt_timeout is None else min(attempt_timeout, left)
                session = ClientSession(self._group, receive=core.receiving, name=self._name, validate=self._validate)
                try:
                    conn = _open(self._path, session, attempt_timeout)
                except Exception as exc:
                    if not is_retryable(exc):
                        raise
                    delay = self._backoff.failed(time.monotonic())
                    if delay is None:
                        b, self._backoff = self._backoff, None
                        raise DaemonUnavailable(
                            f"gave up reconnecting to kmuxd at {self._path} after {b.failures} attempt(s) "
                            f"in {time.monotonic() - b.started:.1f} s: {exc}"
                        ) from exc
                    self._next_attempt = time.monotonic() + delay
                    continue
                self._backoff = None
                core.connected()
                self._conn = self._last = conn
                self._gen += 1
            if self._resend_locked():
                return

    def _resend_locked(self) -> bool:
        conn = self._conn
        core = self._core
        assert conn is not None
        while (message := core.next_resend()) is not None:
            try:
                send_data(conn._sock, message)
            except OSError as e:
                if e.errno not in _PEER_GONE:
                    raise
                self._lost_locked()
                return False
            conn._session.data_sent()
            core.resent_one()
        return True

    def _lost_locked(self) -> None:
        """Both locks held: the current connection is gone; account for it."""
        conn = self._conn
        assert conn is not None
        self._conn = None
        try:
            accepted = self._drain(conn)
        finally:
            conn.close()
        rec = self._core.connection_lost(accepted)
        if rec.unknown is not None:
            self.unknown_fate.append(rec.unknown)
        if rec.lost is not None:
            self._pending.append(rec.lost)

    def _drain(self, conn: Client) -> int | None:
        """Read what a dead connection's socket still holds; returns the shutdown notice's ``accepted``."""
        session = conn._session
        resets = 0
        while session.state is State.READY:
            try:
                n, _, flags, _ = conn._sock.recvmsg_into([conn._buf], 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as e:
                # A peer that closed with our packets unread makes the first read
                # fail with ECONNRESET; what it sent before is still queued.
                if e.errno in _PEER_GONE and resets < 3:
                    resets += 1
                    continue
                break
            if n == 0:
                break
            if flags & socket.MSG_TRUNC:
                self._stash.append(BadPacket(f"daemon sent a packet longer than {len(conn._buf)} bytes"))
                continue
            try:
                event = session.receive_packet(conn._view[:n])
            except KmuxError as err:
                self._stash.append(translate_seq(err, self._core))
                continue
            if type(event) is memoryview:
                self._stash.append(bytes(event))
            elif type(event) is HandBack:
                self._stash.append(bytes(event.message))  # cannot hand it back any more: it is ours
        return session.shutdown_accepted

    def _read_one(self, conn: Client, deadline: float | None) -> Any:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not conn._poll.poll(math.ceil(remaining * 1000)):
                raise TimeoutError("no message from kmuxd within the timeout")
        try:
            n, _, flags, _ = conn._sock.recvmsg_into([conn._buf])
        except OSError as e:
            if e.errno in _PEER_GONE:
                return _LOST
            raise
        if n == 0:
            return _LOST
        if flags & socket.MSG_TRUNC:
            raise BadPacket(f"daemon sent a packet longer than {len(conn._buf)} bytes")
        try:
            return conn._session.receive_packet(conn._view[:n])
        except KmuxError as err:
            raise translate_seq(err, self._core) from None

    def _hand_back(self, conn: Client, event: HandBack) -> None:
        try:
            conn._sock.sendmsg(event.packet_parts, (), _SEND_FLAGS)
        except OSError as e:
            if e.errno not in _PEER_GONE:
                raise
            self._stash.append(bytes(event.message))  # the daemon is gone: the message stays ours


def _acquire(lock: threading.Lock, deadline: float | None) -> bool:
    if deadline is None:
        return lock.acquire()
    return lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
