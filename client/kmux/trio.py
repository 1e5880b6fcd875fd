"""The trio client: the same ClientDriver as the blocking client, run with ``await``.

    import kmux.trio

    async with await kmux.trio.connect("echo") as client:
        await client.send(b"\\x00\\x00\\x00\\x04ping")
        with trio.fail_after(1):
            reply = await client.recv()

Timeouts are cancel scopes (``trio.fail_after``), as everywhere in trio;
only :func:`connect` takes a ``timeout``, for parity with the blocking
client, and raises TimeoutError.

Concurrency: any number of tasks may send; the pieces of a large message
never interleave with another task's packets. One task receives (a second
gets ``trio.BusyResourceError``). :meth:`TrioClient.set_receive` may run in
another task than the receiving one: while some task is inside
:meth:`TrioClient.recv`, that task hands the queued messages back and
``set_receive`` only waits for the marker.

The fast lane, as in the blocking client (the driver's "The fast lane"):
a small ``send`` with nothing to repair is one ``send`` call, and ``recv``
is one ``recv`` call when a message is waiting, one readiness wait and one
``recv`` when none is, never a ``recv`` that finds nothing and a wait
after it on the common path. Which of the two to do first is the driver's
hint (:attr:`ClientDriver.wait_first`): after a send the answer is hardly
ever back yet, so the client waits first. Neither awaits between its
checks and its system call, so no other task can come between them.

Cancellation never loses a message: a packet is either still in the socket
or fully handled; the REQUEUE of a message already taken from the socket is
shielded. A large message whose send is cancelled after its first piece
closes the connection (README, "Using it from an app"); a reconnecting
client then reconnects.

The socket is a plain non-blocking socket driven with
``trio.lowlevel.wait_readable``/``wait_writable``. Every call checkpoints,
as trio's own socket methods do.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import socket
from typing import Any, Awaitable, Callable, Iterator

import trio

from . import _requests as rq
from ._client import ClientInfo, ReconnectInfo, settings
from ._driver import EMPTY, ClientDriver, ClientSettings
from ._link import SEND_FLAGS, SocketLink
from ._reconnect import ReconnectPolicy
from .sockbuf import size_send_buffer

__all__ = ["connect", "TrioClient", "ReconnectingTrioClient"]

#: A connect to a listener whose backlog is full fails with EAGAIN; try again after this long (s).
BACKLOG_RETRY = 0.01


async def connect(
    group: str,
    socket_path: str | os.PathLike[str] | None = None,
    *,
    receive: bool = True,
    name: str = "",
    timeout: float | None = 5.0,
    validate: bool = True,
    reconnect: bool | ReconnectPolicy = False,
    require_up: bool = False,
) -> TrioClient:
    """Join ``group`` and return a connected :class:`TrioClient`.

    Same arguments and errors as :func:`kmux.connect`. ``reconnect=True``
    (or a :class:`~kmux.ReconnectPolicy`) returns a
    :class:`ReconnectingTrioClient`, which survives daemon restarts.
    """
    s = settings(group, socket_path, receive=receive, name=name, timeout=timeout, validate=validate,
                 reconnect=reconnect, require_up=require_up)
    client = (ReconnectingTrioClient if s.policy is not None else TrioClient)(s)
    try:
        await client._run(client._driver.open())
    except BaseException:
        client._driver.close()
        raise
    return client


class TrioClient(ClientInfo):
    """A trio connection to kmuxd, joined to one group. Build it with :func:`connect`."""

    def __init__(self, settings: ClientSettings) -> None:
        self._send_lock = trio.Lock()
        self._recv_lock = trio.Lock()
        self._receiving = False
        transport = _Trio()
        self._perform = rq.dispatch_table(transport)
        self._driver = ClientDriver(settings, send_lock=self._send_lock, recv_lock=self._recv_lock,
                                    notify_progress=transport.progress.unpark_all, clock=trio.current_time)

    async def send(self, message: Any) -> int:
        """Send one whole message (header included), in pieces if it needs them; returns its seq.

        Waits while the daemon is not reading (push-back). Raises
        BadFrame/MessageTooBig without sending if the message's header
        disagrees with its size.
        """
        driver = self._driver
        if not self._send_lock.locked():
            await trio.lowlevel.checkpoint_if_cancelled()  # never yields unless it raises
            seq = driver.send_now(message)  # no await between its checks and its send: no other sender
            if seq is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return seq
        return await self._run(driver.send(message))

    async def recv(self) -> bytes:
        """Wait for one whole message (header included) and return it.

        Raises the error of a NOTICE from the daemon, DaemonShutdown if the
        daemon closed the connection. Use ``trio.fail_after`` for a timeout.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving from this kmux client")
        self._receiving = True
        try:
            driver, lock = self._driver, self._recv_lock
            link = driver.fast_link
            if link is not None and not lock.locked():
                message = await _receive_now(driver, link, lock)
                if message is not None:
                    return message
            return await self._run(driver.recv(None))
        finally:
            self._receiving = False

    async def set_receive(self, on: bool) -> None:
        """Switch receiving on or off.

        Turning it off waits for the daemon's ``receive_off`` marker; every
        message that arrives before it goes back to the daemon, which gives
        it to another receiver. If cancelled, later ``recv`` calls finish
        the hand-back.
        """
        await self._run(self._driver.set_receive(on, None))

    async def flush(self) -> None:
        """Wait until the daemon has read every message sent so far (bound it with ``trio.fail_after``).

        ``aclose()`` does not wait: messages the daemon has not read yet
        (push-back) are dropped when the client hangs up, and counted by the
        daemon. Flush first when the last messages matter.
        """
        await self._run(self._driver.flush(None))

    async def aclose(self) -> None:
        """Close the connection at once (see :meth:`flush`). Safe to call twice."""
        self._driver.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> TrioClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- performing the driver's requests ------------------------------------------

    async def _run(self, operation: Iterator[Any]) -> Any:
        """Run one driver operation to its end; see kmux._driver."""
        perform = self._perform
        step: Callable[[Any], Any] = operation.send
        arg: Any = None
        awaited = False
        while True:
            try:
                request = step(arg)
            except StopIteration as done:
                if not awaited:  # e.g. a message left by a lost connection: still a checkpoint
                    await trio.lowlevel.checkpoint()
                return done.value
            awaited = True
            try:
                step, arg = operation.send, await perform[type(request)](request)
            except BaseException as exc:  # the driver decides what it means (Cancelled included)
                step, arg = operation.throw, exc


class ReconnectingTrioClient(ReconnectInfo, TrioClient):
    """A trio client that reconnects when the daemon goes away.

    Build it with ``await kmux.trio.connect(..., reconnect=True)``. Same
    methods as :class:`TrioClient` and the same accounting as
    :class:`kmux.ReconnectingClient`. A cancelled call never loses a
    message: the reconnect state (back-off, re-send queue) is kept and the
    next call carries on.
    """


async def _receive_now(driver: ClientDriver, link: _Link, lock: trio.Lock) -> Any:
    """The fast lane's receive, ``lock`` (``recv_lock``) free; None: run the driver's recv.

    One checkpoint, as trio's socket methods: the readiness wait, or a
    cancellation check before the read and a shielded schedule point after
    it, so a message taken from the socket is never lost to a cancellation.
    The lock is held across the wait (one task waits on the socket at a
    time); no other task runs between the driver's release and the next take.
    """
    waited = driver.wait_first
    if not waited:
        await trio.lowlevel.checkpoint_if_cancelled()
    while True:
        lock.acquire_nowait()
        if waited:
            try:
                readable = await link.wait_readable()
            except BaseException:
                driver.release(lock)
                raise
            if not readable:  # closed meanwhile: the driver says so
                driver.release(lock)
                return None
        message = driver.receive_now(lock, 0.0, None, waited)  # releases the lock
        if message is not EMPTY:
            break
        waited = True
    if message is not None and not waited:
        await trio.lowlevel.cancel_shielded_checkpoint()
    return message


class _Link(SocketLink):
    """A non-blocking socket that trio waits on: its sends (BlockingIOError when full) and receives never block."""

    __slots__ = ()

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, 0.0)  # a non-blocking socket: recv_into never waits, trio waits for readiness

    @staticmethod
    def set_wait(timeout: float | None) -> bool:
        return timeout == 0

    def recv_packet(self, buffer: Any, timeout: float | None = 0.0) -> int | None:
        return self.recv_nowait(buffer)

    async def wait_readable(self) -> bool:
        """Wait until the socket is readable; False if another task closed it meanwhile."""
        try:
            await trio.lowlevel.wait_readable(self.sock)
        except trio.ClosedResourceError:
            return False
        return True

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)  # a task waiting on it wakes with EBADF
        self.sock.close()


async def _within(deadline: float | None, shield: bool, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """``await fn(*args)`` by ``deadline`` (else TimeoutError), shielded from cancellation if asked."""
    with trio.CancelScope(deadline=math.inf if deadline is None else deadline, shield=shield):
        return await fn(*args)
    raise TimeoutError  # only reached when the deadline cancelled fn


async def _nonblocking(wait: Callable[[Any], Awaitable[None]], sock: socket.socket, call: Callable[[], Any]) -> Any:
    """``call()`` on the non-blocking socket, waiting (``wait``) while it would block.

    One checkpoint either way, as trio's socket methods: a cancellation is
    seen before the call, never after it succeeded.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    waited = False
    while True:
        try:
            result = call()
        except BlockingIOError:
            try:
                await wait(sock)
            except trio.ClosedResourceError:  # closed by another task: the driver's EBADF rule
                raise OSError(errno.EBADF, "the socket was closed") from None
            waited = True
            continue
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return result


def _receiver(link: _Link, buffer: Any) -> Callable[[], Any]:
    return functools.partial(link.sock.recv_into, buffer)  # BlockingIOError until a packet is queued


def _sender(sock: socket.socket, parts: tuple[Any, ...]) -> Callable[[], Any]:
    if len(parts) == 1:
        return functools.partial(sock.send, parts[0], SEND_FLAGS)
    return functools.partial(sock.sendmsg, parts, (), SEND_FLAGS)


class _Trio:
    """Performs the driver's requests (kmux._requests) with ``await``."""

    def __init__(self) -> None:
        self.progress = trio.lowlevel.ParkingLot()

    async def wait_progress(self, request: rq.WaitProgress) -> None:
        async def parked() -> None:
            while not request.done():
                await self.progress.park()

        await _within(request.deadline, False, parked)

    @staticmethod
    async def connect(request: rq.Connect) -> _Link:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)

        async def connected() -> None:
            while True:
                try:
                    return sock.connect(request.path)
                except BlockingIOError:  # the listener's backlog is full
                    await trio.sleep(BACKLOG_RETRY)

        try:
            await _within(request.deadline, False, connected)
        except BaseException:
            sock.close()
            raise
        return _Link(sock)

    @staticmethod
    async def send(request: rq.Send) -> None:
        sock = request.link.sock
        send = _sender(sock, request.parts)
        if request.deadline is None and not request.shield:
            return await _nonblocking(trio.lowlevel.wait_writable, sock, send)
        return await _within(request.deadline, request.shield, _nonblocking, trio.lowlevel.wait_writable, sock, send)

    @staticmethod
    async def recv(request: rq.Recv) -> int:
        sock = request.link.sock
        receive = _receiver(request.link, request.buffer)
        if request.deadline is None:
            return await _nonblocking(trio.lowlevel.wait_readable, sock, receive)
        return await _within(request.deadline, False, _nonblocking, trio.lowlevel.wait_readable, sock, receive)

    @staticmethod
    async def size_send_buffer(request: rq.SizeSendBuffer) -> int:
        return size_send_buffer(request.link.sock, request.want)

    @staticmethod
    async def acquire(request: rq.Acquire) -> None:
        try:
            request.lock.acquire_nowait()  # uncontended: no trip to the scheduler
        except trio.WouldBlock:
            await _within(request.deadline, request.shield, request.lock.acquire)

    @staticmethod
    async def try_acquire(request: rq.TryAcquire) -> bool:
        try:
            request.lock.acquire_nowait()
        except trio.WouldBlock:
            return False
        return True

    @staticmethod
    async def sleep(request: rq.Sleep) -> None:
        await trio.sleep_until(request.until)
