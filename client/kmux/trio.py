"""The trio client: the same ClientSession as the blocking client, in a trio shell.

    import kmux.trio

    async with await kmux.trio.connect("echo") as client:
        await client.send(b"\\x00\\x00\\x00\\x04ping")
        with trio.fail_after(1):
            reply = await client.recv()

Timeouts are cancel scopes (``trio.fail_after``), as everywhere in trio;
only :func:`connect` takes a ``timeout``, for parity with the blocking
client, and raises TimeoutError.

Concurrency: any number of tasks may send (a lock keeps one of them waiting
for the socket at a time). One task receives. :meth:`TrioClient.set_receive`
may run in another task than the receiving one: while some task is inside
:meth:`TrioClient.recv`, that task hands the queued messages back and
``set_receive`` only waits for the marker.

Cancellation never loses a message: a packet is either still in the socket
or fully handled; the REQUEUE of a message already taken from the socket is
shielded.
"""

from __future__ import annotations

import errno
import math
import os
import socket as _socket
from collections import deque
from typing import Any

import trio
import trio.socket as tsocket

from . import default_socket_path

from ._reconnect import Backoff, ReconnectCore, ReconnectPolicy, UnknownFate, as_policy, is_retryable, translate_seq
from ._session import ClientSession, HandBack, State
from ._sync import _unavailable, finish_handshake  # one wording, one answer check for all shells
from .errors import BadPacket, ClientClosed, DaemonUnavailable, KmuxError, MessageTooBig
from .framing import Framing
from .protocol import DATA_PREFIX

__all__ = ["connect", "TrioClient", "ReconnectingTrioClient"]

_SEND_FLAGS = getattr(tsocket, "MSG_NOSIGNAL", 0)
_PEER_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)


async def connect(
    group: str,
    socket_path: str | os.PathLike[str] | None = None,
    *,
    receive: bool = True,
    name: str = "",
    timeout: float | None = 5.0,
    validate: bool = True,
    reconnect: bool | ReconnectPolicy = False,
) -> TrioClient:
    """Join ``group`` and return a connected :class:`TrioClient`.

    Same arguments and errors as :func:`kmux.connect`: ``timeout`` bounds the
    connect and the handshake (TimeoutError); a refusal raises its own class;
    an unreachable daemon raises DaemonUnavailable naming the path.
    ``reconnect=True`` (or a :class:`~kmux.ReconnectPolicy`) returns a
    :class:`ReconnectingTrioClient`, which survives daemon restarts.
    """
    path = os.fspath(socket_path) if socket_path is not None else default_socket_path()
    policy = as_policy(reconnect)
    if policy is not None:
        client = ReconnectingTrioClient(
            group, path, policy, receive=receive, name=name, timeout=timeout, validate=validate
        )
        try:
            async with client._wlock:
                await client._establish()
        except BaseException:
            client._close_now()
            raise
        return client  # type: ignore[return-value]
    session = ClientSession(group, receive=receive, name=name, validate=validate)
    sock = tsocket.socket(tsocket.AF_UNIX, tsocket.SOCK_SEQPACKET)
    try:
        with trio.move_on_after(float("inf") if timeout is None else timeout) as scope:
            try:
                await sock.connect(path)
            except OSError as e:
                raise _unavailable(path, e) from None
            try:
                await sock.sendmsg([session.hello_packet()], [], _SEND_FLAGS)
                buf = bytearray(session.recv_bufsize)
                n, _, flags, _ = await sock.recvmsg_into([buf])
            except OSError as e:
                if e.errno in _PEER_GONE:
                    raise session.eof() from None
                raise
        if scope.cancelled_caught:
            raise TimeoutError(f"kmuxd at {path} did not accept and answer the hello within {timeout} s")
        finish_handshake(sock, session, buf, n, flags)
        return TrioClient(sock, session)
    except BaseException:
        sock.close()
        raise


class TrioClient:
    """A trio connection to kmuxd, joined to one group. Build it with :func:`connect`."""

    def __init__(self, sock: tsocket.SocketType, session: ClientSession) -> None:
        self._sock = sock
        self._session = session
        self._buf = bytearray(session.recv_bufsize)
        self._view = memoryview(self._buf)
        self._send_lock = trio.Lock()
        # True while a task is inside _next_event; set_receive parks on
        # _reader_progress instead of reading concurrently.
        self._reading = False
        self._reader_progress = trio.lowlevel.ParkingLot()
        # Messages set_receive read after another task switched receiving back
        # on; recv returns them first.
        self._stash: deque[bytes] = deque()

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
        """The socket's descriptor."""
        return self._sock.fileno()

    # -- data ----------------------------------------------------------------

    async def send(self, message: Any) -> int:
        """Send one whole message (header included); returns its seq.

        Waits while the daemon is not reading (backpressure). Raises
        BadFrame/MessageTooBig without sending if the message's header
        disagrees with its size.
        """
        self._session.check_data(message)
        try:
            await self._send_parts((DATA_PREFIX, message))
        except OSError as e:
            if e.errno != errno.EMSGSIZE:
                raise
            sndbuf = self._sock.getsockopt(tsocket.SOL_SOCKET, tsocket.SO_SNDBUF)
            raise MessageTooBig(
                f"message is {len(message)} bytes, over this socket's send buffer ({sndbuf}); raise net.core.wmem_max"
            ) from None
        return self._session.data_sent()

    async def recv(self) -> bytes:
        """Wait for one message (header included) and return it.

        Raises the error of a NOTICE from the daemon, DaemonShutdown if the
        daemon closed the connection. Use ``trio.fail_after`` for a timeout.
        """
        if self._stash:
            return self._stash.popleft()
        while True:
            event = await self._next_event()
            if type(event) is bytes:
                return event

    async def set_receive(self, on: bool) -> None:
        """Switch receiving on or off.

        Turning it off waits for the daemon's ``receive_off`` marker; every
        message that arrives before it goes back to the daemon, which gives
        it to another receiver. If cancelled, later ``recv`` calls finish
        the hand-back.
        """
        await self._send_parts((self._session.receive_control(on),))
        while self._session.draining:
            if self._reading:
                await self._reader_progress.park()
            else:
                event = await self._next_event()
                if type(event) is bytes:  # another task turned receiving back on meanwhile
                    self._stash.append(event)

    # -- lifecycle -----------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection. Safe to call twice."""
        self._session.close()
        self._sock.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> TrioClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- plumbing ------------------------------------------------------------

    async def _send_parts(self, parts: tuple[Any, ...]) -> None:
        # Uncontended, acquire_nowait costs nothing and sendmsg is the
        # checkpoint; Lock.acquire would add a second trip to the scheduler.
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            await self._sock.sendmsg(parts, [], _SEND_FLAGS)
        except trio.ClosedResourceError:
            self._session.require_ready()  # raises ClientClosed
            raise
        except OSError as e:
            if e.errno in _PEER_GONE:
                raise self._session.eof() from None
            raise
        finally:
            self._send_lock.release()

    async def _next_event(self) -> Any:
        """Receive one packet and handle it; returns the message as bytes, or
        whatever else the session said (already acted upon)."""
        session = self._session
        if session.state is not State.READY:
            session.require_ready()
        if self._reading:
            raise trio.BusyResourceError("another task is already receiving from this kmux client")
        self._reading = True
        try:
            try:
                n, _, flags, _ = await self._sock.recvmsg_into([self._buf])
            except trio.ClosedResourceError:  # aclose() from another task
                session.require_ready()  # raises ClientClosed
                raise
            except OSError as e:
                if e.errno in _PEER_GONE:
                    raise session.eof() from None
                raise
            if n == 0:
                raise session.eof()
            if flags & tsocket.MSG_TRUNC:
                raise BadPacket(f"daemon sent a packet longer than {len(self._buf)} bytes")
            event = session.receive_packet(self._view[:n])
            if type(event) is memoryview:
                return bytes(event)  # the buffer is reused by the next call
            if type(event) is HandBack:
                # Taken from the socket already: losing it to a cancel would lose the message.
                with trio.CancelScope(shield=True):
                    await self._send_parts(event.packet_parts)
            return event
        finally:
            self._reading = False
            self._reader_progress.unpark_all()


# -- reconnecting ------------------------------------------------------------------
#
# The reconnecting client drives a plain non-blocking socket with
# trio.lowlevel.wait_readable/wait_writable, so that reading a packet and
# handing it to the session (or draining a dead socket) never yields: a task
# switch between them could let a shutdown notice slip past the accounting.

_LOST = object()
_DONTWAIT = _socket.MSG_DONTWAIT | getattr(_socket, "MSG_NOSIGNAL", 0)


class _Conn:
    __slots__ = ("sock", "session", "buf", "view")

    def __init__(self, sock: _socket.socket, session: ClientSession) -> None:
        self.sock = sock
        self.session = session
        self.buf = bytearray(session.recv_bufsize)
        self.view = memoryview(self.buf)

    def close(self) -> None:
        self.session.close()
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


async def _open_raw(path: str, session: ClientSession, timeout: float | None) -> _Conn:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_NONBLOCK | _socket.SOCK_CLOEXEC)
    try:
        n = flags = 0
        buf = bytearray(session.recv_bufsize)
        with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
            while True:
                try:
                    sock.connect(path)
                    break
                except BlockingIOError:  # the listener's backlog is full: try again shortly
                    await trio.sleep(0.01)
                except OSError as e:
                    raise _unavailable(path, e) from None
            try:
                sock.send(session.hello_packet(), _DONTWAIT)
                await trio.lowlevel.wait_readable(sock)
                n, _, flags, _ = sock.recvmsg_into([buf])
            except OSError as e:
                if e.errno in _PEER_GONE:
                    raise session.eof() from None
                raise
        if scope.cancelled_caught:
            raise TimeoutError(f"kmuxd at {path} did not accept and answer the hello within {timeout} s")
        finish_handshake(sock, session, buf, n, flags)
        return _Conn(sock, session)
    except BaseException:
        sock.close()
        raise


class ReconnectingTrioClient:
    """A trio client that reconnects when the daemon goes away.

    Build it with ``await kmux.trio.connect(..., reconnect=True)``. Same
    methods as :class:`TrioClient` and the same accounting as
    :class:`kmux.ReconnectingClient`. Any number of tasks may send, one
    receives. A cancelled call never loses a message: the reconnect state
    (back-off, re-send queue) is kept and the next call carries on.
    """

    def __init__(self, group: str, path: str, policy: ReconnectPolicy, *, receive: bool, name: str,
                 timeout: float | None, validate: bool) -> None:
        ClientSession(group, receive=receive, name=name, validate=validate)  # validates the hello now
        self._group, self._path, self.policy = group, path, policy
        self._name, self.timeout, self._validate = name, timeout, validate
        self._core = ReconnectCore(policy, receive=receive)
        self._conn: _Conn | None = None
        self._last: _Conn | None = None
        self._gen = 0
        #: Held for DATA sends (seq accounting follows the socket's order) and
        #: for replacing the connection.
        self._wlock = trio.Lock()
        self._reading = False
        self._reader_progress = trio.lowlevel.ParkingLot()
        self._stash: deque[Any] = deque()
        self._pending: deque[BaseException] = deque()
        self._backoff: Backoff | None = None
        self._next_attempt = 0.0
        self._closed = False
        #: One UnknownFate per connection that ended without a shutdown notice.
        self.unknown_fate: list[UnknownFate] = []

    # -- properties ------------------------------------------------------------

    def _info(self) -> ClientSession:
        conn = self._conn or self._last
        if conn is None:
            raise ClientClosed("the kmux client never connected")
        return conn.session

    group = property(lambda self: self._group)
    client_id = property(lambda self: self._info().accepted.client_id)
    max_message = property(lambda self: self._info().accepted.max_message)
    framing = property(lambda self: self._info().accepted.framing)
    steering = property(lambda self: self._info().accepted.steering)
    seq = property(lambda self: self._core.seq, doc="Message seq of the last message sent (across reconnects).")
    accepted_seq = property(lambda self: self._core.accepted_seq)
    reconnects = property(lambda self: self._core.counters.reconnects)
    resent = property(lambda self: self._core.counters.resent)
    guaranteed = property(lambda self: self._core.guaranteed)
    connected = property(lambda self: self._conn is not None)

    def stats(self) -> dict[str, Any]:
        return self._core.stats()

    # -- data --------------------------------------------------------------------

    async def send(self, message: Any) -> int:
        """Send one whole message; returns its message seq. Waits while reconnecting."""
        while True:
            if self._pending:
                raise self._pending.popleft()
            async with self._wlock:
                conn, gen = self._conn, self._gen
                if conn is not None and not self._core.resend_queue:
                    conn.session.check_data(message)
                    if await self._send_packet(conn, (DATA_PREFIX, message)):
                        conn.session.data_sent()
                        return self._core.message_sent(message)
                await self._repair_locked(gen)

    async def recv(self) -> bytes:
        """Wait for one message; messages left in a lost connection come first."""
        while True:
            if self._stash:
                item = self._stash.popleft()
                if isinstance(item, BaseException):
                    raise item
                await trio.lowlevel.checkpoint()
                return item
            if self._pending:
                raise self._pending.popleft()
            event, conn = await self._next_event()
            if type(event) is memoryview:
                return bytes(event)
            if type(event) is HandBack:
                with trio.CancelScope(shield=True):  # taken from the socket: must not be lost
                    await self._hand_back(conn, event)

    async def set_receive(self, on: bool) -> None:
        """Switch receiving on or off; the choice is restored on every reconnect."""
        if not isinstance(on, bool):
            raise TypeError("on must be a bool")
        self._core.receiving = on
        conn, gen = self._conn, self._gen
        if conn is None:
            await trio.lowlevel.checkpoint()
            return  # the next hello carries it
        if not await self._send_packet(conn, (conn.session.receive_control(on),)):
            async with self._wlock:
                if self._gen == gen:
                    self._lost_locked()
            return
        while conn.session.draining and self._conn is conn:
            if self._reading:
                await self._reader_progress.park()
                continue
            event, _ = await self._next_event(conn)
            if type(event) is HandBack:
                with trio.CancelScope(shield=True):
                    await self._hand_back(conn, event)
            elif type(event) is memoryview:
                self._stash.append(bytes(event))

    # -- lifecycle -----------------------------------------------------------------

    def _close_now(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()

    async def aclose(self) -> None:
        """Close the connection. Safe to call twice. Unaccounted messages are not re-sent."""
        self._close_now()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> ReconnectingTrioClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- plumbing --------------------------------------------------------------------

    async def _send_packet(self, conn: _Conn, parts: tuple[Any, ...]) -> bool:
        """One packet out; False if the peer is gone. Counting happens right after, without a yield."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._closed:
                raise ClientClosed("the kmux client is closed")
            try:
                conn.sock.sendmsg(parts, (), _DONTWAIT)
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_writable(conn.sock)
                except trio.ClosedResourceError:
                    if self._closed:
                        raise ClientClosed("the kmux client is closed") from None
                    return False
                continue
            except OSError as e:
                if e.errno == errno.EMSGSIZE:
                    raise MessageTooBig("message is over this socket's send buffer; raise net.core.wmem_max") from None
                if e.errno in _PEER_GONE or e.errno == errno.EBADF:
                    return False
                raise
            await trio.lowlevel.cancel_shielded_checkpoint()
            return True

    async def _hand_back(self, conn: _Conn, event: HandBack) -> None:
        if self._conn is not conn or not await self._send_packet(conn, event.packet_parts):
            self._stash.append(bytes(event.message))  # the daemon is gone: the message stays ours

    async def _next_event(self, only: _Conn | None = None) -> tuple[Any, _Conn | None]:
        """Read and classify one packet, reconnecting as needed."""
        while True:
            if self._closed:
                raise ClientClosed("the kmux client is closed")
            if self._stash and only is None:
                return None, None
            conn, gen = self._conn, self._gen
            if only is not None and conn is not only:
                return None, None
            if conn is None or self._core.resend_queue:
                async with self._wlock:
                    await self._repair_locked(gen)
                continue
            if self._reading:
                raise trio.BusyResourceError("another task is already receiving from this kmux client")
            self._reading = True
            try:
                await trio.lowlevel.wait_readable(conn.sock)
            except trio.ClosedResourceError:
                continue  # replaced by a sender's reconnect, or closed
            finally:
                self._reading = False
                self._reader_progress.unpark_all()
            if conn is not self._conn:
                continue
            event = self._read_now(conn)
            if event is _LOST:
                async with self._wlock:
                    if self._gen == gen and self._conn is conn:
                        self._lost_locked()
                continue
            if event is not None:
                return event, conn

    def _read_now(self, conn: _Conn) -> Any:
        try:
            n, _, flags, _ = conn.sock.recvmsg_into([conn.buf], 0, _socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in _PEER_GONE:
                return _LOST
            raise
        if n == 0:
            return _LOST
        if flags & _socket.MSG_TRUNC:
            raise BadPacket(f"daemon sent a packet longer than {len(conn.buf)} bytes")
        try:
            return conn.session.receive_packet(conn.view[:n])
        except KmuxError as err:
            raise translate_seq(err, self._core) from None

    async def _repair_locked(self, gen: int) -> None:
        if self._closed:
            raise ClientClosed("the kmux client is closed")
        if self._gen == gen and self._conn is not None and not self._core.resend_queue:
            self._lost_locked()
        await self._establish()

    async def _establish(self) -> None:
        """``_wlock`` held: connect (with back-off), then re-send the queue."""
        core = self._core
        while True:
            while self._conn is None:
                if self._closed:
                    raise ClientClosed("the kmux client is closed")
                now = trio.current_time()
                if self._backoff is None:
                    self._backoff = Backoff(self.policy, now)
                    self._next_attempt = now
                await trio.sleep_until(self._next_attempt)
                session = ClientSession(self._group, receive=core.receiving, name=self._name, validate=self._validate)
                try:
                    conn = await _open_raw(self._path, session, self.timeout)
                except Exception as exc:
                    if not is_retryable(exc):
                        raise
                    delay = self._backoff.failed(trio.current_time())
                    if delay is None:
                        b, self._backoff = self._backoff, None
                        raise DaemonUnavailable(
                            f"gave up reconnecting to kmuxd at {self._path} after {b.failures} attempt(s) "
                            f"in {trio.current_time() - b.started:.1f} s: {exc}"
                        ) from exc
                    self._next_attempt = trio.current_time() + delay
                    continue
                self._backoff = None
                core.connected()
                self._conn = self._last = conn
                self._gen += 1
            conn = self._conn
            while (message := core.next_resend()) is not None:
                if not await self._send_packet(conn, (DATA_PREFIX, message)):
                    self._lost_locked()
                    break
                conn.session.data_sent()
                core.resent_one()
            else:
                return

    def _lost_locked(self) -> None:
        """The current connection is gone: drain it (no yield) and account for it."""
        conn = self._conn
        assert conn is not None
        self._conn = None
        session = conn.session
        resets = 0
        while session.state is State.READY:
            try:
                n, _, flags, _ = conn.sock.recvmsg_into([conn.buf], 0, _socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in _PEER_GONE and resets < 3:  # ECONNRESET first, then what is queued
                    resets += 1
                    continue
                break
            if n == 0:
                break
            if flags & _socket.MSG_TRUNC:
                self._stash.append(BadPacket(f"daemon sent a packet longer than {len(conn.buf)} bytes"))
                continue
            try:
                event = session.receive_packet(conn.view[:n])
            except KmuxError as err:
                self._stash.append(translate_seq(err, self._core))
                continue
            if type(event) is memoryview or type(event) is HandBack:
                self._stash.append(bytes(event if type(event) is memoryview else event.message))
        accepted = session.shutdown_accepted
        conn.close()
        rec = self._core.connection_lost(accepted)
        if rec.unknown is not None:
            self.unknown_fate.append(rec.unknown)
        if rec.lost is not None:
            self._pending.append(rec.lost)
