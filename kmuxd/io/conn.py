"""A group's TCP connections: the slot that keeps one up, and each connection's I/O.

Theory of operation
-------------------
A :class:`Slot` is a numbered place in the group (``conn 0..N-1``) that
keeps one *live* TCP connection: a trio task dials (the group's endpoint
pool says where, and when), hands the connected socket to a :class:`Conn`
registered in the event core (:mod:`kmuxd.io.reactor`), and waits until that
connection fails, closes or retires, then dials again.

A :class:`Conn` is one TCP connection, a thin shell around the cores:

* **writes**: the scheduler (:mod:`kmuxd.core.sendq`) decides which outbox a
  client's messages go to; clients read straight into it during a pass and
  the connection writes ``outbox[head:tail]`` with one ``send`` when the pass
  ends. Only a refused write turns on ``EPOLLOUT``.
* **reads**: one ``recv_into`` straight into its :class:`~kmuxd.core.inbox.Inbox`
  per readiness event, then the group steers every complete message (one
  plain ``send`` each, from the buffer).
* **endings**, all through :meth:`Conn.end`, synchronously: answers already
  received are still delivered, the outbox is cut back and handed to another
  connection (KCM's retry from byte 0), written requests are settled by the
  router (retried or told ``connection_lost``), the endpoint pool learns
  how the connection ended (a recycle or a failure), and the slot is woken
  to dial again.
* **retiring** (make-before-break): when a connection reaches
  ``max_requests_per_connection`` or ``max_connection_age``, or its server
  half-closes, it takes nothing new at once and the slot dials its
  replacement; the old one writes what it holds, collects the answers to its
  requests in flight and closes (at the latest after ``request_timeout``, or
  ``shutdown_grace`` without one). An operator's ``drain`` retires the live
  connection the old way: the replacement is dialled once it has closed.

Error handling: an unexpected exception in a connection's path is caught by
the reactor's boundary and ends that connection only (:meth:`Conn.crash`).
"""

from __future__ import annotations

import errno
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from kmux.errors import (
    ConnectFailed,
    ConnectionLost,
    DrainInProgress,
    DrainTimeout,
    KmuxError,
    RemoteAssemblyTimeout,
)

from kmuxd.core.inbox import Inbox
from kmuxd.core.sendq import Outbox
from kmuxd.core.states import (
    CONN_TRANSITIONS,
    OPEN_STATES,
    SLOT_TRANSITIONS,
    TAKING_STATES,
    ConnEvent,
    ConnState,
    SlotEvent,
    SlotState,
    StateMachine,
)
from kmuxd.system.config import Endpoint
from kmuxd.system.log import RateLimit

from .dial import describe, establish
from .reactor import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, Handler
from .sockerr import errno_name
from .tcpinfo import TcpInfo, read_tcp_info

if TYPE_CHECKING:
    from .group import Group
    from .tls import TlsStatistics, TlsTransport

__all__ = ["Slot", "Conn", "ConnStatistics"]

#: Reads of a failing stream, without waiting, to take answers already received.
ARRIVED_READS_MAX = 64
#: Seconds between "dial_failed" log lines per slot (all are counted).
DIAL_LOG_INTERVAL = 10.0

_BASE_MASK = EPOLLIN | EPOLLRDHUP


@dataclass(frozen=True, slots=True)
class ConnStatistics:
    index: int
    state: str
    endpoint: str
    local: str | None
    remote: str | None
    #: Seconds since this TCP connection was established (0 if none).
    age: float
    tx_msgs: int
    tx_bytes: int
    rx_msgs: int
    rx_bytes: int
    #: Clients that pinned their backlog to this connection (KCM reserved/unreserved).
    reserved: int
    unreserved: int
    #: Streams that died with a write cut part-way.
    tx_aborts: int
    #: Bytes and messages queued for writing here now.
    queued_bytes: int
    queued_msgs: int
    #: id/fifo steering: requests written here and not yet answered.
    in_flight: int
    #: Requests accepted on the live connection (for max_requests_per_connection).
    requests: int
    need_more_hdr: int
    msg_too_big: int
    msg_timeouts: int
    bad_hdr_len: int
    #: TCP connections established by this slot after the first.
    reconnects: int
    dial_failures: int
    #: Connections of this slot closed by their server after answering, and
    #: replaced by this slot before a limit was reached (make-before-break).
    recycles: int
    retired: int
    #: Older connections of this slot still finishing their work.
    retiring: int
    last_error: str | None
    #: The kernel's TCP_INFO for the live connection (None when not connected).
    tcp: TcpInfo | None
    #: The live connection's TLS (None: plaintext, or not connected).
    tls: "TlsStatistics | None" = None


class Conn(Handler):
    """One TCP connection of a slot, registered in the event core."""

    __slots__ = (
        "group", "slot", "sock", "fd", "endpoint", "sm", "inbox", "flight", "mask", "connected_at",
        "tx_msgs", "tx_bytes", "rx_msgs", "rx_bytes", "tx_aborts", "requests", "budget", "answered",
        "listed", "paused", "suspended", "half_closed", "retire_deadline", "retire_reason", "recycling", "flight_total",
        "ended", "closed", "error", "tls",
    )

    def __init__(self, slot: "Slot", sock: socket.socket, endpoint: Endpoint, inbox: Inbox,
                 tls: "TlsTransport | None" = None) -> None:
        group = slot.group
        cfg = group.cfg
        self.group = group
        self.slot = slot
        self.sock = sock
        self.fd = sock.fileno()
        self.endpoint = endpoint
        self.sm = StateMachine(CONN_TRANSITIONS, ConnState.READY, f"group {cfg.name} conn {slot.index}")
        self.inbox = inbox
        self.flight = group.router.flight(self) if group.router is not None else None
        self.mask = _BASE_MASK
        self.connected_at = time.monotonic()
        self.tx_msgs = self.tx_bytes = self.rx_msgs = self.rx_bytes = 0
        self.tx_aborts = 0
        #: Requests (messages) accepted to be written here, and how many more
        #: may be before it recycles (None: no limit).
        self.requests = 0
        self.budget: int | None = cfg.max_requests_per_connection or None
        #: Requests written on this connection (its outbox may hold others'
        #: adopted ones, so this is not ``requests``).
        self.flight_total = 0
        #: It delivered an answer (or, in balance mode, carried traffic): a
        #: FIN from its server after that is a recycle, not a failure.
        self.answered = False
        self.listed = False  # in the reactor's flush list for this pass
        self.paused = False  # balance: no ready receiver, not reading
        self.suspended = False  # paused and hung up: out of the epoll until it can read
        self.half_closed = False  # the server sent its FIN
        self.retire_deadline: float | None = None
        self.retire_reason = ""
        self.recycling = False  # retired make-before-break (the slot dials at once)
        self.ended = False
        #: Set when the TCP connection is closed, however it ended.
        self.closed = trio.Event()
        self.error: str | None = None
        #: TLS stands in for the socket's send and recv_into (kmuxd.io.tls); None: plaintext.
        self.tls = tls

    def __repr__(self) -> str:
        return f"Conn({self.group.cfg.name}/{self.slot.index} {self.endpoint})"

    @property
    def state(self) -> ConnState:
        return self.sm.state

    @property
    def taking(self) -> bool:
        return self.sm.state in TAKING_STATES

    def start(self) -> None:
        group = self.group
        group.reactor.register(self.fd, self, self.mask)
        group.wake(group.sched.connected(self))
        group.after_adoption()
        group.retry_feeder.feed()  # retried requests wait for a fresh connection like this one

    # -- the reactor's view ------------------------------------------------------

    def handle(self, events: int) -> None:
        if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            if self.paused:
                self._hung_up_while_paused(events)
            else:
                self.read()
        if events & EPOLLOUT and not self.ended:
            self.flush()

    def crash(self, exc: BaseException) -> None:
        self.end("error", ConnectionLost(f"internal error on this connection: {exc!r}"))

    def _set_mask(self, mask: int) -> None:
        if mask != self.mask and not self.ended and not self.suspended:
            self.mask = mask
            self.group.reactor.modify(self.fd, mask)

    # -- writing -----------------------------------------------------------------------

    def flush_soon(self) -> None:
        """Bytes were committed to this connection's outbox: write them when the pass ends."""
        if not self.listed:
            self.listed = True
            self.group.reactor.flush_later(self)

    def flush(self) -> None:
        """Write as much of the outbox as the kernel takes, without waiting."""
        self.listed = False
        if self.ended:
            return
        group = self.group
        sched = group.sched
        outbox = sched.outbox_of(self)
        tls = self.tls
        send = self.sock.send if tls is None else tls.send
        flight = self.flight
        while outbox.head < outbox.tail:
            try:
                n = send(outbox.view[outbox.head : outbox.tail])
            except BlockingIOError:
                if self.sm.state is not ConnState.DRAINING:
                    self.sm.fire(ConnEvent.WRITE_BLOCKED)
                sched.blocked(self)
                self._set_mask(self.mask | EPOLLOUT)
                return
            except OSError as exc:
                self.end("error", exc)
                return
            self.tx_bytes += n
            wake = sched.written(self, n)
            self.tx_msgs += outbox.take_written_count()
            if flight is not None and outbox.written_requests:
                router = group.router
                assert router is not None  # a flight exists only in id/fifo steering
                written = outbox.take_written()
                self.flight_total += len(written)
                for req in written:
                    router.written(req, flight)
            if wake:
                group.wake(wake)
            outbox = sched.outbox_of(self)  # an adoption may have swapped it
        if tls is not None and tls.backlog:
            # TLS: the outbox is written (its plaintext), but the kernel refused
            # some of the ciphertext. Nothing in the outbox asks for EPOLLOUT any
            # more, so the backlog does, until it is out (kmuxd.io.tls, rule 1).
            try:
                pushed = tls.push()
            except OSError as exc:
                self.end("error", exc)
                return
            if not pushed:
                if self.sm.state is not ConnState.DRAINING:
                    self.sm.fire(ConnEvent.WRITE_BLOCKED)
                self._set_mask(self.mask | EPOLLOUT)
                return
        if self.sm.state is ConnState.BUSY:
            self.sm.fire(ConnEvent.WRITE_DONE)
        if self.mask & EPOLLOUT:
            self._set_mask(self.mask & ~EPOLLOUT)
        if group.flush_waited:
            group.note_flushed()
        if self.sm.state is ConnState.DRAINING:
            self.maybe_finish_retiring()

    def accepted(self, msgs: int) -> None:
        """``msgs`` requests were committed to this connection's outbox."""
        self.requests += msgs
        if self.budget is not None:
            self.budget -= msgs
            if self.budget <= 0 and self.taking:
                self.retire("max_requests_per_connection", recycle=True)

    # -- reading -------------------------------------------------------------------------

    def read(self) -> None:
        """One read into the inbox, then steer what it completed."""
        inbox = self.inbox
        tls = self.tls
        try:
            n = self.sock.recv_into(inbox.space()) if tls is None else tls.recv_into(inbox.space())
        except BlockingIOError:
            return
        except OSError as exc:
            self.end("error", exc)
            return
        if n == 0:
            self.peer_closed()
            return
        self.rx_bytes += n
        try:
            ready = inbox.received(n, time.monotonic())
        except KmuxError as exc:  # RemoteFrameTooBig / RemoteBadHeader
            self.end("error", exc, eject=f"bad framing: {exc.message}")
            return
        if ready:
            self.steer()
        if tls is not None:
            if tls.backlog:
                self.flush_soon()  # the read produced TLS output (a key update): send it
            if tls.buffered and not self.paused and not self.ended:
                # Plaintext waits inside the SSLObject, where epoll cannot see it:
                # read again next pass without a readiness event (kmuxd.io.tls, rule 2).
                self.group.reactor.serve_again(self)

    def steer(self) -> None:
        group = self.group
        if group.router is not None:
            group.steer_responses(self)
        elif not group.steer_balance(self):
            self.pause()

    def pause(self) -> None:
        """Balance: no receiver is ready. Stop reading; TCP pushes back on the server."""
        self.paused = True
        self.inbox.pause_clock()
        self.group.paused.append(self)
        self._set_mask(self.mask & ~(EPOLLIN | EPOLLRDHUP))

    def resume(self) -> None:
        """A receiver became ready: steer what waits, then read again."""
        if not self.paused or self.ended:
            return
        if not self.group.steer_balance(self):
            self.group.paused.append(self)
            return
        self.paused = False
        self.inbox.resume_clock(time.monotonic())
        if self.suspended:
            self.suspended = False
            self.group.reactor.register(self.fd, self, self.mask | EPOLLIN | EPOLLRDHUP)
            self.mask |= EPOLLIN | EPOLLRDHUP
        else:
            self._set_mask(self.mask | EPOLLIN | EPOLLRDHUP)
        if self.half_closed or (self.tls is not None and self.tls.buffered):
            self.read()  # no readiness event will come for what already arrived

    def _hung_up_while_paused(self, events: int) -> None:
        # Level-triggered epoll reports a hang-up for as long as it lasts,
        # whatever the mask: take the socket out of the epoll until a
        # receiver is ready, then read what the server sent before it went.
        if events & (EPOLLHUP | EPOLLERR):
            self.suspended = True
            self.group.reactor.unregister(self.fd)
        if events & EPOLLRDHUP and not self.half_closed:
            self.half_closed = True
            if self.taking:
                self.retire("the server closed its side", recycle=True)

    def peer_closed(self) -> None:
        """The server sent its FIN: everything it sent has been read."""
        self.half_closed = True
        self.end("fin")

    # -- retiring and ending -----------------------------------------------------------------

    def retire(self, reason: str, *, recycle: bool, deadline: float | None = None) -> None:
        """Take nothing new; finish what is here, then close (see the module docstring)."""
        if not self.taking:
            return
        group = self.group
        self.sm.fire(ConnEvent.RETIRE)
        self.retire_reason = reason
        self.recycling = recycle
        if deadline is None:
            cfg = group.cfg
            deadline = time.monotonic() + (cfg.request_timeout or group.daemon_cfg.shutdown_grace)
        self.retire_deadline = deadline
        group.wake(group.sched.retire(self))
        if recycle:
            group.recycles += 1
            self.slot.replace_now(self)
        self.maybe_finish_retiring()

    def unretire(self) -> None:
        """An operator's drain timed out: back in service."""
        if self.sm.state is ConnState.DRAINING and not self.ended:
            self.sm.fire(ConnEvent.RESUME)
            self.retire_deadline = None
            self.group.wake(self.group.sched.connected(self))

    def maybe_finish_retiring(self) -> None:
        """Close a retiring connection once its outbox is written and its requests answered."""
        if self.ended or self.sm.state is not ConnState.DRAINING:
            return
        outbox = self.group.sched.outbox_of(self)
        if outbox.pending or outbox.owners or outbox.open_owner is not None:
            return
        if self.tls is not None and self.tls.backlog:
            return  # its ciphertext is not all out yet: the flush that sends it calls again
        if self.flight is not None:
            if self.flight.count():
                return
            self.end("requested")
            return
        # Balance: nothing tells us when the service has answered everything.
        # Half-close and read until it closes its side (or the deadline).
        if not self.slot.drain_half_closed(self):
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                # ENOTCONN: the server reset it already; its read side reports
                # that and ends the connection (connection_failed names it).
                log = self.group.log
                (log.debug if exc.errno == errno.ENOTCONN else log.warning)(
                    "half_close_failed", conn=self.slot.index, errno=errno_name(exc))
            self.slot.half_closed_conns.add(self)

    def retire_expired(self, now: float) -> None:
        if self.retire_deadline is not None and now >= self.retire_deadline and not self.ended:
            self.end("requested")

    def end(self, how: str, exc: BaseException | None = None, *, eject: str | None = None) -> None:
        """The stream is done (``how``: "fin", "error" or "requested"): settle everything now."""
        if self.ended:
            return
        group = self.group
        sched = group.sched
        now = time.monotonic()
        requested = how == "requested"
        if exc is not None and not requested:
            self.error = describe(exc)
        # Answers the service sent before the stream broke are still owed. A FIN
        # among them means the server closed first and our later writes drew the
        # reset (EPIPE/ECONNRESET): for health that is the server's recycle.
        fin_first = False
        if group.router is not None and how == "error" and not self.paused:
            fin_first = self._take_arrived()
        self.ended = True
        was_draining = self.sm.state is ConnState.DRAINING
        self.sm.fire(ConnEvent.FAIL if how != "requested" else ConnEvent.CLOSE)
        outbox = sched.outbox_of(self)
        cut_before = outbox.pending
        salvage, wake = sched.failed(self, now)
        # Messages that were whole in the kernel before the end count as written here.
        self.tx_msgs += outbox.take_written_count()
        if self.flight is not None:
            router = group.router
            assert router is not None  # a flight exists only in id/fifo steering
            for req in outbox.take_written():
                router.written(req, self.flight)
        if salvage.cut_msgs:
            self.tx_aborts += 1
        group.tx_retries += salvage.resend_msgs
        unanswered = self.flight.count() > 0 if self.flight is not None else False
        if self.flight is not None:
            why = self.error or self.retire_reason or "closed"
            group.settle_lost(self.flight, f"connection {self.slot.index} to {self.endpoint} {_ended(how)}: {why}")
        if self.inbox.ends:
            group.dropped_rx_msgs += len(self.inbox.ends)  # balance: no receiver ever came
        spare = sched.remove(self)
        group.reactor.unregister(self.fd)
        try:
            self.sock.close()
        except OSError:
            pass  # the descriptor is released whatever close() says; the end is logged below
        self.closed.set()
        pool = group.endpoints
        if eject is not None:
            pool.closed(self.endpoint, now, answered=self.answered, graceful=False, requested=True)
            pool.eject(self.endpoint, now, eject)
            kind = "failure"
        else:
            kind = pool.closed(
                self.endpoint, now, answered=self.answered, unanswered=unanswered, age=now - self.connected_at,
                answers=self.rx_msgs,
                graceful=how == "fin" or fin_first, requested=requested or was_draining,
                reason=self.error or "",
            )
        log = group.log.bind(conn=self.slot.index, endpoint=str(self.endpoint))
        (log.info if kind != "failure" else log.warning)(
            "connection_closed" if kind != "failure" else "connection_failed",
            how=how, counted=kind, error=self.error, reason=self.retire_reason or None,
            error_code=getattr(exc, "code", "os_error") if exc is not None else None,
            resend_msgs=salvage.resend_msgs, queued_bytes=cut_before,
        )
        if wake:
            group.wake(wake)
        group.after_adoption()
        self.slot.conn_ended(self, kind, spare)

    def _take_arrived(self) -> bool:
        """Read and steer, without waiting, whatever already arrived on a failing stream.

        True if the server's FIN was among it (it closed before the stream failed).
        """
        inbox = self.inbox
        for _ in range(ARRIVED_READS_MAX):
            if inbox.ends:
                self.steer()
                if inbox.ends:
                    return False
            try:
                n = self.sock.recv_into(inbox.space()) if self.tls is None else self.tls.recv_into(inbox.space())
            except OSError:
                return False  # EAGAIN: all taken; else the stream's error, which end() logs
            if n == 0:
                self.half_closed = True
                return True
            self.rx_bytes += n
            try:
                inbox.received(n, time.monotonic())
            except KmuxError:
                return False
        if inbox.ends:
            self.steer()
        return False

    def assembly_expired(self, now: float) -> bool:
        """A partial message waited ``assembly_timeout`` for the remote: end with an ejection."""
        cfg = self.group.cfg
        if self.ended or not self.inbox.expired(now, cfg.assembly_timeout):
            return False
        exc = RemoteAssemblyTimeout(
            f"a partial message of {self.inbox.partial_bytes} bytes did not complete "
            f"within assembly_timeout={cfg.assembly_timeout}s"
        )
        self.slot.msg_timeouts += 1
        self.end("error", exc, eject="assembly timeout")
        return True

    # -- statistics ------------------------------------------------------------------------------

    def age(self, now: float) -> float:
        return now - self.connected_at

    def written_msgs(self) -> int:
        """Messages written here, including those a compaction counted since the last write."""
        return self.tx_msgs + self.group.sched.outbox_of(self).unclaimed


class Slot:
    """Connection slot ``index`` of a group: keeps one live TCP connection up."""

    def __init__(self, group: "Group", index: int, endpoint: Endpoint) -> None:
        self.group = group
        self.index = index
        self.endpoint = endpoint
        self.sm = StateMachine(SLOT_TRANSITIONS, SlotState.IDLE, f"group {group.cfg.name} slot {index}")
        self.live: Conn | None = None
        #: Older connections of this slot still finishing their work.
        self.retiring: set[Conn] = set()
        #: Retiring balance-mode connections we have half-closed.
        self.half_closed_conns: set[Conn] = set()
        self._wake = trio.Event()
        self._run_scope = trio.CancelScope()
        self._stopping = False
        self._spare_outbox: Outbox | None = None
        self._spare_inbox: Inbox | None = None
        self._dial_log = RateLimit(DIAL_LOG_INTERVAL)
        self._drain_waiting: Conn | None = None
        # counters (a slot's totals over all its connections)
        self.ended_tx_msgs = self.ended_tx_bytes = self.ended_rx_msgs = self.ended_rx_bytes = 0
        self.ended_tx_aborts = 0
        self.msg_timeouts = 0
        self.connections_made = 0
        self.dial_failures = 0
        self.recycles = 0
        self.retired = 0
        self.last_error: str | None = None

    @property
    def log(self) -> Any:
        return self.group.log.bind(conn=self.index, endpoint=str(self.endpoint))

    @property
    def connected(self) -> bool:
        return self.live is not None and self.live.state in OPEN_STATES

    @property
    def state_name(self) -> str:
        if self.live is not None and not self.live.ended:
            return self.live.state.value
        return self.sm.state.value

    def conns(self) -> list[Conn]:
        out = list(self.retiring)
        if self.live is not None:
            out.append(self.live)
        return out

    # -- the dial loop (a trio task) ----------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a live connection up until retired or cancelled.

        Reports started after the first dial, whether it connected or not.
        """
        group = self.group
        pool = group.endpoints
        started = False
        self.sm.fire(SlotEvent.DIAL)
        with trio.CancelScope() as self._run_scope:
            while not self._stopping:
                endpoint, wait = pool.choose(time.monotonic())
                if endpoint is None:
                    self.sm.fire(SlotEvent.NO_ENDPOINT)
                    if not started:
                        started = True
                        task_status.started()
                    await trio.sleep(wait)
                    self.sm.fire(SlotEvent.RETRY)
                    continue
                self.endpoint = endpoint
                try:
                    sock, tls = await establish(endpoint, group.cfg, group.tls, self.sm)
                except (OSError, ConnectFailed) as exc:
                    pool.dial_failed(endpoint, time.monotonic(), describe(exc))
                    self.dial_failures += 1
                    self.last_error = describe(exc)
                    self.sm.fire(SlotEvent.DIAL_FAILED)
                    if self._dial_log.allow():
                        self.log.warning("dial_failed", error=self.last_error,
                                         suppressed=self._dial_log.take_suppressed())
                    if not started:
                        started = True
                        task_status.started()
                    await trio.lowlevel.checkpoint()  # the pool decides whether to wait
                    self.sm.fire(SlotEvent.RETRY)
                    continue
                pool.connected(endpoint)
                conn = self._carry(sock, endpoint, tls)
                if not started:
                    started = True
                    task_status.started()
                await self._wake.wait()
                self._wake = trio.Event()
                if self.sm.state is SlotState.UP:
                    self.sm.fire(SlotEvent.LOST if conn.ended else SlotEvent.RECYCLE)
                if self.sm.state is SlotState.BACKOFF:
                    self.sm.fire(SlotEvent.RETRY)
                await trio.lowlevel.checkpoint()

    def _carry(self, sock: socket.socket, endpoint: Endpoint, tls: "TlsTransport | None") -> Conn:
        group = self.group
        cfg = group.cfg
        inbox = self._spare_inbox
        self._spare_inbox = None
        if inbox is None:
            inbox = Inbox(cfg.framing, cfg.max_message, cfg.read_buffer)
        else:
            inbox.reset()
        conn = Conn(self, sock, endpoint, inbox, tls)
        outbox = self._spare_outbox
        self._spare_outbox = None
        if outbox is None or outbox.pending or outbox.owners:
            outbox = Outbox(cfg.write_buffer, cfg.max_message + 1, cfg.framing._length_at)
        group.sched.add(conn, outbox)
        self.live = conn
        self.connections_made += 1
        self.sm.fire(SlotEvent.CONNECTED)
        if tls is None:
            self.log.info("connected", local=_sockname(sock))
        else:
            t = tls.statistics()
            self.log.info("connected", local=_sockname(sock), tls=t.version, cipher=t.cipher, resumed=t.resumed,
                          server=t.server_subject)
        conn.start()
        group.reactor.end_pass()
        return conn

    # -- what its connections tell it ------------------------------------------------------------

    def replace_now(self, conn: Conn) -> None:
        """``conn`` retired make-before-break: it finishes on its own; dial its replacement."""
        if conn is self.live:
            self.live = None
            self.retiring.add(conn)
            self.retired += 1
            self._wake.set()

    def conn_ended(self, conn: Conn, kind: str, spare: Outbox | None) -> None:
        self.ended_tx_msgs += conn.tx_msgs
        self.ended_tx_bytes += conn.tx_bytes
        self.ended_rx_msgs += conn.rx_msgs
        self.ended_rx_bytes += conn.rx_bytes
        self.ended_tx_aborts += conn.tx_aborts
        if conn.error:
            self.last_error = conn.error
        if kind == "recycle":
            self.recycles += 1
        if spare is not None and not spare.pending and not spare.owners:
            self._spare_outbox = spare
        if not conn.inbox.ends and self._spare_inbox is None:
            self._spare_inbox = conn.inbox
        self.retiring.discard(conn)
        self.half_closed_conns.discard(conn)
        if conn is self.live:
            self.live = None
            self._wake.set()

    def drain_half_closed(self, conn: Conn) -> bool:
        return conn in self.half_closed_conns

    # -- operator actions ------------------------------------------------------------------------

    def reconnect(self) -> bool:
        """Close the live connection and dial again at once. False if not connected."""
        live = self.live
        if live is not None and live.state is ConnState.DRAINING:
            raise DrainInProgress(f"conn {self.index} is draining; it is replaced when the drain ends")
        if live is None or live.ended:
            return False
        live.retire_reason = "reconnect requested by an operator"
        live.end("requested")
        self.group.reactor.end_pass()
        return True

    async def drain(self, timeout: float, *, retire: bool = False) -> tuple[int, int]:
        """Write everything queued here, taking nothing new, then replace (or retire) the connection.

        Returns (messages, bytes) written meanwhile. Raises DrainTimeout if
        the queue did not empty in time; the connection then stays in service.
        """
        live = self.live
        if live is not None and live.state is ConnState.DRAINING:
            raise DrainInProgress(f"conn {self.index} is already draining")
        if live is None or live.ended:
            if retire:
                self.stop()
            return 0, 0
        msgs0, bytes0 = live.tx_msgs, live.tx_bytes
        deadline = trio.current_time() + timeout
        # The drain keeps its own deadline: on time-out the connection stays in service.
        live.retire("drain", recycle=False, deadline=float("inf"))
        self.group.reactor.end_pass()
        with trio.move_on_at(deadline):
            await live.closed.wait()
        if not live.ended:
            outbox = self.group.sched.outbox_of(live)
            if outbox.pending or outbox.owners:
                live.unretire()
                self.group.reactor.end_pass()
                raise DrainTimeout(
                    f"conn {self.index} still had {outbox.pending} bytes queued after {timeout}s; it stays in service"
                )
            live.end("requested")  # written, but the service never closed its side
            self.group.reactor.end_pass()
        if retire:
            self.stop()
        self.log.info("drained", msgs=live.tx_msgs - msgs0, bytes=live.tx_bytes - bytes0, retire=retire)
        return live.tx_msgs - msgs0, live.tx_bytes - bytes0

    def stop(self) -> None:
        """Take no new connections (the group is stopping or shrinking)."""
        self._stopping = True
        self._run_scope.cancel()

    def close_all(self) -> None:
        """The group is gone: close every connection now (queues were flushed or given up)."""
        self.stop()
        for conn in self.conns():
            conn.end("requested")
        if self.sm.state is not SlotState.CLOSED:
            self.sm.fire(SlotEvent.CLOSE)

    # -- statistics ---------------------------------------------------------------------------------

    def statistics(self) -> ConnStatistics:
        group = self.group
        now = time.monotonic()
        live = self.live if self.live is not None and not self.live.ended else None
        conns = [c for c in self.conns() if not c.ended]
        tx_msgs = self.ended_tx_msgs + sum(c.written_msgs() for c in conns)
        tx_bytes = self.ended_tx_bytes + sum(c.tx_bytes for c in conns)
        rx_msgs = self.ended_rx_msgs + sum(c.rx_msgs for c in conns)
        rx_bytes = self.ended_rx_bytes + sum(c.rx_bytes for c in conns)
        queued_bytes = queued_msgs = reserved = unreserved = in_flight = 0
        need_more_hdr = msg_too_big = bad_hdr_len = 0
        for c in conns:
            ob = group.sched.outbox_of(c)
            o = ob.statistics()
            queued_bytes += o.queued_bytes
            queued_msgs += o.queued_msgs
            reserved += ob.reserved_count
            unreserved += ob.unreserved_count
            if c.flight is not None:
                in_flight += c.flight.count()
            d = c.inbox.decoder.statistics()
            need_more_hdr += d.need_more_hdr
            msg_too_big += d.msg_too_big
            bad_hdr_len += d.bad_hdr_len
        sock = live.sock if live is not None else None
        return ConnStatistics(
            index=self.index,
            state=self.state_name,
            endpoint=str(live.endpoint if live is not None else self.endpoint),
            local=_sockname(sock) if sock else None,
            remote=_peername(sock) if sock else None,
            age=live.age(now) if live is not None else 0.0,
            tx_msgs=tx_msgs,
            tx_bytes=tx_bytes,
            rx_msgs=rx_msgs,
            rx_bytes=rx_bytes,
            reserved=reserved,
            unreserved=unreserved,
            tx_aborts=self.ended_tx_aborts + sum(c.tx_aborts for c in conns),
            queued_bytes=queued_bytes,
            queued_msgs=queued_msgs,
            in_flight=in_flight,
            requests=live.requests if live is not None else 0,
            need_more_hdr=need_more_hdr,
            msg_too_big=msg_too_big,
            msg_timeouts=self.msg_timeouts,
            bad_hdr_len=bad_hdr_len,
            reconnects=max(0, self.connections_made - 1),
            dial_failures=self.dial_failures,
            recycles=self.recycles,
            retired=self.retired,
            retiring=len([c for c in self.retiring if not c.ended]),
            last_error=self.last_error,
            tcp=read_tcp_info(sock) if sock else None,
            tls=live.tls.statistics() if live is not None and live.tls is not None else None,
        )


def _ended(how: str) -> str:
    return {"fin": "was closed by its server", "error": "failed", "requested": "was closed"}.get(how, how)


def _fmt_addr(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _sockname(sock: socket.socket) -> str | None:
    try:
        return _fmt_addr(sock.getsockname())
    except OSError:
        return None  # closed meanwhile: statistics show no address


def _peername(sock: socket.socket) -> str | None:
    try:
        return _fmt_addr(sock.getpeername())
    except OSError:
        return None  # ENOTCONN once the server has reset it: statistics show no address
