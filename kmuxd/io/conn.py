"""One TCP connection of a group: a thin shell around the cores.

Theory of operation
-------------------
A :class:`Conn` is one TCP connection, handed a connected socket by its
slot (:mod:`kmuxd.io.slot`) and registered in the event core
(:mod:`kmuxd.io.reactor`). Everything about its state lives in its
:class:`~kmuxd.core.states.ConnMachine` (lifecycle and receive side, as
tables); the connection carries out what the cores decide:

* **writes**: the scheduler (:mod:`kmuxd.core.sendq`) decides which outbox a
  client's messages go to; clients read straight into it during a pass and
  the connection writes ``outbox[head:tail]`` with one ``send`` when the pass
  ends (:meth:`Conn.flush`, the one place its transport is written). Only a
  refused write turns on ``EPOLLOUT``.
* **reads** (:mod:`kmuxd.io.receive`, the base class :class:`~kmuxd.io.receive.ReceiveSide`):
  one ``recv_into`` straight into its :class:`~kmuxd.core.inbox.Inbox` per
  readiness event, then the group's steering strategy hands every complete
  message to its client; in balance mode, with no receiver ready, it stops
  reading and TCP pushes back.
* **the transport** is the socket, or with ``[groups.NAME.tls]`` a
  :class:`~kmuxd.io.tls.TlsTransport` with the same ``send``/``recv_into``
  contract. TLS hides two things from epoll, so the connection asks for
  them: ciphertext the kernel refused keeps ``EPOLLOUT`` on (and a retiring
  connection open) until it is out, and plaintext left inside OpenSSL is
  served again next pass (:meth:`Reactor.serve_again <kmuxd.io.reactor.Reactor.serve_again>`).
* **retiring** (make-before-break): when a connection reaches
  ``max_requests_per_connection`` or ``max_connection_age``, or its server
  half-closes, it takes nothing new at once (DRAINING) and its slot dials the
  replacement; it writes what it holds, collects the answers to its requests
  in flight and closes (at the latest after ``request_timeout``, or
  ``shutdown_grace`` without one). In balance mode nothing says when the
  server has answered everything: it shuts its writing side (WRITE_SHUT) and
  reads until the server closes. An operator's ``drain`` retires the live
  connection the old way: the replacement is dialled once it has closed.
* **the end** (:meth:`Conn.end`), synchronously, in named steps:
  answers already received are still delivered; *salvage*: the outbox is cut
  back and handed to another connection (KCM's retry from byte 0); *settle*:
  written requests are retried or told ``connection_lost`` by the router;
  *release*: out of the scheduler and the event core, socket closed;
  *health verdict*: the endpoint pool learns how it ended (a recycle, a
  failure, or ours); then the slot is told and dials again.

Counts go to its own fields, its slot's and group's records as they happen.

Error handling: an unexpected exception in a connection's path is caught by
the reactor's boundary and ends that connection only (:meth:`Conn.crash`).
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING, Final

import trio

from kmux.errors import ConnectionLost, RemoteAssemblyTimeout

from kmuxd.core.endpoints import Verdict
from kmuxd.core.inbox import Inbox
from kmuxd.core.notsent import NotsentMark
from kmuxd.core.router import Flight
from kmuxd.core.sendq import Outbox, Salvage
from kmuxd.core.states import ConnEvent, ConnMachine, ConnState, EndReason, RetireReason, RxState
from kmuxd.system.config import NOTSENT_LOWAT_MAX, Endpoint

from .dial import describe
from .reactor import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP
from .receive import ReceiveSide
from .sockerr import errno_name
from .statistics import ConnStatistics

if TYPE_CHECKING:
    from .slot import Slot
    from .tls import TlsTransport

__all__ = ["Conn", "ConnStatistics"]

_BASE_MASK: Final = EPOLLIN | EPOLLRDHUP


class Conn(ReceiveSide):
    """One TCP connection of a slot, registered in the event core."""

    __slots__ = (
        "group", "slot", "clock", "sock", "fd", "endpoint", "sm", "inbox", "flight", "connected_at",
        "steering", "slot_counters", "counters", "tx_msgs", "tx_bytes", "requests", "budget", "flight_total",
        "retire_deadline", "retire_reason", "_closed_event", "error", "tls", "transport", "notsent",
    )

    def __init__(self, slot: "Slot", sock: socket.socket, endpoint: Endpoint, inbox: Inbox,
                 tls: "TlsTransport | None" = None) -> None:
        group = slot.group
        cfg = group.cfg
        self.group = group
        self.slot = slot
        self.clock = slot.clock
        self.sock = sock
        self.fd = sock.fileno()
        self.endpoint = endpoint
        #: All of its state (see kmuxd.core.states).
        self.sm = ConnMachine(f"group {cfg.name} conn {slot.index}")
        self.inbox = inbox
        self.flight: Flight | None = group.router.flight(self) if group.router is not None else None
        self.mask = _BASE_MASK
        self.connected_at = self.clock()
        self.steering = group.steering
        self.slot_counters = slot.counters
        self.counters = group.counters
        #: Messages/bytes written on it (counted in its slot's and group's totals too).
        self.tx_msgs = self.tx_bytes = 0
        #: Messages cut from its stream (delivered or not): its answers, for endpoint health.
        self.rx_msgs = 0
        #: Requests accepted to be written here; how many more before it recycles (None: no limit).
        self.requests = 0
        self.budget: int | None = cfg.max_requests_per_connection or None
        #: Requests written on it (an adopted outbox may hold others': not ``requests``).
        self.flight_total = 0
        #: Messages from its server delivered to clients (answers, or in
        #: balance mode any message): once it delivered one, a FIN from its
        #: server is a recycle, not a failure.
        self.delivered = 0
        self.retire_deadline: float | None = None
        self.retire_reason: RetireReason | None = None
        #: Set when the TCP connection is closed, however it ended (:meth:`wait_closed`).
        self._closed_event = trio.Event()
        self.error: str | None = None
        #: Its TLS (kmuxd.io.tls; None: plaintext), and what it sends and receives through.
        self.tls = tls
        self.transport: "socket.socket | TlsTransport" = sock if tls is None else tls
        #: Its TCP_NOTSENT_LOWAT: the socket was made with the floor; raised as its messages require.
        sock_cfg = cfg.socket
        self.notsent = NotsentMark(sock_cfg.notsent_floor, sock_cfg.notsent_messages, NOTSENT_LOWAT_MAX)

    def __repr__(self) -> str:
        return f"Conn({self.group.cfg.name}/{self.slot.index} {self.endpoint})"

    def start(self) -> None:
        group = self.group
        group.reactor.register(self.fd, self, self.mask)
        group.sched.connected(self)
        group.retry_feeder.feed()  # retried requests wait for a fresh connection like this one

    async def wait_closed(self) -> None:
        """Wait until the TCP connection is closed, however it ends."""
        await self._closed_event.wait()

    # -- the reactor's view ------------------------------------------------------

    def handle(self, events: int) -> None:
        if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            if self.sm.reading:
                self.read()
            else:
                self._hung_up_while_paused(events)
        if events & EPOLLOUT and not self.sm.closed:
            self.flush()

    def crash(self, exc: BaseException) -> None:
        self.end(EndReason.ERROR, ConnectionLost(f"internal error on this connection: {exc!r}"))

    def _set_mask(self, mask: int) -> None:
        sm = self.sm
        if mask != self.mask and not sm.closed and sm.rx is not RxState.SUSPENDED:
            self.mask = mask
            self.group.reactor.modify(self.fd, mask)

    # -- writing (kmuxd.core.sendq.Carrier) ---------------------------------------

    def flush_soon(self) -> None:
        """Bytes were committed to this connection's outbox: write them when the pass ends."""
        self.group.reactor.flush_later(self)

    def count_accepted(self, msgs: int, nbytes: int) -> None:
        """``msgs`` requests, ``nbytes`` in all, were committed to this connection's outbox."""
        self.requests += msgs
        mark = self.notsent.committed(msgs, nbytes)
        if mark:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, mark)
            except OSError:
                pass  # the connection failed meanwhile: its next write or read ends it and says why
        if self.budget is not None:
            self.budget -= msgs
            if self.budget <= 0 and self.sm.taking:
                self.retire(RetireReason.MAX_REQUESTS, True)

    def count_written(self, msgs: int) -> None:
        """``msgs`` messages of the outbox it carries reached the kernel (a write,
        a compaction behind a blocked write, or the salvage of its end)."""
        self.tx_msgs += msgs
        self.slot_counters.tx_msgs += msgs
        self.counters.tx_msgs += msgs

    def flush(self) -> None:
        """Write as much of the outbox as the kernel takes, without waiting."""
        if self.sm.closed:
            return
        group = self.group
        sched = group.sched
        outbox = sched.outbox_of(self)
        tls = self.tls
        send = self.transport.send
        while outbox.head < outbox.tail:
            try:
                n = send(outbox.view[outbox.head : outbox.tail])
            except BlockingIOError:
                self.sm.fire(ConnEvent.WRITE_BLOCKED)
                sched.blocked(self)
                self._set_mask(self.mask | EPOLLOUT)
                return
            except OSError as exc:
                self.end(EndReason.ERROR, exc)
                return
            self.tx_bytes += n
            self.slot_counters.tx_bytes += n
            self.counters.tx_bytes += n
            sched.written(self, n)
            if self.flight is not None:
                self._flight_written(outbox)
            # written() may have had this connection adopt an orphan (when its
            # own outbox emptied): the next bytes to write are the orphan's.
            outbox = sched.outbox_of(self)
        if tls is not None and tls.backlog and not self._push_tls(tls):
            return
        if self.sm.state is ConnState.BUSY:
            self.sm.fire(ConnEvent.WRITE_DONE)
        if self.mask & EPOLLOUT:
            self._set_mask(self.mask & ~EPOLLOUT)
        if group.flush_waited:
            group.note_flushed()
        if self.sm.state is ConnState.DRAINING:
            self.maybe_finish_retiring()

    def _push_tls(self, tls: "TlsTransport") -> bool:
        """The outbox is written (as plaintext) but the kernel refused ciphertext: the backlog
        asks for EPOLLOUT until it is out (kmuxd.io.tls, rule 1). True once it is all out."""
        try:
            pushed = tls.push()
        except OSError as exc:
            self.end(EndReason.ERROR, exc)
            return False
        if not pushed:
            self.sm.fire(ConnEvent.WRITE_BLOCKED)
            self._set_mask(self.mask | EPOLLOUT)
        return pushed

    def _flight_written(self, outbox: Outbox) -> None:
        """Requests whose bytes reached the kernel are in flight on this connection now."""
        written = outbox.take_written()
        if written:
            flight = self.flight
            router = self.group.router
            assert flight is not None and router is not None  # id/fifo steering only
            self.flight_total += len(written)
            for req in written:
                router.written(req, flight)

    # -- retiring ------------------------------------------------------------------------------

    def retire(self, reason: RetireReason, recycle: bool, deadline: float | None = None) -> None:
        """Take nothing new; finish what is here, then close (see the module docstring).

        ``recycle``: make-before-break, the slot dials the replacement now.
        """
        if not self.sm.taking:
            return
        group = self.group
        self.sm.fire(ConnEvent.RETIRE)
        self.retire_reason = reason
        if deadline is None:
            cfg = group.cfg
            deadline = self.clock() + (cfg.request_timeout or group.daemon_cfg.shutdown_grace)
        self.retire_deadline = deadline
        group.sched.retire(self)
        if recycle:
            self.counters.recycles += 1
            self.slot.replace_now(self)
        self.maybe_finish_retiring()

    def resume(self) -> None:
        """An operator's drain timed out: back in service."""
        if self.sm.state is ConnState.DRAINING:
            self.sm.fire(ConnEvent.RESUME)
            self.retire_deadline = None
            self.group.sched.connected(self)

    def maybe_finish_retiring(self) -> None:
        """Close a retiring connection once its outbox is written and its requests answered."""
        if self.sm.state is not ConnState.DRAINING:
            return
        outbox = self.group.sched.outbox_of(self)
        if outbox.pending or outbox.owners or outbox.open_owner is not None:
            return
        if self.tls is not None and self.tls.backlog:
            return  # its ciphertext is not all out yet: the flush that sends it calls again
        if self.flight is not None or self.slot.peer is not None:  # attached: never half-close the app's stream
            if self.flight is None or not self.flight.count():
                self.end(EndReason.REQUESTED)
            return
        # Balance: nothing tells us when the service has answered everything.
        # Half-close and read until it closes its side (or the deadline).
        self.sm.fire(ConnEvent.SHUT_WRITE)
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            # ENOTCONN: the server reset it already; its read side reports
            # that and ends the connection (connection_failed names it).
            log = self.group.log
            (log.debug if exc.errno == errno.ENOTCONN else log.warning)(
                "half_close_failed", conn=self.slot.index, errno=errno_name(exc))

    def apply_deadlines(self, now: float) -> None:
        """assembly_timeout, the end of a retirement, max_connection_age (housekeeping)."""
        if self.sm.closed or self._assembly_expired(now):
            return
        if self.retire_deadline is not None and now >= self.retire_deadline:
            self.end(EndReason.REQUESTED)
            return
        age = self.group.cfg.max_connection_age
        if age and self.sm.taking and now - self.connected_at >= age:
            self.retire(RetireReason.MAX_AGE, True)

    def _assembly_expired(self, now: float) -> bool:
        """A partial message waited ``assembly_timeout`` for the remote: end with an ejection."""
        cfg = self.group.cfg
        if not self.inbox.expired(now, cfg.assembly_timeout):
            return False
        exc = RemoteAssemblyTimeout(f"{self.inbox.partial_text(cfg.max_message)} did not complete "
                                    f"within assembly_timeout={cfg.assembly_timeout}s")
        self.slot_counters.msg_timeouts += 1
        self.end(EndReason.ERROR, exc, eject="assembly timeout")
        return True

    # -- the end ---------------------------------------------------------------------------------

    def end(self, how: EndReason, exc: BaseException | None = None, *, eject: str | None = None,
            reason: RetireReason | None = None) -> None:
        """The stream is done: settle everything now (``eject``: and eject its endpoint, why;
        ``reason``: why we closed it, when it was not retiring)."""
        if self.sm.closed:
            return
        if reason is not None:
            self.retire_reason = reason
        now = self.clock()
        requested = how is EndReason.REQUESTED
        if exc is not None and not requested:
            self.error = describe(exc)
        # Answers the service sent before the stream broke are still owed. A FIN
        # among them means the server closed first and our later writes drew the
        # reset (EPIPE/ECONNRESET): for health that is the server's recycle.
        fin_first = how is EndReason.ERROR and self.flight is not None and self.sm.reading and self._take_arrived()
        was_retiring = self.sm.retiring
        self.sm.fire(ConnEvent.CLOSE if requested else ConnEvent.FAIL)
        queued = self.group.sched.outbox_of(self).pending
        salvage = self._salvage(now)
        unanswered = self._settle(how)
        spare = self._release()
        verdict = self._health_verdict(how, now, eject, fin_first or how is EndReason.FIN,
                                       requested or was_retiring, unanswered)
        log = self.group.log.bind(conn=self.slot.index, endpoint=str(self.endpoint))
        failed = verdict is Verdict.FAILURE
        (log.warning if failed else log.info)(
            "connection_failed" if failed else "connection_closed",
            how=how.value, counted=verdict.value, error=self.error,
            reason=self.retire_reason.value if self.retire_reason else None,
            error_code=getattr(exc, "code", "os_error") if exc is not None else None,
            resend_msgs=salvage.resend_msgs, queued_bytes=queued,
        )
        self.slot.conn_ended(self, verdict, spare)

    def _salvage(self, now: float) -> Salvage:
        """The outbox is cut back to its first message not fully written and handed on;
        messages whole in the kernel count as written here (their requests in flight)."""
        sched = self.group.sched
        outbox = sched.outbox_of(self)
        salvage = sched.failed(self, now)
        if self.flight is not None:
            self._flight_written(outbox)
        if salvage.cut_msgs:
            self.slot_counters.tx_aborts += 1
        self.counters.tx_retries += salvage.resend_msgs
        return salvage

    def _settle(self, how: EndReason) -> bool:
        """Requests written here and not answered: retried or told ``connection_lost``.
        True if there were any."""
        flight = self.flight
        if flight is None:
            return False
        unanswered = flight.count() > 0
        why = self.error or (self.retire_reason.value if self.retire_reason else "closed")
        self.group.settle_lost(flight, f"connection {self.slot.index} to {self.endpoint} {how.text}: {why}")
        return unanswered

    def _release(self) -> Outbox | None:
        """Out of the scheduler and the event core, socket closed, waiters woken.
        Returns the outbox it carried, for its slot to reuse."""
        group = self.group
        spare = group.sched.remove(self)
        group.reactor.unregister(self.fd)
        try:
            self.sock.close()
        except OSError:
            pass  # the descriptor is released whatever close() says; the end is logged
        self._closed_event.set()
        return spare

    def _health_verdict(self, how: EndReason, now: float, eject: str | None, graceful: bool, requested: bool,
                        unanswered: bool) -> Verdict:
        """What the endpoint pool makes of this end (``graceful``: the server closed first)."""
        pool = self.group.endpoints
        answered = self.delivered > 0
        if eject is not None:
            pool.closed(self.endpoint, now, answered=answered, graceful=False, requested=True)
            pool.eject(self.endpoint, now, eject)
            return Verdict.FAILURE
        return pool.closed(
            self.endpoint, now, answered=answered, unanswered=unanswered, age=now - self.connected_at,
            answers=self.rx_msgs, graceful=graceful, requested=requested, reason=self.error or "",
        )

    # -- statistics ------------------------------------------------------------------------------

    def age(self, now: float) -> float:
        return now - self.connected_at

