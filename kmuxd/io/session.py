"""One attached app: its packets in, its responses and notices out.

Theory of operation
-------------------
An :class:`AppSession` is registered in the event core from its hello to
its end. Nothing about it runs in a trio task of its own.

**In** (:meth:`AppSession.pump`): a client's packets are read only when the
group's scheduler has an outbox for them (:meth:`TxScheduler.route`);
otherwise the client is not read at all (its ``EPOLLIN`` interest is off)
and blocks in the kernel, which is the push-back. Each packet is received
with one ``recvmsg_into`` straight into that outbox, checked in place by the
framing's one rule (:meth:`Framing.checker`) and either committed (it will
be written) or refused with a notice naming its ``seq``. A client reads for
at most ``client_turn`` messages per pass; the level-triggered epoll brings
it back in the next pass, after the others (fairness). A message in pieces
(continuation) is assembled in place in its outbox, which is its sender's
alone until the last piece (:mod:`kmuxd.core.sendq`, rule 6).

**Out**: responses are sent from the connection's receive buffer with one
``send`` each. What the client's socket does not take waits in the client's
own queue (``txq``), bounded by ``client_rx_limit``, so a client that stops
reading holds back nobody else's responses; past the limit ``rx_overflow``
decides (disconnect as ``slow_consumer``, or drop with ``response_dropped``).
Notices share the queue (order matters: a ``receive_off`` marker never
falls behind data); past ``client_notice_limit`` queued notices the client's
packets are not read.

**Ends**: a hang-up is noticed whatever the session is doing, reading or
pushed back (``EPOLLHUP``/``EPOLLRDHUP`` are always in the interest set).
What the client had sent and the daemon had accepted is still written;
what it had not accepted is read, dropped and counted
(:meth:`AppSession.close`). A bad packet costs its sender one notice,
never the session or other clients.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kmux.errors import (
    AncillaryRefused,
    BadPacket,
    KmuxError,
    MessageTooBig,
    ResponseDropped,
    SlowConsumer,
)
from kmux.protocol import (
    DATA_MORE_PREFIX,
    DATA_PREFIX,
    KIND_CONTROL,
    KIND_DATA,
    KIND_DATA_MORE,
    KIND_MORE,
    KIND_REQUEUE,
    KIND_REQUEUE_MORE,
    Notice,
    decode_control,
    encode_notice,
)

from kmuxd.core.states import CLIENT_TRANSITIONS, ClientEvent, ClientState, StateMachine
from kmuxd.system.log import RateLimit

from .assembly import ANCILLARY_TEXT, EMPTY, EOF, FULL, TURN, Assembly
from .peercred import PeerCred
from .reactor import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, Handler
from .sockerr import SocketErrors, discard_unread, errno_name

if TYPE_CHECKING:
    from kmuxd.core.sendq import Outbox

    from .group import Group

__all__ = ["AppSession", "ClientStatistics"]

_MSG_TRUNC = int(socket.MSG_TRUNC)  # plain ints: IntFlag & costs ~1 µs per packet
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
# Why a pull stopped.
_EMPTY, _FULL, _TURN, _EOF = EMPTY, FULL, TURN, EOF  # shared with the assembly of messages in pieces
#: Seconds between "message_refused" log lines for one client (all are counted).
REFUSAL_LOG_INTERVAL = 10.0
#: Most unread packets read and dropped when a session closes.
DISCARD_LIMIT = 100_000
#: Marks a notice in a client's queue.
_NOTICE = -1
#: Where a discarded piece of a too-big continued message is read to (its
#: length comes from MSG_TRUNC; its bytes are dropped).
_SCRATCH = bytearray(1)


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    id: int
    name: str
    group: str
    pid: int
    uid: int
    gid: int
    comm: str
    state: str
    receiving: bool
    #: Messages/bytes from this client written to TCP.
    tx_msgs: int
    tx_bytes: int
    #: Messages/bytes accepted from this client and not yet written.
    queued_msgs: int
    queued_bytes: int
    #: Messages/bytes steered to this client.
    rx_msgs: int
    rx_bytes: int
    #: Responses (and their bytes) waiting in the daemon for this client to read.
    rx_queued_msgs: int
    rx_queued_bytes: int
    #: Messages refused (bad_frame, message_too_big, ...) and bad packets.
    refused: int
    #: Messages this client handed back after switching receiving off.
    requeued: int
    notices_sent: int
    notices_pending: int
    #: Seconds since the client attached.
    connected_for: float


class AppSession(Handler):
    """An attached client. Also the ``Owner`` of its runs in outboxes."""

    def __init__(self, group: "Group", sock: socket.socket, client_id: int, cred: PeerCred, name: str,
                 max_packet: int, server: Any) -> None:
        self.group = group
        self.sock = sock
        self.fd = sock.fileno()
        self.id = client_id
        self.cred = cred
        self.name = name
        self.server = server
        self.max_packet = max_packet
        self.log = group.log.bind(client=client_id, client_pid=cred.pid)
        self.sm = StateMachine(CLIENT_TRANSITIONS, ClientState.HANDSHAKING, f"client {client_id}")
        self.seq = 0
        #: Packets waiting for the client's socket, in order, each with what it
        #: completes: a response's size (its last piece), 0 (an earlier
        #: piece) or _NOTICE.
        self.txq: deque[tuple[bytes, int]] = deque()
        self.txq_data_bytes = 0  # responses only (client_rx_limit)
        self.txq_data_msgs = 0
        self.notices_queued = 0
        self.mask = EPOLLIN | EPOLLRDHUP
        self.reading = True  # False once the daemon stopped reading it (shutdown)
        self.read_wanted = True  # False while pushed back
        self.blocked_since: float | None = None  # waiting for a connection (queue_timeout)
        self.since = time.monotonic()
        #: A message arriving in pieces (continuation), while one does.
        self.open: Assembly | None = None
        #: Packets read per pass (adaptive, 1..client_turn) and the pass that used them all.
        self.read_batch = 1
        self.batch_pass = -2
        self.requeue_parts: bytearray | None = None
        self.closing_deadline: float | None = None  # slow consumer: close once its notice is out
        self.accepted = 0  # DATA messages committed to an outbox
        self.accepted_bytes = 0
        self.tx_msgs = self.tx_bytes = 0
        self.rx_msgs = self.rx_bytes = 0
        self.refused = 0
        self.requeued = 0
        self.requeue_bytes = 0
        self.notices_sent = 0
        self.dropped_unread = 0
        #: Set when the session is detached: responses still coming for it are dropped.
        self.gone = False
        #: Set when its socket is closed.
        self.closed = False
        #: client_idle_timeout: what it had done when last looked at, and since when.
        self.idle_mark: tuple = ()
        self.idle_since = 0.0
        self._refusal_log = RateLimit(REFUSAL_LOG_INTERVAL)
        #: Failed sends and receives on its socket (counted; logged rate-limited).
        self.socket_errors = SocketErrors(self.log, "client_socket_error")
        #: Why the last receive failed, for the detach line ("receive failed: ECONNRESET").
        self.recv_error: str | None = None

    def __repr__(self) -> str:
        return f"AppSession({self.id} pid={self.cred.pid} group={self.group.cfg.name})"

    # -- Owner protocol (called by the send core) ----------------------------

    def count_written(self, msgs: int, nbytes: int) -> None:
        self.tx_msgs += msgs
        self.tx_bytes += nbytes

    # -- lifecycle ------------------------------------------------------------

    @property
    def receiving(self) -> bool:
        return self.sm.state is ClientState.RECEIVING

    def start(self, receive: bool) -> None:
        self.sm.fire(ClientEvent.ACCEPT_RECEIVING if receive else ClientEvent.ACCEPT_NOT_RECEIVING)
        self.group.reactor.replace(self.fd, self)
        self.group.reactor.modify(self.fd, self.mask)

    def handle(self, events: int) -> None:
        if events & EPOLLOUT:
            self.flush_txq()
            if self.closed:
                return
        if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            hung_up = bool(events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
            if self.reading and (self.read_wanted or hung_up):
                self.pump(hung_up)
            elif hung_up:
                self.close("hung up")

    def crash(self, exc: BaseException) -> None:
        self.close(f"internal error: {exc!r}")

    def _set_mask(self, mask: int) -> None:
        if mask != self.mask and not self.closed:
            self.mask = mask
            self.group.reactor.modify(self.fd, mask)

    def _want_read(self, on: bool) -> None:
        self.read_wanted = on
        mask = (self.mask | EPOLLIN) if on and self.reading else (self.mask & ~EPOLLIN)
        self._set_mask(mask)

    def wake(self) -> None:
        """The scheduler has room for this client again: read it in this pass."""
        if self.gone or not self.reading:
            return
        self.group.reactor.call_soon(self._resume)

    def _resume(self) -> None:
        if self.gone or not self.reading:
            return
        self._want_read(True)
        self.pump(False)

    def stop_reading(self, notice: Notice) -> None:
        """Read nothing more from this client, then tell it so (the notice names the last seq read)."""
        self.reading = False
        self._want_read(False)
        self.group.sched.forget(self)
        if self.open is not None:
            self.open.abort(None)
        self.notify(notice)

    # -- packets in -------------------------------------------------------------

    def pump(self, hung_up: bool) -> None:
        """Read what the scheduler lets us, as much as one turn allows."""
        group = self.group
        sched = group.sched
        limit = group.daemon_cfg.client_notice_limit
        while True:
            if self.notices_queued >= limit:
                # Too many notices unread: the client must read before it may send.
                self._want_read(False)
                if hung_up:
                    self.close("hung up")
                return
            if self.open is not None:
                status = self.open.read()
            else:
                conn = sched.route(self)
                if conn is None:
                    if self.blocked_since is None:
                        self.blocked_since = time.monotonic()
                    self._want_read(False)
                    if hung_up:
                        self.close("hung up while pushed back")
                    return
                self.blocked_since = None
                status = self._pull(conn)
            if status == _EOF:
                self.close(self.recv_error or "closed")
                return
            if status == _EMPTY:
                if not self.read_wanted:
                    self._want_read(True)
                if hung_up:
                    self.close("hung up")
                return
            if status == _TURN:
                return  # the level-triggered epoll brings us back after the others
            # _FULL: route again (parks on the full outbox, or moves on)
            if self.closed:
                return

    def _pull(self, conn: Any) -> int:
        """Receive packets into ``conn``'s outbox until empty, full or our turn is up.

        The hot loop of the send path: one ``recvmsg_into`` per packet,
        straight into the outbox, the header checked in place. The packet
        lands at ``tail - 1`` so its kind byte overwrites the last byte before
        the message, which is saved and put back (see :class:`~kmuxd.core.sendq.Outbox`).
        """
        group = self.group
        cfg = group.cfg
        sched = group.sched
        outbox = sched.outbox_of(conn)
        outbox.has_room()  # compacts if a blocked write left little space
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
        # that only says EAGAIN (level-triggered epoll brings it back).
        passes = group.reactor.passes
        batch = self.read_batch
        if self.batch_pass == passes - 1 and batch < cfg.client_turn:
            batch = self.read_batch = min(cfg.client_turn, batch * 2)  # still readable: it streams
        turn = batch
        budget = conn.budget
        if budget is not None and budget < turn:
            turn = max(budget, 1)
        router = group.router
        now = time.monotonic()
        taken = msgs = 0
        first_seq = self.seq + 1
        run_start = tail
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
            if kind == KIND_DATA and not flags & _MSG_CTRUNC:
                self.seq += 1
                if flags & _MSG_TRUNC or size > max_message:
                    err = MessageTooBig(f"message is {size} bytes, the group's max_message is {max_message}")
                elif (fixed is not None and size >= fixed[2]
                      and fixed[0](buf, tail + fixed[1])[0] + fixed[3] == size):
                    err = None
                else:
                    err = check(buf, tail, size)
                if err is None and router is not None:
                    try:
                        outbox.requests.append(router.accept(self, self.seq, now, buf, tail, size))
                    except KmuxError as exc:  # id_in_use, ids_exhausted, too short for its id
                        err = exc
                if err is None:
                    tail += size
                    msgs += 1
                    continue
                # A refused message ends the run: runs name their seqs without gaps.
                taken += self._commit(conn, outbox, run_start, tail, msgs, first_seq)
                run_start = tail
                msgs = 0
                first_seq = self.seq + 1
                self.refuse(err)
                continue
            # Anything else is rare: commit what we have, then deal with it clearly.
            taken += self._commit(conn, outbox, run_start, tail, msgs, first_seq)
            run_start = tail
            msgs = 0
            if flags & _MSG_CTRUNC:
                self._refuse_ancillary(kind, now)
                if self.open is not None:
                    return self.open.read()  # the rest of that message goes with it
            elif kind == KIND_DATA_MORE:
                self.seq += 1
                self.open = asm = Assembly.begin(self, outbox, tail, size, bool(flags & _MSG_TRUNC), now)
                first_seq = self.seq + 1
                return asm.read() if self.open is not None and not self.gone else _TURN
            else:
                self._packet(kind, bytes(view[tail : tail + size]), bool(flags & _MSG_TRUNC))
            first_seq = self.seq + 1
        taken += self._commit(conn, outbox, run_start, tail, msgs, first_seq)
        if status == _TURN:
            self.batch_pass = passes
        elif status == _EMPTY and batch > 1:
            self.read_batch = max(1, batch // 2)
        return status

    def _commit(self, conn: Any, outbox: "Outbox", start: int, tail: int, msgs: int, first_seq: int) -> int:
        if not msgs:
            group = self.group
            group.wake(group.sched.committed(self, conn, outbox.tail, 0))
            return 0
        self.accepted += msgs
        self.accepted_bytes += tail - start
        group = self.group
        wake = group.sched.committed(self, conn, tail, msgs, first_seq)
        if wake:
            group.wake(wake)  # a connection reserved for us goes on to the next waiter
        conn.accepted(msgs)
        conn.flush_soon()
        return msgs

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
        try:
            if truncated:
                raise BadPacket("packet truncated: larger than max_message + 1")
            if kind == KIND_CONTROL:
                control = decode_control(body)
                if control.op == "receive":
                    self.set_receiving(control.args["on"])
            elif kind in (KIND_REQUEUE, KIND_REQUEUE_MORE):
                self._requeue_piece(body, more=kind == KIND_REQUEUE_MORE)
            else:
                raise BadPacket(f"unknown packet kind 0x{kind:02x}")
        except KmuxError as exc:
            self.refuse(exc, seq=False)

    def _requeue_piece(self, body: bytes, more: bool) -> None:
        parts = self.requeue_parts
        if parts is None and not more:
            self.group.requeue(self, body)
            return
        if parts is None:
            parts = self.requeue_parts = bytearray()
        if len(parts) + len(body) > self.group.cfg.max_message:
            self.requeue_parts = None
            raise BadPacket("requeued message is over max_message")
        parts += body
        if not more:
            self.requeue_parts = None
            self.group.requeue(self, bytes(parts))

    def recv_failed(self, exc: OSError) -> int:
        """A receive failed (not EAGAIN): the session ends, and its detach line says why."""
        self.recv_error = f"receive failed: {errno_name(exc)}"
        return _EOF

    def socket_error(self, op: str, exc: OSError) -> None:
        """A send or receive on this client's socket failed (not EAGAIN): counted, logged rate-limited."""
        self.socket_errors.note(op, exc, self.sock)

    def refuse(self, err: KmuxError, seq: bool = True, seq_value: int | None = None) -> None:
        self.refused += 1
        if seq:
            err.details["seq"] = self.seq if seq_value is None else seq_value
        # The client always gets its notice; the log gets the first refusal
        # and then one line per interval, so a buggy app cannot flood it.
        if self._refusal_log.allow():
            self.log.info(
                "message_refused", error_code=err.code, error=err.message, seq=err.details.get("seq"),
                suppressed=self._refusal_log.take_suppressed(),
            )
        self.notify(Notice.for_error(err))

    def refuse_unread(self, err_factory: Any, limit: int) -> int:
        """Read and refuse (each with its seq) what waits in the socket: queue_timeout."""
        refused = 0
        while refused < limit:
            try:
                n, _, flags, _ = self.sock.recvmsg_into((_SCRATCH,), 0, _MSG_TRUNC)
            except BlockingIOError:
                break  # nothing more waits
            except OSError as exc:
                # The socket failed: the reactor reports it (EPOLLERR/EPOLLHUP) and the pump ends the session.
                self.socket_error("receive", exc)
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

    def set_receiving(self, on: bool) -> None:
        group = self.group
        steering = group.steering
        if on:
            self.sm.fire(ClientEvent.RECEIVE_ON)
            if not self.txq and steering.receive_on(self):
                group.receiver_ready()
            elif self.txq:
                steering.receive_on(self)
                steering.blocked(self)
        else:
            self.sm.fire(ClientEvent.RECEIVE_OFF)
            steering.receive_off(self)
            self.notify(Notice(event="receive_off"))

    # -- packets out --------------------------------------------------------------

    def notify(self, notice: Notice) -> None:
        """Queue a notice; it goes out before any further data to this client."""
        if self.closed:
            return
        packet = encode_notice(notice)
        if not self.txq:
            try:
                self.sock.send(packet)
            except BlockingIOError:
                pass
            except OSError as exc:
                self.socket_error("send_notice", exc)  # lost; if the app is gone, its hang-up ends the session
                return
            else:
                self.notices_sent += 1
                return
        self.txq.append((packet, _NOTICE))
        self.notices_queued += 1
        self._blocked_out()

    def send_response(self, buf: bytearray, view: memoryview, pos: int, end: int, seq: int) -> bool:
        """Hand over one response at ``buf[pos:end]`` (the byte before it is free).

        Returns True if it was sent or queued for this client, False if it was
        dropped (queue full with ``rx_overflow = "drop"``, or the client is gone).
        """
        size = end - pos
        if not self.txq and size < self.max_packet:
            buf[pos - 1] = KIND_DATA
            try:
                self.sock.send(view[pos - 1 : end])
            except BlockingIOError:
                pass
            except OSError as exc:
                self.socket_error("send", exc)
                return False
            else:
                self.rx_msgs += 1
                self.rx_bytes += size
                return True
        return self._queue_response(view[pos:end], seq)

    def send_message(self, message: Any) -> None:
        """Balance steering's send for a message too large for one packet (or requeued).

        Raises OSError (not EAGAIN) if the socket failed before the message was
        taken: the caller counts it and hands the message to another receiver.
        """
        self._queue_response(memoryview(message), None, direct=True)

    def _queue_response(self, message: memoryview, seq: int | None, direct: bool = False) -> bool:
        size = len(message)
        cfg = self.group.cfg
        if self.txq_data_bytes + size > cfg.client_rx_limit and not direct:
            return self._overflow(seq)
        packets = self._packets(message)
        if not self.txq:
            # Send what the socket takes now, queue the rest (nothing else may come between pieces).
            while packets:
                try:
                    self.sock.send(packets[0])
                except BlockingIOError:
                    break
                except OSError as exc:
                    if direct:
                        raise  # balance steering: the message goes to another receiver
                    self.socket_error("send", exc)
                    return False
                packets.pop(0)
            if not packets:
                self.rx_msgs += 1
                self.rx_bytes += size
                return True
        last = len(packets) - 1
        self.txq.extend((packet, size if i == last else 0) for i, packet in enumerate(packets))
        self.txq_data_bytes += size
        self.txq_data_msgs += 1
        self.rx_msgs += 1  # counted when handed to the daemon's queue for it
        self.rx_bytes += size
        self._blocked_out()
        return True

    def _packets(self, message: memoryview) -> list[bytes]:
        """One DATA packet, or DATA_MORE pieces and a last DATA when it does not fit."""
        piece = self.max_packet - 1
        if len(message) <= piece:
            return [DATA_PREFIX + message]
        out = []
        for i in range(0, len(message), piece):
            chunk = message[i : i + piece]
            last = i + piece >= len(message)
            out.append((DATA_PREFIX if last else DATA_MORE_PREFIX) + chunk)
        return out

    def _overflow(self, seq: int | None) -> bool:
        group = self.group
        if group.cfg.rx_overflow == "drop":
            group.responses_dropped += 1
            err = ResponseDropped(
                f"a response was dropped: {self.txq_data_bytes} bytes already wait for this client "
                f"(client_rx_limit={group.cfg.client_rx_limit})"
            )
            if seq is not None:
                err.details["seq"] = seq
            self.notify(Notice.for_error(err))
            return False
        self.slow_consumer()
        return False

    def slow_consumer(self) -> None:
        """Detach a client that left more than client_rx_limit bytes unread."""
        if self.closing_deadline is not None or self.closed:
            return
        group = self.group
        group.slow_consumers += 1
        limit = group.cfg.client_rx_limit
        self.log.warning("slow_consumer", queued_bytes=self.txq_data_bytes, client_rx_limit=limit)
        # Its queued responses are dropped; the notice is the last thing it gets.
        self.txq.clear()
        self.txq_data_bytes = self.txq_data_msgs = self.notices_queued = 0
        self.stop_reading(Notice.for_error(SlowConsumer(
            f"more than client_rx_limit={limit} bytes of responses waited unread; detached"
        )))
        group.detach(self)  # gone from now on: its responses are dropped; its last notice still goes out
        group.slow.add(self)
        self.closing_deadline = time.monotonic() + group.cfg.slow_consumer_grace
        if not self.txq:
            self.close("slow consumer")

    def rx_blocked(self) -> None:
        """Balance steering could not hand this client a message: wait for room."""
        self._blocked_out()

    def _blocked_out(self) -> None:
        self.group.steering.blocked(self)
        self._set_mask(self.mask | EPOLLOUT)

    def flush_txq(self) -> None:
        txq = self.txq
        send = self.sock.send
        while txq:
            packet, completes = txq[0]
            try:
                send(packet)
            except BlockingIOError:
                return
            except OSError as exc:
                txq.clear()
                self.close(f"send failed: {errno_name(exc)}")  # the detach line is the log line
                return
            txq.popleft()
            if completes == _NOTICE:
                self.notices_queued -= 1
                self.notices_sent += 1
            elif completes:
                self.txq_data_msgs -= 1
                self.txq_data_bytes -= completes
        self._set_mask(self.mask & ~EPOLLOUT)
        if self.closing_deadline is not None:
            self.close("slow consumer")
            return
        group = self.group
        # In id/fifo modes a paused connection never waits for a client; in
        # balance mode this one may take messages again.
        if group.steering.unblocked(self):
            group.receiver_ready()
        if self.reading and not self.read_wanted and self.notices_queued < group.daemon_cfg.client_notice_limit:
            self.wake()

    # -- the end ------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """End the session: detach, drop (and count) what it sent that was never read, close."""
        if self.closed:
            return
        self.closed = True
        self.gone = True
        group = self.group
        group.slow.discard(self)
        if self.open is not None:
            if self.open.outbox is not None:
                self.dropped_unread += 1  # the message it was sending in pieces
            self.open.release()
            self.open = None
        group.detach(self)
        if self.txq_data_msgs and group.router is not None:
            group.router.dropped += self.txq_data_msgs  # responses it never read
        self.dropped_unread += self.discard_unread()
        group.dropped_unread += self.dropped_unread
        group.reactor.unregister(self.fd)
        try:
            self.sock.close()
        except OSError:
            pass  # the descriptor is released whatever close() says; nothing is lost that was not counted
        self.sm.fire(ClientEvent.CLOSE)
        self.server.session_closed(self)
        lines = self.server.client_lines
        if lines.allow(time.monotonic()):
            self.log.info("client_detached", reason=reason, tx_msgs=self.tx_msgs, rx_msgs=self.rx_msgs,
                          dropped_unread=self.dropped_unread or None, socket_errors=self.socket_errors.count or None,
                          suppressed=lines.take_suppressed())

    def discard_unread(self, limit: int = DISCARD_LIMIT) -> int:
        """Drop (and count) packets the client sent that were never read, before closing (:func:`.sockerr.discard_unread`)."""
        return discard_unread(self.sock, limit)

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
            queued_msgs=self.accepted - self.tx_msgs,
            queued_bytes=self.accepted_bytes - self.tx_bytes,
            rx_msgs=self.rx_msgs,
            rx_bytes=self.rx_bytes,
            rx_queued_msgs=self.txq_data_msgs,
            rx_queued_bytes=self.txq_data_bytes,
            refused=self.refused,
            requeued=self.requeued,
            notices_sent=self.notices_sent,
            notices_pending=self.notices_queued,
            connected_for=time.monotonic() - self.since,
        )
