"""The receive side of a group's TCP connection: bytes in, messages steered out.

Theory of operation
-------------------
:class:`ReceiveSide` is the half of :class:`~kmuxd.io.conn.Conn` that reads;
``Conn`` inherits it and adds the write side, retiring and the end. It is a
base class rather than an object of its own so that the hot path costs no
extra attribute hop (the reactor calls ``conn.handle``, which calls
:meth:`ReceiveSide.read` on the same object).

* **One read per readiness event**: :meth:`ReceiveSide.read` makes one
  ``recv_into`` straight into the connection's :class:`~kmuxd.core.inbox.Inbox`
  (the one place its transport is read on the live path), then, if the
  read completed messages, the group's steering strategy
  (:mod:`kmuxd.core.steering`) hands each to its client. The epoll is
  level-triggered, so what a read leaves in the kernel is reported again
  next pass: no read to ``EAGAIN``.
* **Push-back (balance)**: with no receiver ready the inbox keeps what it
  holds, the connection leaves ``EPOLLIN`` (the receive side's PAUSED) and
  TCP pushes back on the server; :meth:`ReceiveSide.resume_reading` hands
  over what waits first and reads again only once the inbox is empty.
  A hang-up while paused takes the socket out of the epoll
  (SUSPENDED), since level-triggered epoll would report it every pass.
* **Too big**: a message over ``max_message`` (within ``max_skip``) goes by
  unread; steering says whose request it answered, the group tells that
  client ``response_too_big``, and the messages after it are cut as usual.
* **TLS**: plaintext left inside OpenSSL is invisible to epoll, so the
  connection asks to be served again next pass
  (:meth:`Reactor.serve_again <kmuxd.io.reactor.Reactor.serve_again>`).
* **A failing stream**: :meth:`ReceiveSide._take_arrived` reads, without
  waiting and at most ``ARRIVED_READS_MAX`` times, what the server sent
  before the stream broke, so answers already received are still
  delivered when the connection ends.

Invariants: every message cut from the stream is counted once in
``rx_msgs`` (delivered, skipped or unmatched); the receive side's state lives
in the connection's :class:`~kmuxd.core.states.ConnMachine` (``sm.rx``), not
in flags; reading never waits.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Final, cast

from kmux.errors import KmuxError

from kmuxd.core.inbox import Inbox
from kmuxd.core.router import Flight
from kmuxd.core.states import ConnMachine, ConnState, EndReason, RetireReason, RxEvent, RxState
from kmuxd.core.steering import Steering
from kmuxd.system.config import Endpoint

from .reactor import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLRDHUP, Clock

if TYPE_CHECKING:
    from kmuxd.core.counters import SlotCounters

    from .conn import Conn
    from .group import Group
    from .slot import Slot
    from .tls import TlsTransport

__all__ = ["ReceiveSide", "ARRIVED_READS_MAX"]

#: Reads of a failing stream, without waiting, to take answers already received.
ARRIVED_READS_MAX: Final = 64


class ReceiveSide:
    """The reading half of a connection (see the module docstring); :class:`~kmuxd.io.conn.Conn` sets its fields."""

    # The fields it writes are its own; the others are the connection's (Conn sets them all).
    __slots__ = ("mask", "rx_msgs", "delivered")

    group: "Group"
    slot: "Slot"
    clock: Clock
    sm: ConnMachine
    fd: int
    endpoint: Endpoint
    inbox: Inbox
    flight: Flight | None
    steering: Steering
    slot_counters: "SlotCounters"
    tls: "TlsTransport | None"
    transport: "socket.socket | TlsTransport"
    #: Its interest in the reactor (EPOLLIN | EPOLLRDHUP while reading, EPOLLOUT while a write waits).
    mask: int
    #: Messages cut from its stream (delivered or not): its answers, for endpoint health.
    rx_msgs: int
    #: Messages from its server delivered to clients: once it delivered one, a FIN
    #: from its server is a recycle, not a failure.
    delivered: int

    # What the rest of the connection provides (kmuxd.io.conn.Conn).

    def end(self, how: EndReason, exc: BaseException | None = None, *, eject: str | None = None,
            reason: RetireReason | None = None) -> None:
        raise NotImplementedError

    def retire(self, reason: RetireReason, recycle: bool, deadline: float | None = None) -> None:
        raise NotImplementedError

    def maybe_finish_retiring(self) -> None:
        raise NotImplementedError

    def flush_soon(self) -> None:
        raise NotImplementedError

    def _set_mask(self, mask: int) -> None:
        raise NotImplementedError

    # -- reading -------------------------------------------------------------------------

    def read(self) -> None:
        """One read into the inbox, then steer what it completed."""
        inbox = self.inbox
        try:
            n = self.transport.recv_into(inbox.space())
        except BlockingIOError:
            return
        except OSError as exc:
            self.end(EndReason.ERROR, exc)
            return
        if n == 0:
            self.end(EndReason.FIN)  # everything the server sent has been read
            return
        self.slot_counters.rx_bytes += n
        try:
            ready = inbox.received(n, self.clock())
        except KmuxError as exc:  # RemoteFrameTooBig / RemoteBadHeader
            self.end(EndReason.ERROR, exc, eject=f"bad framing: {exc.message}")
            return
        if ready:
            self.steer()
        tls = self.tls
        if tls is not None:
            if tls.backlog:
                self.flush_soon()  # the read produced TLS output (a key update): send it
            if tls.buffered and self.sm.reading and not self.sm.closed:
                # Plaintext waits inside the SSLObject, where epoll cannot see it:
                # read again next pass without a readiness event (kmuxd.io.tls, rule 2).
                self.group.reactor.serve_again(self.fd, cast("Conn", self))

    def steer(self) -> None:
        """Hand the inbox's complete messages over; stop reading if some must wait."""
        if not self._hand_over():
            self.pause_reading()
        elif self.sm.state is ConnState.DRAINING:
            self.maybe_finish_retiring()

    def _hand_over(self) -> bool:
        """The steering strategy hands over what it can. True if the inbox has no message left."""
        inbox = self.inbox
        while True:
            count = len(inbox.ends)
            delivered = self.steering.steer(inbox, self.flight, self.group.sched.outbox_of(cast("Conn", self)).requests,
                                            self.clock())
            left = len(inbox.ends)
            self.rx_msgs += count - left
            self.slot_counters.rx_msgs += count - left
            if delivered:
                self._answered(delivered)
            if left or inbox.skip is None:
                return not left
            self._hand_over_skipped()

    def _hand_over_skipped(self) -> None:
        """The inbox skipped a message over max_message, after those just handed over:
        steering says whose request it answered, the group tells that client; then the
        inbox cuts the messages after it."""
        inbox = self.inbox
        assert inbox.skip is not None
        size = inbox.skip[2]
        now = self.clock()
        req = self.steering.skipped(inbox, self.flight, self.group.sched.outbox_of(cast("Conn", self)).requests, now)
        self.rx_msgs += 1
        self.slot_counters.count_skipped(size)
        if req is not None:
            self._answered(1)  # a well-framed answer: the server is healthy, only its answer was too big
        self.group.response_skipped(self.slot.index, req, size)
        inbox.skip_taken(now)

    def _answered(self, n: int) -> None:
        self.delivered += n
        if self.steering.answers:
            self.group.endpoints.answered(self.endpoint)

    def pause_reading(self) -> None:
        """Balance: no receiver is ready. Stop reading; TCP pushes back on the server."""
        self.sm.fire_rx(RxEvent.PAUSE)
        self.inbox.pause_clock()
        self.group.wait_for_receiver(self)
        self._set_mask(self.mask & ~(EPOLLIN | EPOLLRDHUP))

    def resume_reading(self) -> None:
        """A receiver became ready: hand over what waits, then read again."""
        sm = self.sm
        if sm.reading or sm.closed:
            return
        if not self._hand_over():
            self.group.wait_for_receiver(self)
            return
        hung_up = sm.rx is RxState.SUSPENDED
        sm.fire_rx(RxEvent.UNPAUSE)
        self.inbox.resume_clock(self.clock())
        if hung_up:
            # Back into the epoll, and read now: a hang-up means the rest of
            # the stream (and its end) is there to read.
            self.mask |= EPOLLIN | EPOLLRDHUP
            self.group.reactor.register(self.fd, cast("Conn", self), self.mask)
            self.read()
        else:
            self._set_mask(self.mask | EPOLLIN | EPOLLRDHUP)
            if self.tls is not None and self.tls.buffered:
                self.read()  # plaintext already inside the SSLObject: no readiness event comes for it

    def _hung_up_while_paused(self, events: int) -> None:
        # Level-triggered epoll reports a hang-up for as long as it lasts,
        # whatever the mask: take the socket out of the epoll until a
        # receiver is ready, then read what the server sent before it went.
        if events & (EPOLLHUP | EPOLLERR) and self.sm.rx is RxState.PAUSED:
            self.sm.fire_rx(RxEvent.HANG_UP)
            self.group.reactor.unregister(self.fd)
        if events & EPOLLRDHUP and self.sm.taking:
            self.retire(RetireReason.SERVER_CLOSED, True)

    def _take_arrived(self) -> bool:
        """Read and steer, without waiting, whatever already arrived on a failing stream.

        True if the server's FIN was among it (it closed before the stream failed).
        """
        inbox = self.inbox
        for _ in range(ARRIVED_READS_MAX):
            if inbox.ends or inbox.skip is not None:
                if not self._hand_over():
                    return False
            try:
                n = self.transport.recv_into(inbox.space())
            except OSError:
                return False  # EAGAIN: all taken; else the stream's error, which end() logs
            if n == 0:
                return True
            self.slot_counters.rx_bytes += n
            try:
                inbox.received(n, self.clock())
            except KmuxError:
                return False
        if inbox.ends or inbox.skip is not None:
            self._hand_over()
        return False

