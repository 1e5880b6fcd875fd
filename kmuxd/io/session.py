"""One attached client: its packets in, its notices and messages out.

Resource handling: a client's packets are read only when the group's
scheduler has an outbox for them (:meth:`TxScheduler.route`); otherwise the
client is not read at all and blocks in the kernel, which is the push-back.
Each packet is received straight into that outbox, checked against the
framing in place and either committed (it will be written) or refused with a
notice naming its ``seq``. Notices that the client is too slow to take wait
in a bounded queue; while any wait, the client gets no data (so a
``receive_off`` marker never falls behind data) and past
``client_notice_limit`` its packets are not read.

Error handling: a bad packet costs its sender one notice, never the session
or other clients; only EOF or a socket error ends a session.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from kmux.errors import BadFrame, BadPacket, KmuxError, MessageTooBig, RemoteBadHeader
from kmux.framing import NEED_MORE
from kmux.protocol import KIND_CONTROL, KIND_DATA, KIND_REQUEUE, Notice, decode_control, encode_notice

from kmuxd.system.log import RateLimit
from kmuxd.core.states import CLIENT_TRANSITIONS, ClientEvent, ClientState, StateMachine

if TYPE_CHECKING:
    from .group import Group

__all__ = ["ClientSession", "ClientStatistics", "PeerCred"]

_MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: IntFlag & costs ~1 µs per packet
# Reasons a pull stops.
_EMPTY, _FULL, _TURN, _EOF = range(4)
#: Seconds between "message_refused" log lines for one client (all are counted).
REFUSAL_LOG_INTERVAL = 10.0
#: Most unread packets dropped before closing a client's socket.
DISCARD_LIMIT = 100_000


@dataclass(frozen=True, slots=True)
class PeerCred:
    pid: int
    uid: int
    gid: int
    comm: str

    @classmethod
    def of(cls, sock: socket.socket) -> "PeerCred":
        import struct

        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            comm = ""
        return cls(pid, uid, gid, comm)


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    id: int
    name: str
    group: str
    pid: int
    uid: int
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
    #: Messages refused (bad_frame, message_too_big) and bad packets.
    refused: int
    #: Messages this client handed back after switching receiving off.
    requeued: int
    notices_sent: int
    notices_pending: int
    #: Seconds since the client attached.
    connected_for: float


class ClientSession:
    """An attached client. Also the ``Owner`` of its runs in outboxes."""

    def __init__(self, group: "Group", sock: socket.socket, client_id: int, cred: PeerCred, name: str) -> None:
        self.group = group
        self.sock = sock
        self.id = client_id
        self.cred = cred
        self.name = name
        self.log = group.log.bind(client=client_id, client_pid=cred.pid)
        self.sm = StateMachine(CLIENT_TRANSITIONS, ClientState.HANDSHAKING, f"client {client_id}")
        self.seq = 0
        self.notices: deque[bytes] = deque()
        self.wake = trio.Event()
        self._want_write = trio.Event()
        self._notices_drained = trio.Event()
        self.since = time.monotonic()
        self.accepted = 0  # DATA messages committed to an outbox
        self.accepted_bytes = 0
        self.tx_msgs = self.tx_bytes = 0
        self.rx_msgs = self.rx_bytes = 0
        self.refused = 0
        self.requeued = 0
        self.requeue_bytes = 0
        self.notices_sent = 0
        #: Cancelling it ends the session (graceful stop, group retired).
        self.scope = trio.CancelScope()
        #: Set when the session ended: responses still coming for it are dropped.
        self.gone = False
        #: Cancelling it stops reading the client's packets (graceful stop).
        self._reader_scope = trio.CancelScope()
        self._refusal_log = RateLimit(REFUSAL_LOG_INTERVAL)

    # -- Owner protocol (called by the send core) ----------------------------

    def count_written(self, msgs: int, nbytes: int) -> None:
        self.tx_msgs += msgs
        self.tx_bytes += nbytes

    # -- lifecycle ------------------------------------------------------------

    @property
    def receiving(self) -> bool:
        return self.sm.state is ClientState.RECEIVING

    async def run(self, receive: bool) -> None:
        self.sm.fire(ClientEvent.ACCEPT_RECEIVING if receive else ClientEvent.ACCEPT_NOT_RECEIVING)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                with self._reader_scope:
                    await self._reader()
                    nursery.cancel_scope.cancel()  # EOF: the client left
                # Reading was stopped by the daemon: notices and messages still
                # go out until the session itself is cancelled.
        finally:
            self.sm.fire(ClientEvent.CLOSE)

    def stop_reading(self, notice: Notice) -> None:
        """Read nothing more from this client, then tell it so (the notice names the last seq read)."""
        self._reader_scope.cancel()
        self.notify(notice)

    def discard_unread(self, limit: int = DISCARD_LIMIT) -> int:
        """Drop packets the client sent that were never read, before closing.

        Closing a Unix socket with unread packets makes the peer's next read
        fail with ECONNRESET, which would hide the final notice and the
        clean EOF behind it; the ``shutdown`` notice already told the client
        these were not accepted.
        """
        dropped = 0
        while dropped < limit:
            try:
                if not self.sock.recv(1, socket.MSG_TRUNC):
                    break
            except OSError:
                break
            dropped += 1
        return dropped

    # -- packets in -------------------------------------------------------------

    async def _reader(self) -> None:
        sock = self.sock
        group = self.group
        tx = group.tx
        limit = group.daemon_cfg.client_notice_limit
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                if len(self.notices) >= limit:
                    self._notices_drained = trio.Event()
                    await self._notices_drained.wait()
                conn = tx.route(self)
                if conn is None:
                    self.wake = trio.Event()
                    await self.wake.wait()
                    continue
                status = self._pull(conn)
                if status == _EMPTY:
                    break
                if status == _EOF:
                    return
                if status == _TURN:
                    # Others' turn: the scheduler queued us behind them if busy.
                    await trio.lowlevel.checkpoint()

    def _pull(self, conn) -> int:
        """Receive packets into ``conn.outbox`` until empty, full or our turn is up.

        The hot loop of the send path: one ``recv_into`` per packet, straight
        into the outbox, the length header checked in place. The packet lands
        at ``tail - 1`` so its kind byte overwrites the last byte before the
        message, which is saved and put back (see :class:`~kmuxd.sendq.Outbox`).
        """
        if self._reader_scope.cancel_called:
            # Reading was stopped (the shutdown notice fixed the last seq read);
            # a reader that was already scheduled must not take more.
            return _EOF
        group = self.group
        cfg = group.cfg
        outbox = conn.outbox
        outbox.has_room()  # compacts if a blocked write left little space
        buf, view = outbox.buf, outbox.view
        bufsize = len(buf)
        head, capacity, reserve = outbox.head, outbox.capacity, outbox.reserve
        tail = outbox.tail
        recv_into = self.sock.recv_into
        framing = cfg.framing
        fixed = framing.fixed_field
        if fixed is not None:
            unpack_from, offset, header_end, adjust = fixed
        length_at = framing._length_at
        max_message = cfg.max_message
        turn = cfg.client_turn
        requests = group.request_mode  # id/fifo: each message gets a record
        msgs = 0
        status = _TURN
        while msgs < turn:
            if tail - head >= capacity or bufsize - tail < reserve:
                status = _FULL
                break
            saved = buf[tail - 1]
            try:
                # MSG_TRUNC: n is the packet's real length even if it did not fit.
                n = recv_into(view[tail - 1 :], 0, _MSG_TRUNC)
            except BlockingIOError:
                status = _EMPTY
                break
            except OSError:
                status = _EOF
                break
            finally:
                kind = buf[tail - 1]
                buf[tail - 1] = saved
            if n == 0:
                status = _EOF
                break
            size = n - 1
            if kind == KIND_DATA:
                self.seq += 1
                if size > max_message or tail + size > bufsize:
                    self._refuse(MessageTooBig(f"message is over the group's max_message of {max_message} bytes"))
                    continue
                if fixed is not None:
                    total = unpack_from(buf, tail + offset)[0] + adjust if size >= header_end else NEED_MORE
                else:
                    try:
                        total = length_at(buf, tail, tail + size)
                    except RemoteBadHeader as exc:
                        self._refuse(BadFrame(f"bad length header: {exc.message}"))
                        continue
                if total != size:
                    self._refuse(BadFrame(self._mismatch(size, total)))
                    continue
                if requests:
                    try:
                        outbox.requests.append(group.new_request(self, buf, tail, size))
                    except KmuxError as exc:  # id_in_use, ids_exhausted, too short for its id
                        self._refuse(exc)
                        continue
                tail += size
                msgs += 1
            else:
                self._packet(kind, bytes(view[tail : tail + size]), tail + size > bufsize)
        self.accepted += msgs
        self.accepted_bytes += tail - outbox.tail
        group.after_tx(group.tx.committed(self, conn, tail, msgs))
        if msgs:
            conn.flush_nowait()
        return status

    def _mismatch(self, size: int, total: int) -> str:
        name = self.group.cfg.framing.name
        if total == NEED_MORE:
            return f"{size}-byte message is too short for a {name} header"
        return f"{name} header announces {total} bytes, the message has {size}"

    def _packet(self, kind: int, body: bytes, truncated: bool) -> None:
        """A non-DATA packet: rare, so clarity over speed."""
        try:
            if truncated:
                raise BadPacket("packet truncated: larger than max_message + 1")
            if kind == KIND_CONTROL:
                control = decode_control(body)
                if control.op == "receive":
                    self.set_receiving(control.args["on"])
            elif kind == KIND_REQUEUE:
                self.group.requeue(self, body)
            else:
                raise BadPacket(f"unknown packet kind 0x{kind:02x}")
        except KmuxError as exc:
            self._refuse(exc, seq=False)

    def _refuse(self, err: KmuxError, seq: bool = True) -> None:
        self.refused += 1
        if seq:
            err.details["seq"] = self.seq
        # The client always gets its notice; the log gets the first refusal
        # and then one line per interval, so a buggy app cannot flood it.
        if self._refusal_log.allow():
            self.log.info(
                "message_refused", error_code=err.code, error=err.message, seq=self.seq if seq else None,
                suppressed=self._refusal_log.take_suppressed(),
            )
        self.notify(Notice.for_error(err))

    def set_receiving(self, on: bool) -> None:
        steering = self.group.steering
        if on:
            self.sm.fire(ClientEvent.RECEIVE_ON)
            if not self.notices and steering.receive_on(self):
                self.group.receiver_ready()
            elif self.notices:
                steering.receive_on(self)
                steering.blocked(self)
        else:
            self.sm.fire(ClientEvent.RECEIVE_OFF)
            steering.receive_off(self)
            self.notify(Notice(event="receive_off"))

    # -- packets out --------------------------------------------------------------

    def notify(self, notice: Notice) -> None:
        """Queue a notice; it goes out before any further data to this client."""
        self.notices.append(encode_notice(notice))
        self._flush_notices()

    def _flush_notices(self) -> bool:
        notices = self.notices
        while notices:
            try:
                self.sock.send(notices[0])
            except BlockingIOError:
                self.group.steering.blocked(self)
                self._want_write.set()
                return False
            except OSError:
                notices.clear()
                return False
            notices.popleft()
            self.notices_sent += 1
        self._notices_drained.set()
        return True

    def rx_blocked(self) -> None:
        """The group could not hand this client a message: wait for room."""
        self.group.steering.blocked(self)
        self._want_write.set()

    async def _writer(self) -> None:
        # The only task that waits for writability on this socket.
        while True:
            await self._want_write.wait()
            self._want_write = trio.Event()
            while True:
                await trio.lowlevel.wait_writable(self.sock)
                if self._flush_notices():
                    break
            # In id/fifo modes a paused connection waits for this client in
            # particular, whatever its receive setting.
            if self.group.steering.unblocked(self) or self.group.request_mode:
                self.group.receiver_ready()

    # -- statistics ---------------------------------------------------------------

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            id=self.id,
            name=self.name,
            group=self.group.cfg.name,
            pid=self.cred.pid,
            uid=self.cred.uid,
            comm=self.cred.comm,
            state=self.sm.state.value,
            receiving=self.receiving,
            tx_msgs=self.tx_msgs,
            tx_bytes=self.tx_bytes,
            queued_msgs=self.accepted - self.tx_msgs,
            queued_bytes=self.accepted_bytes - self.tx_bytes,
            rx_msgs=self.rx_msgs,
            rx_bytes=self.rx_bytes,
            refused=self.refused,
            requeued=self.requeued,
            notices_sent=self.notices_sent,
            notices_pending=len(self.notices),
            connected_for=time.monotonic() - self.since,
        )
