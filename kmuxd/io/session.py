"""One attached app: its packets in, its responses and notices out.

Theory of operation
-------------------
An :class:`AppSession` is registered in the event core from its hello to
its end. Nothing about it runs in a trio task of its own. To its group it
is a :class:`~kmuxd.io.members.Client`: a sender to the scheduler
(:class:`~kmuxd.core.sendq.Owner`) and a receiver to steering
(:class:`~kmuxd.core.steering.Receiver`).

**In** (:mod:`kmuxd.io.intake`): a client's packets are read only when the
group's scheduler has an outbox for them, straight into it, one
``recvmsg_into`` each; each is committed or refused with a notice naming its
``seq``. While the scheduler has no room for it the session turns its
``EPOLLIN`` interest off and the app blocks in the kernel: the push-back.

**Out** (:mod:`kmuxd.io.replies`): responses are sent from the connection's
receive buffer with one ``send`` each; what the client's socket does not
take waits in its own bounded queue, with its notices. A client that leaves
more than ``client_rx_limit`` unread is detached as a slow consumer (or its
responses dropped, ``rx_overflow``); past ``client_notice_limit`` queued
notices it is not read.

**Ends**: a hang-up is noticed whatever the session is doing, reading or
pushed back (``EPOLLHUP``/``EPOLLRDHUP`` are always in the interest set).
What the client had sent and the daemon had accepted is still written;
what it had not accepted is read, dropped and counted
(:meth:`AppSession.close`). A bad packet costs its sender one notice,
never the session or other clients.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Callable, Protocol

from kmux.errors import IdleTimeout, KmuxError, PermissionDenied, SlowConsumer
from kmux.protocol import Notice

from kmuxd.core.access import AccessPolicy
from kmuxd.core.pacing import Pace
from kmuxd.core.states import CLIENT_TRANSITIONS, ClientEvent, ClientState, CloseReason, StateMachine

from .intake import Intake
from .peercred import PeerCred
from .reactor import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP
from .replies import SEND_FAILED, STILL_FULL, Replies
from .sockerr import SocketErrors, errno_name
from .statistics import ClientStatistics

if TYPE_CHECKING:
    from kmuxd.system.log import LineBudget

    from .group import Group

__all__ = ["AppSession", "ClientStatistics", "Registry"]


class Registry(Protocol):
    """Where sessions are registered (the daemon's :class:`~kmuxd.io.server.Server`)."""

    #: The budget shared by every client_attached and client_detached line.
    client_lines: "LineBudget"

    def session_closed(self, session: "AppSession") -> None: ...


class AppSession:
    """An attached client (see the module docstring)."""

    def __init__(self, group: "Group", sock: socket.socket, client_id: int, cred: PeerCred, name: str,
                 max_packet: int, server: Registry) -> None:
        self.group = group
        self.clock = group.clock
        #: The group's record of totals: what this client does is counted there too.
        self.counters = group.counters
        self.sock = sock
        self.fd = sock.fileno()
        self.id = client_id
        self.cred = cred
        self.name = name
        self.server = server
        self.max_packet = max_packet
        self.log = group.log.bind(client=client_id, client_pid=cred.pid)
        self.sm = StateMachine(CLIENT_TRANSITIONS, ClientState.HANDSHAKING, f"client {client_id}")
        self.mask = EPOLLIN | EPOLLRDHUP
        self.reading = True  # False once the daemon stopped reading it (shutdown)
        self.read_wanted = True  # False while pushed back
        #: Held back at client_max_in_flight: read again once one is answered or told.
        self.awaiting_answers = False
        #: Times it was held so (client_max_in_flight), and since when, the last time
        #: (it or the pace below: a group steers one way, so only one applies).
        self.holds = 0
        self.held_since = 0.0
        #: balance: its token bucket (client_rate_contended); while it is held for
        #: want of tokens it is in its group's ``pacer.held`` (kmuxd.io.pacer).
        self.pace = Pace(group.cfg.client_burst_contended, self.clock())
        self.since = self.clock()
        self.closing_deadline: float | None = None  # slow consumer: close once its notice is out
        #: DATA messages (and their bytes) committed to an outbox, and written to TCP.
        self.accepted_msgs = self.accepted_bytes = 0
        self.tx_msgs = self.tx_bytes = 0
        #: Set when the session is detached: responses still coming for it are dropped.
        self.gone = False
        #: client_idle_timeout: what it had done when last looked at, and since when.
        self.idle_mark: tuple = ()
        self.idle_since = 0.0
        #: Failed sends and receives on its socket (counted; logged rate-limited).
        self.socket_errors = SocketErrors(self.log, "client_socket_error")
        #: Its packets in, and its packets out.
        self.intake = Intake(self)
        self.replies = Replies(self, sock, max_packet)

    def __repr__(self) -> str:
        return f"AppSession({self.id} pid={self.cred.pid} group={self.group.cfg.name})"

    # -- Owner protocol (called by the send core) ----------------------------

    def count_accepted(self, msgs: int, nbytes: int) -> None:
        self.accepted_msgs += msgs
        self.accepted_bytes += nbytes

    def count_written(self, msgs: int, nbytes: int) -> None:
        self.tx_msgs += msgs
        self.tx_bytes += nbytes

    def count_given_back(self, msgs: int) -> None:
        self.accepted_msgs -= msgs  # no longer queued: refused by seq (queue_timeout)

    def hold_for_answers(self) -> None:
        """It has client_max_in_flight requests unanswered: read it no more until one is answered or told."""
        if not self.awaiting_answers:
            self.awaiting_answers = True
            self.holds += 1
            self.group.holds += 1
            self.held_since = self.clock()
        self.want_read(False)

    def hold_for_pace(self) -> None:
        """balance: out of tokens (client_rate_contended): read it no more until its bucket has refilled."""
        pacer = self.group.pacer
        if self not in pacer.held:
            self.held_since = self.clock()
            pacer.hold(self)
        self.want_read(False)

    def unpace(self) -> None:
        """Its bucket has refilled (its group released it): read it in this pass."""
        self.wake()

    def outcome_sent(self) -> None:
        """A response or a notice went (or was queued) to it: if it was held at
        client_max_in_flight and has room again, read it in this pass."""
        if self.awaiting_answers and self.group.flight_room(self) != 0:
            self.awaiting_answers = False
            self.wake()

    def wake(self) -> None:
        """The scheduler has room for this client again: read it in this pass."""
        if self.gone or not self.reading:
            return
        self.group.reactor.call_soon(self._resume)

    # -- lifecycle ------------------------------------------------------------

    @property
    def receiving(self) -> bool:
        return self.sm.state is ClientState.RECEIVING

    @property
    def closed(self) -> bool:
        """Its socket is closed (the session ended)."""
        return self.sm.state is ClientState.CLOSED

    def start(self, receive: bool) -> None:
        self.sm.fire(ClientEvent.ACCEPT_RECEIVING if receive else ClientEvent.ACCEPT_NOT_RECEIVING)
        self.group.reactor.replace(self.fd, self)
        self.group.reactor.modify(self.fd, self.mask)

    def handle(self, events: int) -> None:
        if events & EPOLLOUT:
            self.flush_out()
            if self.closed:
                return
        if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            hung_up = bool(events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
            if self.reading and (self.read_wanted or hung_up):
                self.intake.pump(hung_up)
            elif hung_up:
                self.close(CloseReason.HUNG_UP)

    def crash(self, exc: BaseException) -> None:
        self.close(CloseReason.INTERNAL_ERROR, repr(exc))

    def _set_mask(self, mask: int) -> None:
        if mask != self.mask and not self.closed:
            self.mask = mask
            self.group.reactor.modify(self.fd, mask)

    def want_read(self, on: bool) -> None:
        """Read the client (``EPOLLIN``) or not (pushed back, or stopped)."""
        self.read_wanted = on
        mask = (self.mask | EPOLLIN) if on and self.reading else (self.mask & ~EPOLLIN)
        self._set_mask(mask)

    def _resume(self) -> None:
        if self.gone or not self.reading:
            return
        self.want_read(True)
        self.intake.pump(False)

    def stop_reading(self, notice: Notice) -> None:
        """Read nothing more from this client, then tell it so (the notice names the last seq read)."""
        self.reading = False
        self.want_read(False)
        self.group.sched.forget(self)
        if self.intake.open is not None:
            self.intake.open.abort(None)
        self.notify(notice)

    # -- packets in (read by its Intake) ----------------------------------------------

    @property
    def seq(self) -> int:
        """The seq of its last DATA packet read."""
        return self.intake.seq

    def expire_queued(self, now: float, timeout: float, refusal: Callable[[], KmuxError]) -> int:
        return self.intake.expire_queued(now, timeout, refusal)

    def socket_error(self, op: str, exc: OSError) -> None:
        """A send or receive on its socket failed (not EAGAIN): counted, logged rate-limited."""
        self.socket_errors.note(op, exc, self.sock)

    def set_receiving(self, on: bool) -> None:
        group = self.group
        ring = group.receivers
        if on:
            self.sm.fire(ClientEvent.RECEIVE_ON)
            if not self.replies and ring.receive_on(self):
                group.receiver_ready()
            elif self.replies:
                ring.receive_on(self)
                ring.blocked(self)
        else:
            self.sm.fire(ClientEvent.RECEIVE_OFF)
            ring.receive_off(self)
            self.notify(Notice(event="receive_off"))

    # -- time (the group's housekeeping) ---------------------------------------------

    def apply_deadlines(self, now: float) -> None:
        """Its message in pieces (assembly_timeout), client_idle_timeout, a slow consumer's grace."""
        if self.gone:
            # Detached (a slow consumer): closed once its last notice is out, or its grace is over.
            if self.closing_deadline is not None and now >= self.closing_deadline:
                self.close(CloseReason.SLOW_CONSUMER)
            return
        if self.intake.open is not None:
            self.intake.open.expire(now)
        idle = self.group.cfg.client_idle_timeout
        if not idle:
            return
        mark = (self.intake.seq, self.replies.rx_msgs, self.replies.notices_sent, len(self.replies.queue))
        if self.idle_mark != mark:
            self.idle_mark = mark
            self.idle_since = now
            return
        if now - self.idle_since >= idle:
            self.log.info("client_idle", idle_seconds=round(now - self.idle_since, 3))
            self.stop_reading(Notice.for_error(IdleTimeout(
                f"sent and received nothing for client_idle_timeout={idle}s; detached"
            )))
            self.close(CloseReason.IDLE)

    def abort_open(self, err: KmuxError) -> None:
        """Its message in pieces will never complete (its orphaned outbox expired): refuse it."""
        if self.intake.open is not None:
            self.intake.open.abort(err)

    def check_access(self, access: AccessPolicy, group: str) -> None:
        """A reload changed the group's access policy: detach it if it is no longer admitted."""
        if access.groups is not None:
            # The hello reads supplementary groups only when the policy of
            # the day needs them: read them now, or a client the new
            # allow_groups admits only through one would be detached.
            self.cred = self.cred.with_groups(self.sock)
        cred = self.cred
        if access.admits(cred.uid, cred.gid, cred.groups):
            return
        self.log.info("client_no_longer_admitted", uid=cred.uid, pid=cred.pid)
        self.stop_reading(Notice.for_error(PermissionDenied(f"group {group!r} no longer admits this client (reload)")))
        self.close(CloseReason.ACCESS_REVOKED)

    # -- packets out (kmuxd.core.steering.Receiver; sent by its Replies) ---------------

    def notify(self, notice: Notice) -> None:
        """Send a notice, or queue it; it goes out before any further data to this client."""
        if not self.closed:
            self.replies.notify(notice)

    def deliver(self, buf: bytearray, view: memoryview, pos: int, end: int, seq: int) -> bool:
        return self.replies.deliver(buf, view, pos, end, seq)

    def offer(self, buf: bytearray, view: memoryview, pos: int, end: int, keep: bool = False) -> int:
        return self.replies.offer(buf, view, pos, end, keep)

    def queued_response_bytes(self) -> int:
        return self.replies.data_bytes

    def blocked_out(self) -> None:
        """Its socket is full: no more messages for it until it is writable again."""
        self.group.receivers.blocked(self)
        self._set_mask(self.mask | EPOLLOUT)

    def slow_consumer(self) -> None:
        """Detach a client that left more than client_rx_limit bytes unread."""
        if self.closing_deadline is not None or self.closed:
            return
        group = self.group
        self.counters.slow_consumers += 1
        limit = group.cfg.client_rx_limit
        self.log.warning("slow_consumer", queued_bytes=self.replies.data_bytes, client_rx_limit=limit)
        # Its queued responses are dropped; the notice is the last thing it gets.
        self.replies.clear()
        self.stop_reading(Notice.for_error(SlowConsumer(
            f"more than client_rx_limit={limit} bytes of responses waited unread; detached"
        )))
        self.gone = True  # from now on its responses are dropped; its last notice still goes out
        group.detach_slow(self)
        self.closing_deadline = self.clock() + group.cfg.slow_consumer_grace
        if not self.replies:
            self.close(CloseReason.SLOW_CONSUMER)

    def flush_out(self) -> None:
        """Its socket is writable: send what waits, then take messages again."""
        done = self.replies.flush()
        if done == STILL_FULL:
            return
        if done == SEND_FAILED:
            error = self.replies.error
            self.close(CloseReason.SEND_FAILED, errno_name(error) if error is not None else None)
            return  # the detach line is the log line
        self._set_mask(self.mask & ~EPOLLOUT)
        if self.closing_deadline is not None:
            self.close(CloseReason.SLOW_CONSUMER)
            return
        group = self.group
        # In id/fifo modes a paused connection never waits for a client; in
        # balance mode this one may take messages again.
        if group.receivers.unblocked(self):
            group.receiver_ready()
        if self.reading and not self.read_wanted and self.replies.notices < group.daemon_cfg.client_notice_limit:
            self.wake()

    # -- the end ------------------------------------------------------------------------

    def close(self, reason: CloseReason, detail: str | None = None) -> None:
        """End the session: detach, drop (and count) what it sent that was never read, close.

        ``detail`` (an errno name, an exception) follows the reason in the detach line.
        """
        if self.closed:
            return
        self.sm.fire(ClientEvent.CLOSE)  # first: nothing below may start a second close
        self.gone = True
        group = self.group
        group.forget_slow(self)
        dropped = self.intake.close()  # the message it was sending in pieces, packets never read
        group.detach(self)
        if self.replies.data_msgs and group.router is not None:
            group.router.undelivered(self.replies.data_msgs)  # responses it never read
        group.reactor.unregister(self.fd)
        try:
            self.sock.close()
        except OSError:
            pass  # the descriptor is released whatever close() says; nothing is lost that was not counted
        self.server.session_closed(self)
        lines = self.server.client_lines
        if lines.allow(self.clock()):
            text = reason.value if detail is None else f"{reason.value}: {detail}"
            self.log.info("client_detached", reason=text, tx_msgs=self.tx_msgs, rx_msgs=self.replies.rx_msgs,
                          dropped_unread=dropped or None, socket_errors=self.socket_errors.count or None,
                          suppressed=lines.take_suppressed())

    # -- statistics ---------------------------------------------------------------

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            id=self.id,
            name=self.name,
            group=self.group.cfg.name,
            pid=self.cred.pid,
            uid=self.cred.uid,
            gid=self.cred.gid,
            comm=self.cred.comm,
            state=self.sm.state.value,
            receiving=self.receiving,
            tx_msgs=self.tx_msgs,
            tx_bytes=self.tx_bytes,
            queued_msgs=self.accepted_msgs - self.tx_msgs,
            queued_bytes=self.accepted_bytes - self.tx_bytes,
            rx_msgs=self.replies.rx_msgs,
            rx_bytes=self.replies.rx_bytes,
            rx_queued_msgs=self.replies.data_msgs,
            rx_queued_bytes=self.replies.data_bytes,
            refused=self.intake.refused,
            requeued=self.intake.requeued,
            notices_sent=self.replies.notices_sent,
            notices_pending=self.replies.notices,
            connected_for=self.clock() - self.since,
            in_flight=self.group.router.owed_by(self) if self.group.router is not None else 0,
            holds=self.holds,
            held_for=self.clock() - self.held_since if self.awaiting_answers else None,
            paces=self.pace.holds,
            paced_for=self.clock() - self.held_since if self in self.group.pacer.held else None,
        )
