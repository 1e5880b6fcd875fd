"""One TCP connection slot of a group: dial, write batches, read and steer.

The slot is a thin trio shell around the sans-IO cores (:mod:`kmuxd.core.sendq`,
:mod:`kmuxd.core.steering`, :class:`kmux.framing.FrameDecoder`). It never awaits
per message: the reader waits for readability once, then drains the socket
with non-blocking ``recv_into`` into a buffer allocated once; writes are one
non-blocking ``send`` of the whole outbox, tried first by whoever filled it
(no task switch when the kernel has room), and only a blocked write wakes
the writer task to wait for writability.

Error handling: any failure of the stream (reset, EOF, a hostile length, an
assembly timeout) goes through :meth:`ConnSlot.fail`, which salvages the
outbox synchronously, so no message waits on a dead stream, then cancels
the connection's tasks. The slot then backs off and dials again; other slots
are untouched.
"""

from __future__ import annotations

import errno
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from kmux.errors import ConnectFailed, ConnectionLost, DrainInProgress, DrainTimeout, KmuxError, RemoteAssemblyTimeout
from kmux.framing import FrameDecoder

from kmuxd.system.config import Endpoint
from kmuxd.system.log import RateLimit
from kmuxd.core.requests import DONE, PENDING, WRITTEN
from .tcpinfo import TcpInfo, read_tcp_info
from kmuxd.core.states import CONN_TRANSITIONS, CONNECTED_STATES, ConnEvent, ConnState, StateMachine

if TYPE_CHECKING:
    from .group import Group

__all__ = ["ConnSlot", "ConnStatistics"]

#: A connection that stayed up this long resets the back-off schedule, so a
#: server that accepts and immediately closes cannot cause a dial storm.
STABLE_AFTER = 5.0
#: Most reads when taking the answers that arrived on a failing stream.
ARRIVED_READS_MAX = 64
#: How often a draining connection checks whether its queue is empty, seconds.
DRAIN_POLL = 0.01
#: Offset of received bytes in the receive buffer (one free byte before them).
RX_BASE = 1


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
    need_more_hdr: int
    msg_too_big: int
    msg_timeouts: int
    bad_hdr_len: int
    #: TCP connections established by this slot after the first.
    reconnects: int
    dial_failures: int
    last_error: str | None
    #: The kernel's TCP_INFO for the live connection (None when not connected).
    tcp: TcpInfo | None


class ConnSlot:
    def __init__(self, group: "Group", index: int, endpoint: Endpoint) -> None:
        cfg = group.cfg
        self.group = group
        self.index = index
        self.endpoint = endpoint
        self.log = group.log.bind(conn=index, endpoint=str(endpoint))
        self.sm = StateMachine(CONN_TRANSITIONS, ConnState.IDLE, f"group {cfg.name} conn {index}")
        self.outbox = None  # set by the group's TxScheduler
        self.sock: socket.socket | None = None
        # Receive side: one buffer for the slot's life; a partial message of
        # up to max_message always fits after compaction.
        # Bytes start at RX_BASE: the byte before any unsteered message is
        # free (a steered message's last byte, or this scratch byte), so the
        # steering loop writes the DATA kind byte there and sends the packet
        # with one plain send().
        self.rbuf = bytearray(RX_BASE + cfg.read_buffer + cfg.max_message)
        self.rview = memoryview(self.rbuf)
        self.rhead = RX_BASE  # first byte not yet steered
        self.rtail = RX_BASE  # end of received bytes
        self.rparsed = RX_BASE  # end of complete messages found (>= rhead)
        self.rends: list[int] = []  # ends of parsed, undelivered messages
        self.decoder = FrameDecoder(cfg.framing, cfg.max_message)
        #: request/response modes: requests written here and not done
        #: (fifo: a deque in written order; id: an ordered dict)
        self.inflight: deque | dict = deque() if cfg.steering == "fifo" else {}
        self._partial_since: float | None = None
        self._scope: trio.CancelScope | None = None  # the live connection's tasks
        self._run_scope = trio.CancelScope()  # the whole slot (retire cancels it)
        self._redial_now = False
        self._retiring = False
        self._closed = trio.Event()  # set when the current TCP connection is closed
        self._write_wanted = trio.Event()
        self._error: BaseException | None = None
        self._connected_at = 0.0
        self._dial_log = RateLimit(10.0)
        # counters
        self.tx_msgs = self.tx_bytes = self.rx_msgs = self.rx_bytes = 0
        self.tx_aborts = 0
        self.msg_timeouts = 0
        self.connections_made = 0
        self.dial_failures = 0
        self.last_error: str | None = None

    # -- lifecycle -----------------------------------------------------------

    @property
    def state(self) -> ConnState:
        return self.sm.state

    @property
    def connected(self) -> bool:
        return self.sm.state in CONNECTED_STATES

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep this slot connected until retired or cancelled.

        The group's endpoint pool says which endpoint to dial, or how long to
        wait (kmuxd.core.endpoints). Reports started after the first dial, whether
        it connected or not.
        """
        pool = self.group.endpoints
        self.sm.fire(ConnEvent.DIAL)
        started = False
        with trio.CancelScope() as self._run_scope:
            while True:
                endpoint, wait = pool.choose(time.monotonic())
                if endpoint is None:
                    # Every endpoint is ejected and backing off (or being probed).
                    self.sm.fire(ConnEvent.NO_ENDPOINT)
                    if not started:
                        started = True
                        task_status.started()
                    await trio.sleep(wait)
                    self.sm.fire(ConnEvent.RETRY)
                    continue
                self._use_endpoint(endpoint)
                try:
                    sock = await self._dial()
                except (OSError, ConnectFailed) as exc:
                    pool.failed(endpoint, time.monotonic())
                    self.dial_failures += 1
                    self.last_error = _describe(exc)
                    self.sm.fire(ConnEvent.DIAL_FAILED)
                    if self._dial_log.allow():
                        self.log.warning(
                            "dial_failed", error=self.last_error, suppressed=self._dial_log.take_suppressed()
                        )
                    if not started:
                        started = True
                        task_status.started()
                    await trio.lowlevel.checkpoint()  # the pool decides whether to wait
                    self.sm.fire(ConnEvent.RETRY)
                    continue
                pool.connected(endpoint)
                await self._carry(sock, task_status if not started else None)
                started = True
                requested = self._redial_now or self._retiring
                stable = requested or time.monotonic() - self._connected_at >= STABLE_AFTER
                pool.closed(endpoint, time.monotonic(), stable=stable)
                if self._retiring:
                    break
                self._redial_now = False
                await trio.lowlevel.checkpoint()
                self.sm.fire(ConnEvent.RETRY)
        if self.sm.state is not ConnState.CLOSED:
            self.sm.fire(ConnEvent.CLOSE)

    def _use_endpoint(self, endpoint: Endpoint) -> None:
        if endpoint != self.endpoint:
            self.endpoint = endpoint
            self.log = self.group.log.bind(conn=self.index, endpoint=str(endpoint))

    # -- operator actions ------------------------------------------------------

    def reconnect(self) -> bool:
        """Close the live connection and dial again at once. False if not connected."""
        if self.sm.state is ConnState.DRAINING:
            raise DrainInProgress(f"conn {self.index} is draining; it is replaced when the drain ends")
        if not self.connected:
            return False
        self._redial_now = True
        self.fail(ConnectionLost("reconnect requested by an operator"), requested=True)
        return True

    async def drain(self, timeout: float, *, retire: bool = False) -> tuple[int, int]:
        """Write everything queued here, taking nothing new, then replace (or retire) the connection.

        Returns (messages, bytes) written meanwhile. Raises DrainTimeout if
        the queue did not empty in time; the connection then stays in service.
        """
        if self.sm.state is ConnState.DRAINING:
            raise DrainInProgress(f"conn {self.index} is already draining")
        if not self.connected:
            if retire:
                self._run_scope.cancel()
            return 0, 0
        group = self.group
        msgs0, bytes0 = self.tx_msgs, self.tx_bytes
        # This TCP connection's own "closed" event: if it dies meanwhile and
        # the slot redials, the drain must not touch the new connection.
        closed = self._closed
        deadline = trio.current_time() + timeout
        self.sm.fire(ConnEvent.DRAIN)
        group.after_tx(group.tx.retire(self))
        with trio.move_on_at(deadline) as scope:
            while not closed.is_set() and (self.outbox.pending or self.outbox.owners):
                await trio.sleep(DRAIN_POLL)
        if scope.cancelled_caught and not closed.is_set():
            self.sm.fire(ConnEvent.DRAIN_ABORTED)
            group.after_tx(group.tx.connected(self))
            raise DrainTimeout(
                f"conn {self.index} still had {self.outbox.pending} bytes queued after {timeout}s; it stays in service"
            )
        if retire:
            self._retiring = True
        elif not closed.is_set():
            self._redial_now = True  # replaced at once, without back-off
        if not closed.is_set() and self.connected:
            # Let the service finish what it is answering: half-close, then
            # read until it closes (or the rest of the timeout runs out).
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            with trio.move_on_at(deadline):
                await closed.wait()
            if not closed.is_set():
                self.sm.fire(ConnEvent.DRAINED)
                self._scope.cancel()
        await closed.wait()
        if retire:
            self._run_scope.cancel()
        self.log.info("drained", msgs=self.tx_msgs - msgs0, bytes=self.tx_bytes - bytes0, retire=retire)
        return self.tx_msgs - msgs0, self.tx_bytes - bytes0

    async def _carry(self, sock: socket.socket, task_status) -> None:
        self.sock = sock
        self._error = None
        self._closed = trio.Event()
        self.rhead = self.rtail = self.rparsed = RX_BASE
        self.rends = []
        self._partial_since = None
        self._connected_at = time.monotonic()
        self.connections_made += 1
        self.sm.fire(ConnEvent.CONNECTED)
        self.log.info("connected", local=_sockname(sock))
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                group = self.group
                group.after_tx(group.tx.connected(self))
                if task_status is not None:
                    task_status.started()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guarded, self._reader)
                    nursery.start_soon(self._guarded, self._writer)
        finally:
            self._scope = None
            if self.connected:  # cancelled from outside (group stopping)
                self.group.tx.disconnected(self)
                self.sm.fire(ConnEvent.CLOSE)
            trio.lowlevel.notify_closing(sock)
            sock.close()
            self.sock = None
            self._closed.set()
            # Closed by a drain or a stop: what is still unanswered is lost.
            self.group.fail_requests(self, ConnectionLost(f"connection {self.index} to {self.endpoint} was closed"))

    async def _guarded(self, task) -> None:
        try:
            await task()
        except (OSError, KmuxError) as exc:
            # While draining, the service closing its side is the expected end.
            self.fail(exc, requested=self.sm.state is ConnState.DRAINING)

    async def _dial(self) -> socket.socket:
        cfg = self.group.cfg
        host, port = self.endpoint.host, self.endpoint.port
        with trio.move_on_after(cfg.connect_timeout) as scope:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            last: BaseException | None = None
            for family, type_, proto, _, addr in infos:
                sock = socket.socket(family, type_ | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, proto)
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    err = sock.connect_ex(addr)
                    if err == errno.EINPROGRESS:
                        await trio.lowlevel.wait_writable(sock)
                        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, f"connect to {self.endpoint}: {errno.errorcode.get(err, err)}")
                    return sock
                except BaseException as exc:
                    trio.lowlevel.notify_closing(sock)
                    sock.close()
                    last = exc
                    if not isinstance(exc, OSError):
                        raise
            raise last or ConnectFailed(f"{self.endpoint}: no address")
        assert scope.cancelled_caught
        raise ConnectFailed(f"connect to {self.endpoint} timed out after {cfg.connect_timeout}s")

    def fail(self, exc: BaseException, *, requested: bool = False) -> None:
        """The stream is unusable: salvage the outbox now, then stop its tasks."""
        if not self.connected:
            return
        self._error = exc
        if not requested:  # an operator's reconnect or drain is not an error
            self.last_error = _describe(exc)
        group = self.group
        cut_before = self.outbox.pending
        self.sm.fire(ConnEvent.FAILED)
        if group.request_mode:
            # Answers the service sent before the stream broke are still
            # owed to their clients: take them before failing the rest.
            self._take_arrived_responses()
        salvage, wake = group.tx.failed(self)
        # Written requests cannot be retried safely: their clients are told,
        # and answers parsed but not handed over are dropped with them.
        group.fail_requests(self, exc)
        self.rends = []
        if salvage.cut_msgs:
            self.tx_aborts += 1
        group.tx_retries += salvage.resend_msgs
        group.after_tx(wake)
        (self.log.info if requested else self.log.warning)(
            "connection_closed" if requested else "connection_failed",
            error=_describe(exc),
            error_code=getattr(exc, "code", "os_error"),
            resend_msgs=salvage.resend_msgs,
            queued_bytes=cut_before,
        )
        if self._scope is not None:
            self._scope.cancel()

    # -- send side -----------------------------------------------------------

    def request_written(self, req) -> None:
        """A request's bytes reached the kernel on this connection (see kmuxd.core.requests)."""
        if req.state != PENDING:
            return  # answered while its batch was still being written (fifo)
        req.state = WRITTEN
        req.conn = self
        if isinstance(self.inflight, deque):
            self.inflight.append(req)
        else:
            self.inflight[req] = None

    def flush_nowait(self) -> None:
        """Write as much of the outbox as the kernel takes, without waiting."""
        outbox = self.outbox
        sock = self.sock
        if sock is None or not self.connected:
            return
        group = self.group
        while outbox.head < outbox.tail:
            try:
                n = sock.send(outbox.view[outbox.head : outbox.tail])
            except BlockingIOError:
                if self.sm.state is not ConnState.BUSY:
                    self.sm.fire(ConnEvent.WRITE_BLOCKED)
                self._write_wanted.set()
                return
            except OSError as exc:
                self.fail(exc)
                return
            wake = group.tx.written(self, n)
            self.tx_bytes += n
            group.after_tx(wake)
            if outbox is not self.outbox:  # adoption/failure swapped outboxes meanwhile
                outbox = self.outbox
        if self.sm.state is ConnState.BUSY:
            self.sm.fire(ConnEvent.WRITE_DONE)

    async def _writer(self) -> None:
        # The only task that waits for writability on this socket.
        while True:
            await self._write_wanted.wait()
            self._write_wanted = trio.Event()
            while self.outbox.pending and self.connected:
                await trio.lowlevel.wait_writable(self.sock)
                self.flush_nowait()

    # -- receive side ----------------------------------------------------------

    async def _reader(self) -> None:
        sock = self.sock
        group = self.group
        cfg = group.cfg
        rbuf, rview = self.rbuf, self.rview
        size = len(rbuf)
        split = self.decoder.split
        while True:
            if self._partial_since is None:
                await trio.lowlevel.wait_readable(sock)
            else:
                with trio.move_on_at(self._partial_since + cfg.assembly_timeout):
                    await trio.lowlevel.wait_readable(sock)
                if time.monotonic() - self._partial_since >= cfg.assembly_timeout:
                    self.msg_timeouts += 1
                    raise RemoteAssemblyTimeout(
                        f"a partial message of {self.rtail - self.rparsed} bytes did not complete "
                        f"within assembly_timeout={cfg.assembly_timeout}s"
                    )
            while True:
                if not self.connected:
                    # fail() ran while this task was already scheduled: the
                    # stream's outcomes are settled, take nothing more.
                    return
                # Deliver what is parsed before reading more: with no ready
                # receiver we stop reading and TCP pushes back on the server.
                while self.rends:
                    if not group.steer(self):
                        self._partial_since = None  # our own pause, not the remote's delay
                        await group.wait_receiver()
                        if not self.connected:
                            return
                if self.rtail > self.rparsed and self._partial_since is None:
                    self._partial_since = time.monotonic()
                if self.rhead == self.rtail:
                    self.rhead = self.rtail = self.rparsed = RX_BASE
                elif size - self.rtail < cfg.read_buffer // 4:
                    self._compact()
                try:
                    n = sock.recv_into(rview[self.rtail :])
                except BlockingIOError:
                    break
                if n == 0:
                    raise ConnectionLost(f"{self.endpoint} closed the connection")
                self.rtail += n
                self.rx_bytes += n
                ends, consumed, pending = split(rbuf, self.rparsed, self.rtail)
                if ends:
                    self.rends = ends
                    self.rparsed = consumed
                    # The partial message (if any) completed; a new one may
                    # have begun in this read: its clock starts now.
                    self._partial_since = None
                if consumed < self.rtail:
                    if self._partial_since is None:
                        self._partial_since = time.monotonic()
                    if pending > 0 and self.rparsed + pending > size:
                        self._compact()
                else:
                    self._partial_since = None

    def _take_arrived_responses(self) -> None:
        """Read and steer, without waiting, whatever is already received on a failing stream."""
        group = self.group
        sock = self.sock
        size = len(self.rbuf)
        for _ in range(ARRIVED_READS_MAX):
            if self.rends and not group.steer(self):
                return  # a client cannot take its answer now; the rest is failed
            if self.rhead == self.rtail:
                self.rhead = self.rtail = self.rparsed = RX_BASE
            elif size - self.rtail < self.group.cfg.read_buffer // 4:
                self._compact()
            try:
                n = sock.recv_into(self.rview[self.rtail :])
            except OSError:
                return
            if n == 0:
                return
            self.rtail += n
            self.rx_bytes += n
            try:
                ends, consumed, _ = self.decoder.split(self.rbuf, self.rparsed, self.rtail)
            except KmuxError:
                return
            if ends:
                self.rends = ends
                self.rparsed = consumed
        if self.rends:
            group.steer(self)

    def _compact(self) -> None:
        # Undelivered messages and the partial one move to the front.
        shift = self.rhead - RX_BASE
        if not shift:
            return
        self.rbuf[RX_BASE : self.rtail - shift] = self.rview[self.rhead : self.rtail]
        self.rhead = RX_BASE
        self.rtail -= shift
        self.rparsed -= shift
        self.rends = [e - shift for e in self.rends]

    # -- statistics -------------------------------------------------------------

    def statistics(self) -> ConnStatistics:
        d = self.decoder.statistics()
        o = self.outbox.statistics()
        sock = self.sock
        return ConnStatistics(
            index=self.index,
            state=self.sm.state.value,
            endpoint=str(self.endpoint),
            local=_sockname(sock) if sock else None,
            remote=_peername(sock) if sock else None,
            age=(time.monotonic() - self._connected_at) if sock else 0.0,
            tx_msgs=self.tx_msgs,
            tx_bytes=self.tx_bytes,
            rx_msgs=self.rx_msgs,
            rx_bytes=self.rx_bytes,
            reserved=self.outbox.reserved_count,
            unreserved=self.outbox.unreserved_count,
            tx_aborts=self.tx_aborts,
            queued_bytes=o.queued_bytes,
            queued_msgs=o.queued_msgs,
            in_flight=sum(1 for r in self.inflight if r.state != DONE),
            need_more_hdr=d.need_more_hdr,
            msg_too_big=d.msg_too_big,
            msg_timeouts=self.msg_timeouts,
            bad_hdr_len=d.bad_hdr_len,
            reconnects=max(0, self.connections_made - 1),
            dial_failures=self.dial_failures,
            last_error=self.last_error,
            tcp=read_tcp_info(sock) if sock else None,
        )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KmuxError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return repr(exc)


def _fmt_addr(addr) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _sockname(sock: socket.socket) -> str | None:
    try:
        return _fmt_addr(sock.getsockname())
    except OSError:
        return None


def _peername(sock: socket.socket) -> str | None:
    try:
        return _fmt_addr(sock.getpeername())
    except OSError:
        return None

