"""One client's packets in: read straight into outboxes, checked, committed or refused.

Theory of operation
-------------------
A client's packets are read only when the group's scheduler has an outbox
for them (:meth:`TxScheduler.route <kmuxd.core.sendq.TxScheduler.route>`);
otherwise the client is not read at all (its session turns ``EPOLLIN``
off) and blocks in the kernel, which is the push-back. :meth:`Intake.pump`
routes and pulls until the client has nothing more, its outbox is full, or
its turn is over.

:meth:`Intake._pull` is the hot loop of the send path: one
``recvmsg_into`` per packet, straight into the outbox at ``tail - 1`` so
the kind byte overwrites the last byte before the message (saved and put
back, see :class:`~kmuxd.core.sendq.Outbox`); the header is checked in
place by the framing's one rule (:meth:`Framing.checker`), the request is
recorded by the router (``id``/``fifo``), and the run is committed
(:meth:`TxScheduler.commit <kmuxd.core.sendq.TxScheduler.commit>`). A
refused message costs its sender one notice naming its ``seq``. A client
reads for at most ``client_turn`` messages per pass, fewer while it has
shown it sends fewer (the adaptive batch); the level-triggered epoll
brings it back in the next pass, after the others (fairness).

Everything else is rare and handled for clarity: a message in pieces
(:mod:`kmuxd.io.assembly`), control and REQUEUE packets, packets that
carried descriptors, and what is refused unread (``queue_timeout``) or
dropped unread when the client leaves.

The intake owns the input side's state (``seq``, the open message, the
batch); its session owns the socket's interest and the client's lifecycle,
and is the sender (:class:`~kmuxd.core.sendq.Owner`) the cores see.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any, Callable, Final

from kmux.errors import AncillaryRefused, BadFrame, BadPacket, KmuxError, MessageTooBig
from kmux.protocol import (
    KIND_CONTROL,
    KIND_DATA,
    KIND_DATA_MORE,
    KIND_MORE,
    KIND_REQUEUE,
    KIND_REQUEUE_MORE,
    Notice,
    decode_control,
)

from kmuxd.core.states import CloseReason
from kmuxd.system.log import RateLimit

from .assembly import ANCILLARY_TEXT, EMPTY, EOF, FULL, TURN, Assembly
from .sockerr import discard_unread, errno_name

if TYPE_CHECKING:
    from .session import AppSession

__all__ = ["Intake", "QUEUE_REFUSALS_PER_TICK"]

# Plain ints (IntFlag & costs ~1 µs per packet), Final (a C static, not a dict lookup per use).
_MSG_TRUNC: Final = int(socket.MSG_TRUNC)
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)
_KIND_DATA: Final = KIND_DATA
_KIND_DATA_MORE: Final = KIND_DATA_MORE
# Why a pull stopped.
_EMPTY: Final = EMPTY  # shared with the assembly of messages in pieces
_FULL: Final = FULL
_TURN: Final = TURN
_EOF: Final = EOF
#: Seconds between "message_refused" log lines for one client (all are counted).
REFUSAL_LOG_INTERVAL = 10.0
#: Most unread packets read and dropped when a session closes.
DISCARD_LIMIT = 100_000
#: Most unread packets refused per client per tick when queue_timeout expires.
QUEUE_REFUSALS_PER_TICK = 10_000
#: balance: pulls in a row of one message each after which a client counts as
#: light (it sends a message at a time): while one is active, clients that
#: stream are paced (client_rate_contended). Two, because a flooder's very
#: first pull takes one message too (its read batch starts at 1).
LIGHT_PULLS = 2
#: Where a refused packet is read to (its length comes from MSG_TRUNC).
_SCRATCH = bytearray(1)


class Intake:
    """The packets in of one client (see the module docstring)."""

    def __init__(self, session: "AppSession") -> None:
        self.session = session
        self.group = session.group
        self.clock = session.clock
        self.counters = session.counters
        self.sock = session.sock
        self.log = session.log
        #: The seq of its last DATA packet read (the first is 1).
        self.seq = 0
        #: A message arriving in pieces (continuation), while one does.
        self.open: Assembly | None = None
        #: Since when it waits for a connection (queue_timeout), or None.
        self.blocked_since: float | None = None
        #: Packets read per pass (adaptive, 1..client_turn), the pass that used
        #: them all, and whether it was pushed back since (it had more, and was
        #: not read only because it had to wait its turn: it streams).
        self.read_batch = 1
        self.batch_pass = -2
        self.held_back = False
        #: balance: pulls in a row that took one message each (LIGHT_PULLS: it is light).
        self.light_pulls = 0
        self.requeue_parts: bytearray | None = None
        #: Why the last receive failed (an errno name), for the detach line.
        self.recv_error: str | None = None
        #: Messages refused (each with a notice), messages handed back (REQUEUE)
        #: and their bytes, packets dropped unread when it left.
        self.refused = 0
        self.requeued = 0
        self.requeue_bytes = 0
        self.dropped_unread = 0
        self._refusal_log = RateLimit(REFUSAL_LOG_INTERVAL)

    def pump(self, hung_up: bool) -> None:
        """Read what the scheduler lets us, as much as one turn allows."""
        session = self.session
        group = self.group
        sched = group.sched
        limit = group.daemon_cfg.client_notice_limit
        while True:
            if session.replies.notices >= limit:
                # Too many notices unread: the client must read before it may send.
                session.want_read(False)
                if hung_up:
                    session.close(CloseReason.HUNG_UP)
                return
            if self.open is not None:
                status = self.open.read()
            else:
                room = group.flight_room(session)
                if room == 0:
                    # client_max_in_flight (id/fifo), client_rate_contended
                    # (balance): its next messages wait in its own socket, not
                    # behind others' in the server's queues or for a CPU.
                    if group.router is None:
                        session.hold_for_pace()
                    else:
                        session.hold_for_answers()
                    if hung_up:
                        session.close(CloseReason.HUNG_UP_PUSHED_BACK)
                    return
                conn = sched.route(session)
                if conn is None:
                    self.held_back = True
                    if self.blocked_since is None:
                        self.blocked_since = self.clock()
                    session.want_read(False)
                    if hung_up:
                        session.close(CloseReason.HUNG_UP_PUSHED_BACK)
                    return
                self.blocked_since = None
                if group.router is None and len(group.clients) > 1:
                    seq = self.seq
                    status = self._pull(conn, room)
                    self._paced(self.seq - seq, room is not None)
                else:
                    status = self._pull(conn, room)
            if status == _EOF:
                if self.recv_error is not None:
                    session.close(CloseReason.RECEIVE_FAILED, self.recv_error)
                else:
                    session.close(CloseReason.CLOSED)
                return
            if status == _EMPTY:
                if not session.read_wanted:
                    session.want_read(True)
                if hung_up:
                    session.close(CloseReason.HUNG_UP)
                return
            if status == _TURN:
                return  # the level-triggered epoll brings us back after the others
            # _FULL: route again (parks on the full outbox, or moves on)
            if session.closed:
                return

    def _pull(self, conn: Any, room: int | None) -> int:
        """Receive packets into ``conn``'s outbox until empty, full or our turn is up
        (and no more than ``room``, the client's in-flight room: None, no limit).

        The hot loop of the send path: one ``recvmsg_into`` per packet,
        straight into the outbox, the header checked in place. The packet
        lands at ``tail - 1`` so its kind byte overwrites the last byte before
        the message, which is saved and put back (see :class:`~kmuxd.core.sendq.Outbox`).
        """
        session = self.session
        group = self.group
        cfg = group.cfg
        sched = group.sched
        # The outbox route() made room in. Nothing in this loop can hand it to
        # another connection (only a write or a failure adopts), and every
        # commit below names it, so the bytes go where they were received.
        outbox = sched.outbox_of(conn)
        buf, view = outbox.buf, outbox.view
        bufsize = len(buf)
        head, capacity, reserve = outbox.head, outbox.capacity, outbox.reserve
        tail = outbox.tail
        recvmsg_into = self.sock.recvmsg_into
        check = group.check_message
        # The framing's fixed length field, for the common case inline: a
        # header that agrees costs one unpack and a comparison here; anything
        # else goes to the framing's one rule (check), which also says why.
        fixed = group.fixed_field
        max_message = cfg.max_message
        # Read no more than the client has shown it sends per pass: a client
        # that sends one request and waits costs one recv, not a second one
        # that only says EAGAIN (level-triggered epoll brings it back). It
        # streams if it is still readable in the next pass, or if it was held
        # back meanwhile: a client that waits its turn behind others is never
        # read in consecutive passes, and must not be held to one message a turn.
        passes = group.reactor.passes
        batch = self.read_batch
        if (self.batch_pass == passes - 1 or self.held_back) and batch < cfg.client_turn:
            batch = self.read_batch = min(cfg.client_turn, batch * 2)  # still readable: it streams
        self.held_back = False
        turn = batch
        budget = conn.budget
        if budget is not None and budget < turn:
            turn = max(budget, 1)
        router = group.router
        now = self.clock()
        if router is not None:
            group.contention.sent(session.id, now)
        if room is not None and room < turn:
            turn = max(room, 1)
        taken = msgs = 0
        first_seq = self.seq + 1
        status = _TURN
        while taken + msgs < turn:
            if tail - head >= capacity or bufsize - tail < reserve:
                status = _FULL
                break
            saved = buf[tail - 1]
            try:
                # MSG_TRUNC: n is the packet's real length even if it did not fit.
                n, _, flags, _ = recvmsg_into((view[tail - 1 :],), 0, _MSG_TRUNC)
            except BlockingIOError:
                status = _EMPTY  # a failed receive wrote nothing: no byte to put back
                break
            except OSError as exc:
                status = self.recv_failed(exc)
                break
            kind = buf[tail - 1]
            buf[tail - 1] = saved
            if n == 0:
                status = _EOF
                break
            size = n - 1
            if kind == _KIND_DATA and not flags & _MSG_CTRUNC:
                self.seq += 1
                err: KmuxError | None
                if flags & _MSG_TRUNC or size > max_message:
                    err = MessageTooBig(f"message is {size} bytes, the group's max_message is {max_message}")
                elif (fixed is not None and size >= fixed[2]
                      and fixed[0](buf, tail + fixed[1])[0] + fixed[3] == size):
                    err = None
                else:
                    err = check(buf, tail, size)
                if err is None and router is not None:
                    try:
                        outbox.add_request(router.accept(session, self.seq, now, buf, tail, size))
                    except KmuxError as exc:  # id_in_use, ids_exhausted, too short for its id
                        err = exc
                if err is None:
                    tail += size
                    msgs += 1
                    continue
                # A refused message ends the run: runs name their seqs without gaps.
                taken += sched.commit(session, outbox, tail, msgs, first_seq)
                msgs = 0
                first_seq = self.seq + 1
                self.refuse(err)
                continue
            # Anything else is rare: commit what we have, then deal with it clearly.
            taken += sched.commit(session, outbox, tail, msgs, first_seq)
            msgs = 0
            if flags & _MSG_CTRUNC:
                self._refuse_ancillary(kind, now)
                if self.open is not None:
                    return self.open.read()  # the rest of that message goes with it
            elif kind == _KIND_DATA_MORE:
                self.seq += 1
                self.open = asm = Assembly.begin(self, outbox, tail, size, bool(flags & _MSG_TRUNC), now)
                first_seq = self.seq + 1
                return asm.read() if self.open is not None and not session.gone else _TURN
            else:
                self._packet(kind, bytes(view[tail : tail + size]), bool(flags & _MSG_TRUNC))
            first_seq = self.seq + 1
        taken += sched.commit(session, outbox, tail, msgs, first_seq)
        if status == _TURN:
            self.batch_pass = passes
        elif status == _EMPTY and batch > 1:
            self.read_batch = max(1, batch // 2)
        return status

    def _paced(self, took: int, contended: bool) -> None:
        """balance, with other clients attached: a pull took ``took`` messages.

        A client that streams (its read batch grew: it was readable in
        consecutive passes) pays a token per message while contended. A client
        whose pulls took one message each, LIGHT_PULLS in a row, is *light*
        (it sends a message at a time and waits): it is what contention
        protects (:mod:`kmuxd.core.pacing`), and it is never paced. A flooder's
        first pull also takes one message, hence the run."""
        if self.read_batch > 1:
            self.light_pulls = 0
            if contended:
                self.session.pace.spend(took)
        elif took == 1:
            self.light_pulls += 1
            if self.light_pulls >= LIGHT_PULLS:
                self.group.contention.sent(self.session.id, self.clock())

    def _refuse_ancillary(self, kind: int, now: float) -> None:
        """A packet carried descriptors or credentials (the kernel closed them:
        we pass no control buffer). A DATA packet is a message refused by its
        seq; a first piece opens that message refused, so its other pieces are
        dropped with it rather than read as messages of their own."""
        err = AncillaryRefused(ANCILLARY_TEXT)
        if kind & ~KIND_MORE != KIND_DATA:
            self.refuse(err, seq=False)
            return
        self.seq += 1
        if kind & KIND_MORE:
            self.open = Assembly.refused_unread(self, err)
        self.refuse(err)


    # -- other packets ---------------------------------------------------------------

    def _packet(self, kind: int, body: bytes, truncated: bool) -> None:
        """A non-DATA packet: rare, so clarity over speed."""
        session = self.session
        try:
            if truncated:
                raise BadPacket("packet truncated: larger than max_message + 1")
            if kind == KIND_CONTROL:
                control = decode_control(body)
                if control.op == "receive":
                    session.set_receiving(control.args["on"])
            elif kind in (KIND_REQUEUE, KIND_REQUEUE_MORE):
                self._requeue_piece(body, more=kind == KIND_REQUEUE_MORE)
            else:
                raise BadPacket(f"unknown packet kind 0x{kind:02x}")
        except KmuxError as exc:
            self.refuse(exc, seq=False)

    def _requeue_piece(self, body: bytes, more: bool) -> None:
        parts = self.requeue_parts
        if parts is None and not more:
            self._requeue(body)
            return
        if parts is None:
            parts = self.requeue_parts = bytearray()
        if len(parts) + len(body) > self.group.cfg.max_message:
            self.requeue_parts = None
            raise BadPacket("requeued message is over max_message")
        parts += body
        if not more:
            self.requeue_parts = None
            self._requeue(bytes(parts))

    def _requeue(self, message: bytes) -> None:
        """It hands back a message it got before switching receiving off (balance only)."""
        session = self.session
        group = self.group
        if group.request_mode:
            raise BadPacket(
                f"REQUEUE is only for balance steering; with steering = {group.cfg.steering!r} "
                "every response belongs to the client that asked"
            )
        if session.receiving:
            raise BadPacket("REQUEUE is only allowed while receiving is off")
        if self.requeued + 1 > session.replies.rx_msgs or self.requeue_bytes + len(message) > session.replies.rx_bytes:
            raise BadPacket("REQUEUE of more messages than were delivered to this client")
        if group.check_message(message, 0, len(message)) is not None:
            raise BadFrame("requeued message is not one well-framed message")
        self.requeued += 1
        self.requeue_bytes += len(message)
        self.counters.requeued += 1
        group.requeue(message)

    def next_seq(self) -> int:
        """A DATA packet was read: its seq."""
        self.seq += 1
        return self.seq

    def ended_open(self, asm: Assembly) -> None:
        """``asm``, its message in pieces, is whole or refused: the next packet starts a message."""
        if self.open is asm:
            self.open = None

    def recv_failed(self, exc: OSError) -> int:
        """A receive failed (not EAGAIN): the session ends, and its detach line says why."""
        self.recv_error = errno_name(exc)
        return _EOF

    def refuse(self, err: KmuxError, seq: bool = True, seq_value: int | None = None) -> None:
        session = self.session
        self.refused += 1
        self.counters.refused += 1
        if seq:
            err.details["seq"] = self.seq if seq_value is None else seq_value
        # The client always gets its notice; the log gets the first refusal
        # and then one line per interval, so a buggy app cannot flood it.
        if self._refusal_log.allow(self.clock()):
            self.log.info(
                "message_refused", error_code=err.code, error=err.message, seq=err.details.get("seq"),
                suppressed=self._refusal_log.take_suppressed(),
            )
        session.notify(Notice.for_error(err))

    def refuse_unread(self, err_factory: Callable[[], KmuxError], limit: int) -> int:
        """Read and refuse (each with its seq) what waits in the socket: queue_timeout."""
        session = self.session
        refused = 0
        while refused < limit:
            try:
                n, _, flags, _ = self.sock.recvmsg_into((_SCRATCH,), 0, _MSG_TRUNC)
            except BlockingIOError:
                break  # nothing more waits
            except OSError as exc:
                # The socket failed: the reactor reports it (EPOLLERR/EPOLLHUP) and the pump ends the session.
                session.socket_error("receive", exc)
                break
            if n == 0:
                break
            kind = _SCRATCH[0]
            if kind & ~KIND_MORE == KIND_DATA:
                if self.open is None:
                    self.seq += 1
                    if kind == KIND_DATA_MORE:
                        self.open = Assembly.refused_unread(self, err_factory())
                    self.refuse(err_factory())
                    refused += 1
                elif not kind & KIND_MORE:
                    self.open = None
            elif self.open is None:
                # Not a message: nothing to refuse by seq; it is simply not read late.
                self.refuse(BadPacket("a control packet waited for the group too; dropped"), seq=False)
        return refused

    def expire_queued(self, now: float, timeout: float, refusal: Callable[[], KmuxError]) -> int:
        """It waited ``timeout`` for a connection: refuse (by seq) what waits unread. Returns how many."""
        session = self.session
        since = self.blocked_since
        if since is None or now - since < timeout or not session.reading:
            return 0
        self.blocked_since = now
        return self.refuse_unread(refusal, QUEUE_REFUSALS_PER_TICK)

    def discard_unread(self, limit: int = DISCARD_LIMIT) -> int:
        """Drop packets the client sent that were never read, before closing (:func:`.sockerr.discard_unread`)."""
        return discard_unread(self.sock, limit)

    def close(self) -> int:
        """Its session ends: the message it was sending in pieces and the packets it
        sent that were never read are dropped and counted. Returns how many."""
        if self.open is not None:
            if self.open.outbox is not None:
                self.dropped_unread += 1
            self.open.release()
            self.open = None
        self.dropped_unread += self.discard_unread()
        self.counters.dropped_unread += self.dropped_unread
        return self.dropped_unread
