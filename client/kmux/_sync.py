"""The blocking client: the ClientDriver run with blocking calls.

    with kmux.connect("echo") as client:
        client.send(message)
        reply = client.recv(timeout=1.0)

(``kmux.connect`` is :func:`kmux._client.connect`: this module may run
compiled (``kmux._compiled``), where a parameter's declared type is
enforced before the settings could name the argument that is wrong.)

Everything a client decides is in :mod:`kmux._driver`; this module only
performs its requests (``Client._run``, ``_Blocking``) and keeps the fast
paths below.

Resource handling
-----------------
The socket stays in blocking mode, so a send blocks while the daemon's
receive buffer is full. That is the intended push-back: an app that outruns
its group's TCP connections slows down instead of piling up memory in the
daemon. The receive buffer is the session's, allocated once per
connection: a fresh large buffer per ``recv`` would make glibc mmap and
munmap it every call.

Timeouts: a receive is one blocking ``recv_into``, whether a message is
waiting or not, and the kernel keeps its timeout: the link keeps
``SO_RCVTIMEO`` set to the last bound asked for and changes it only when the
bound changes (``recv(timeout=5)`` in a loop sets it once). Two things about
the kernel's timer, both bounded:

* it counts in clock ticks, so a receive may time out up to two ticks late
  (8 ms on a 250 Hz kernel); bounds under :data:`RCVTIMEO_MIN` therefore
  try without waiting and then ``poll`` instead, as Python's own socket
  timeouts do;
* a signal whose handler runs (and does not raise) during the wait ends
  the system call, and Python starts it again (PEP 475) with the whole
  bound: a process that takes signals more often than its timeout (a
  profiling timer) waits longer than the timeout.

Sends never get a socket timeout (``SO_SNDTIMEO`` stays 0): a send with a
deadline (the handshake) tries without waiting and then polls.

Threads: any number of threads may send and receive. The driver's send lock
keeps the pieces of a large message together and the seq in the socket's
order; ``set_receive`` may be called from any thread. ``close()`` shuts the
socket down first, which wakes a thread blocked on it.

The fast lane (the driver's "The fast lane"): ``send`` takes the send
lock (waiting for another sender, as the driver's send would) and calls
:meth:`ClientDriver.send_now`; ``recv`` takes the receive lock without
waiting and calls :meth:`ClientDriver.receive_now`. Each makes one system
call on the common path. Anything else (another thread receiving, a large
message, a connection to repair) goes through the driver's generators,
which apply every rule.
"""

from __future__ import annotations

import math
import select
import socket
import struct
import threading
import time
from typing import Any, Callable, Final, Generator

from . import _requests as rq
from ._client import ClientInfo, ReconnectInfo
from ._driver import EMPTY, NO_MESSAGE, ClientDriver, ClientSettings
from ._link import SEND_FLAGS, SocketLink, mypyc_attr
from .sockbuf import size_send_buffer

__all__ = ["Client", "ReconnectingClient", "RCVTIMEO_MIN"]

_DONTWAIT = SEND_FLAGS | socket.MSG_DONTWAIT
_DEFAULT: Any = object()
#: Receive timeouts at least this long (seconds) are kept by the kernel
#: (SO_RCVTIMEO: one blocking call); shorter ones try, then poll. The kernel
#: rounds SO_RCVTIMEO up to its clock tick (4 ms at 250 Hz).
RCVTIMEO_MIN = 0.1
#: Bounds above this (seconds) are kept as "no bound" (SO_RCVTIMEO 0).
RCVTIMEO_MAX = float(1 << 31)
_TIMEVAL = struct.Struct("@ll")
_monotonic: Final = time.monotonic


@mypyc_attr(allow_interpreted_subclasses=True)
class _Lane:
    """Everything :class:`Client` does. A class of its own so that, compiled (kmux._compiled), it
    is a native class (its attributes are fields, not a dictionary's entries); ClientInfo's
    properties are plain Python, and a class that has them is too."""

    def __init__(self, settings: ClientSettings) -> None:
        #: The default bound of :meth:`set_receive`, seconds.
        self.timeout = settings.timeout
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        transport = _Blocking()
        self._perform = rq.dispatch_table(transport)
        self._driver = ClientDriver(settings, send_lock=self._send_lock, recv_lock=self._recv_lock,
                                    notify_progress=transport.notify_progress, clock=time.monotonic)

    def send(self, message: Any) -> int:
        """Send one whole message (header included), in pieces if it needs them; returns its seq.

        Blocks while the daemon is not reading (push-back). Raises
        BadFrame/MessageTooBig without sending if the message's header
        disagrees with its size, DaemonShutdown if the daemon is gone.
        """
        lock = self._send_lock
        lock.acquire()  # as the driver's send would: a send waits for another thread's
        try:
            seq = self._driver.send_now(message)
        finally:
            lock.release()
        if seq is not None:
            return seq
        return self._run(self._driver.send(message))

    def recv(self, timeout: float | None = None) -> bytes:
        """Wait for one whole message (header included) and return it.

        Raises the error of a NOTICE from the daemon (e.g. BadFrame with the
        ``seq`` of the refused message), TimeoutError if nothing arrives
        within ``timeout`` seconds, DaemonShutdown if the daemon closed the
        connection.
        """
        driver = self._driver
        deadline = None if timeout is None else _monotonic() + timeout
        if self._recv_lock.acquire(False):
            message = driver.receive_now(self._recv_lock, timeout, deadline)
            if message is not None:
                if message is EMPTY:
                    raise TimeoutError(NO_MESSAGE)
                return message
        return self._run(driver.recv(deadline))

    def set_receive(self, on: bool, timeout: Any = _DEFAULT) -> None:
        """Switch receiving on or off.

        Turning it off blocks until the daemon's ``receive_off`` marker, and
        hands every message that arrives before it back to the daemon, which
        gives it to another receiver; messages the app already took with
        ``recv`` are the app's. ``timeout`` defaults to the connect timeout;
        on TimeoutError the hand-back continues in later ``recv`` calls.
        """
        timeout = self.timeout if timeout is _DEFAULT else timeout
        self._run(self._driver.set_receive(on, None if timeout is None else time.monotonic() + timeout))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the daemon has read every message sent so far (TimeoutError after ``timeout``).

        ``close()`` does not wait: messages the daemon has not read yet
        (push-back) are dropped when the client hangs up, and counted by the
        daemon. Flush first when the last messages matter. A message the
        daemon has read is accepted: written, or refused with a notice.
        """
        self._run(self._driver.flush(None if timeout is None else time.monotonic() + timeout))

    def close(self) -> None:
        """Close the connection at once (see :meth:`flush`). Safe to call twice, and from another thread."""
        self._driver.close()

    def __enter__(self) -> Any:  # the Client (or ReconnectingClient) itself
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- performing the driver's requests ------------------------------------------

    def _run(self, operation: Generator[Any, Any, Any]) -> Any:
        """Run one driver operation to its end; see kmux._driver."""
        perform = self._perform
        step: Callable[[Any], Any] = operation.send
        arg: Any = None
        while True:
            try:
                request = step(arg)
            except StopIteration as done:
                return done.value
            try:
                step, arg = operation.send, perform[type(request)](request)
            except BaseException as exc:  # the driver decides what it means
                step, arg = operation.throw, exc


class Client(_Lane, ClientInfo):
    """A blocking connection to kmuxd, joined to one group. Build it with :func:`connect`."""


class ReconnectingClient(ReconnectInfo, Client):
    """A blocking client that reconnects when the daemon goes away.

    Build it with ``kmux.connect(group, ..., reconnect=True)`` (or a
    :class:`~kmux.ReconnectPolicy`). Same methods as :class:`Client`;
    ``send`` also waits while reconnecting (at most the policy's bound, then
    DaemonUnavailable; the next call tries again), and ``recv(timeout)``
    bounds that wait too. See the README for the accounting.
    """


class _Link(SocketLink):
    """A blocking socket: a send blocks for room, a receive up to its timeout (see "Timeouts")."""

    # No __slots__: compiled (kmux._compiled), a subclass of a class that is not compiled
    # (SocketLink, which trio's link subclasses too) is a plain Python class, and mypyc refuses them there.

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, None)  # SO_RCVTIMEO 0: no bound
        self._poll: Any = None  # for bounds under RCVTIMEO_MIN, made at the first

    def set_wait(self, timeout: float | None) -> bool:
        """Keep ``timeout`` in SO_RCVTIMEO; False for a bound the kernel's timer does not keep well."""
        if timeout is not None and not timeout >= RCVTIMEO_MIN:
            return False
        bound = 0.0 if timeout is None or timeout > RCVTIMEO_MAX else timeout
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                             _TIMEVAL.pack(*divmod(math.ceil(bound * 1e6), 1_000_000)))
        self.wait = timeout
        return True

    def recv_packet(self, buffer: Any, timeout: float | None) -> int | None:
        if timeout == self.wait or self.set_wait(timeout):
            try:
                return self.recv_into(buffer)
            except BlockingIOError:  # SO_RCVTIMEO passed
                return None
        got = self.recv_nowait(buffer)  # a short bound: try, then poll
        if got is not None or not timeout > 0:  # type: ignore[operator]
            return got
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self.sock, select.POLLIN)
        deadline = time.monotonic() + timeout  # type: ignore[operator]
        while (got := self.recv_nowait(buffer)) is None:
            left = deadline - time.monotonic()
            if left <= 0 or not self._poll.poll(math.ceil(left * 1000)):
                return None
        return got


def _seconds_left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class _Blocking:
    """Performs the driver's requests (kmux._requests) with blocking calls."""

    def __init__(self) -> None:
        self.progress = threading.Condition()

    def notify_progress(self) -> None:
        with self.progress:
            self.progress.notify_all()

    def wait_progress(self, request: rq.WaitProgress) -> None:
        with self.progress:
            if not self.progress.wait_for(request.done, _seconds_left(request.deadline)):
                raise TimeoutError

    @staticmethod
    def connect(request: rq.Connect) -> _Link:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            left = _seconds_left(request.deadline)
            sock.settimeout(None if left is None else max(left, 0.001))  # a full backlog makes connect wait
            sock.connect(request.path)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return _Link(sock)

    @staticmethod
    def send(request: rq.Send) -> None:
        sock, parts = request.link.sock, request.parts
        flags = SEND_FLAGS if request.deadline is None else _DONTWAIT
        while True:
            try:
                if len(parts) == 1:
                    sock.send(parts[0], flags)
                else:
                    sock.sendmsg(parts, (), flags)
                return
            except BlockingIOError:
                if not select.select((), (sock,), (), _seconds_left(request.deadline))[1]:
                    raise TimeoutError from None

    @staticmethod
    def recv(request: rq.Recv) -> int:
        got = request.link.recv_packet(request.buffer, _seconds_left(request.deadline))
        if got is None:
            raise TimeoutError
        return got

    @staticmethod
    def size_send_buffer(request: rq.SizeSendBuffer) -> int:
        return size_send_buffer(request.link.sock, request.want)

    @staticmethod
    def acquire(request: rq.Acquire) -> None:
        if request.deadline is None:
            request.lock.acquire()
        elif not request.lock.acquire(timeout=_seconds_left(request.deadline)):
            raise TimeoutError

    @staticmethod
    def try_acquire(request: rq.TryAcquire) -> bool:
        return request.lock.acquire(False)

    @staticmethod
    def sleep(request: rq.Sleep) -> None:
        time.sleep(max(0.0, request.until - time.monotonic()))
