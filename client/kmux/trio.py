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
import os
from collections import deque
from typing import Any

import trio
import trio.socket as tsocket

from . import default_socket_path
from ._session import ClientSession, HandBack, State
from ._sync import _unavailable  # one wording for both shells
from .errors import BadPacket, MessageTooBig
from .framing import Framing
from .protocol import DATA_PREFIX

__all__ = ["connect", "TrioClient"]

_SEND_FLAGS = getattr(tsocket, "MSG_NOSIGNAL", 0)
_BUFFER_HEADROOM = 65536
_PEER_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)


async def connect(
    group: str,
    socket_path: str | os.PathLike[str] | None = None,
    *,
    receive: bool = True,
    name: str = "",
    timeout: float | None = 5.0,
    validate: bool = True,
) -> TrioClient:
    """Join ``group`` and return a connected :class:`TrioClient`.

    Same arguments and errors as :func:`kmux.connect`: ``timeout`` bounds the
    connect and the handshake (TimeoutError); a refusal raises its own class;
    an unreachable daemon raises DaemonUnavailable naming the path.
    """
    path = os.fspath(socket_path) if socket_path is not None else default_socket_path()
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
        if n == 0:
            raise session.eof()
        if flags & tsocket.MSG_TRUNC:
            raise BadPacket(f"handshake answer longer than {len(buf)} bytes")
        session.receive_answer(memoryview(buf)[:n])
        size = session.accepted.max_message + _BUFFER_HEADROOM  # type: ignore[union-attr]
        for opt in (tsocket.SO_SNDBUF, tsocket.SO_RCVBUF):
            try:
                sock.setsockopt(tsocket.SOL_SOCKET, opt, size)
            except OSError:
                pass  # capped by net.core.wmem_max/rmem_max; send() explains EMSGSIZE
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
