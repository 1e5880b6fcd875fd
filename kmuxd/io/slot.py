"""A connection slot: a numbered place in a group that keeps one TCP connection up.

Theory of operation
-------------------
A :class:`Slot` (``conn 0..N-1`` to operators) keeps one *live* TCP
connection: a trio task (:meth:`Slot.run`) dials (the group's endpoint pool
says where, and when; :func:`kmuxd.io.dial.establish` runs the TCP connect,
then TLS and the handshake steps when the group has them, each a state of
the slot), hands the connected socket and its TLS to a
:class:`~kmuxd.io.conn.Conn` (:meth:`Slot.carry`), and waits until that
connection fails, closes or retires, then dials again. Its lifecycle is the
slot table in :mod:`kmuxd.core.states`; a failure in any phase of a dial is
a failed dial (back-off, ``last_error``, the endpoint's health).

Recycling is make-before-break: a connection that retires to be replaced
(:meth:`Slot.replace_now`) finishes its work among the slot's *retiring*
connections while the slot already dials the next. An operator's
``reconnect`` closes the live connection at once; a ``drain`` retires it the
old way (the replacement is dialled once it has closed).

The slot outlives its connections, and so do its totals
(:class:`~kmuxd.core.counters.SlotCounters`, counted by its connections as
they go); it keeps one spare outbox and inbox to reuse. :meth:`Slot.carry`
is the seam for any connected socket: the dial loop calls it, and so could
a socket made elsewhere.

Everything a slot does on the data path runs inside a pass of the event
core: the dial loop enters through :meth:`Reactor.call <kmuxd.io.reactor.Reactor.call>`.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

import trio

from kmux.errors import DrainInProgress, DrainTimeout, KmuxError

from kmuxd.core.attach import AttachedPeer
from kmuxd.core.counters import SlotCounters
from kmuxd.core.endpoints import Verdict
from kmuxd.core.inbox import Inbox
from kmuxd.core.sendq import Outbox
from kmuxd.core.states import SLOT_TRANSITIONS, EndReason, RetireReason, SlotEvent, SlotState, StateMachine
from kmuxd.system.config import Endpoint
from kmuxd.system.log import RateLimit

from .conn import Conn, ConnStatistics
from .dial import describe, establish
from .sockopts import read_socket_options
from .tcpinfo import read_tcp_info

if TYPE_CHECKING:
    from .group import Group
    from .tls import TlsTransport

__all__ = ["Slot"]

#: Seconds between "dial_failed" log lines per slot (all are counted).
DIAL_LOG_INTERVAL = 10.0


class Slot:
    """Connection slot ``index`` of a group: keeps one live TCP connection up."""

    def __init__(self, group: "Group", index: int, endpoint: "Endpoint | AttachedPeer",
                 peer: "AttachedPeer | None" = None) -> None:
        self.group = group
        #: Attached (op attach): who made its one connection; None: the slot dials its own.
        self.peer = peer
        self.clock = group.clock
        self.index = index
        self.endpoint = endpoint
        self.sm = StateMachine(SLOT_TRANSITIONS, SlotState.IDLE, f"group {group.cfg.name} slot {index}")
        self.live: Conn | None = None
        #: Older connections of this slot still finishing their work.
        self.retiring: set[Conn] = set()
        self._wake = trio.Event()
        self._run_scope = trio.CancelScope()
        self._stopping = False
        self._spare_outbox: Outbox | None = None
        self._spare_inbox: Inbox | None = None
        self._dial_log = RateLimit(DIAL_LOG_INTERVAL)
        #: Totals over all its connections (they count into it as they go).
        self.counters = SlotCounters()
        self.last_error: str | None = None

    @property
    def log(self) -> Any:
        return self.group.log.bind(conn=self.index, endpoint=str(self.endpoint))

    @property
    def connected(self) -> bool:
        return self.live is not None and not self.live.sm.closed

    @property
    def state_name(self) -> str:
        if self.live is not None and not self.live.sm.closed:
            return self.live.sm.shown
        return self.sm.state.value

    def conns(self) -> list[Conn]:
        """Its open connections: the retiring ones, then the live one."""
        out = [c for c in self.retiring if not c.sm.closed]
        if self.live is not None and not self.live.sm.closed:
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
                endpoint, wait = pool.choose(self.clock())
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
                    sock, tls = await establish(endpoint, group.cfg, group.sockets, group.tls, self.sm)
                except (OSError, KmuxError) as exc:
                    self.last_error = describe(exc)
                    pool.dial_failed(endpoint, self.clock(), self.last_error)
                    self.counters.dial_failures += 1
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
                conn = group.reactor.call(self.carry, sock, endpoint, tls)
                if not started:
                    started = True
                    task_status.started()
                await self._wake.wait()
                self._wake = trio.Event()
                if self.sm.state is SlotState.UP:
                    self.sm.fire(SlotEvent.LOST if conn.sm.closed else SlotEvent.RECYCLE)
                if self.sm.state is SlotState.BACKOFF:
                    self.sm.fire(SlotEvent.RETRY)
                await trio.lowlevel.checkpoint()

    def carry(self, sock: socket.socket, endpoint: Endpoint, tls: "TlsTransport | None" = None) -> Conn:
        """Carry traffic on ``sock``, a connected TCP socket to ``endpoint`` (inside a pass);
        ``tls``: the TLS it completed its handshake with (None: plaintext)."""
        group = self.group
        cfg = group.cfg
        inbox = self._spare_inbox
        self._spare_inbox = None
        if inbox is None:
            inbox = Inbox(cfg.framing, cfg.max_message, cfg.read_buffer, cfg.max_skip, group.skip_keep)
        else:
            inbox.reset()
        conn = Conn(self, sock, endpoint, inbox, tls)
        outbox = self._spare_outbox
        self._spare_outbox = None
        if outbox is None or outbox.pending or outbox.owners:
            outbox = Outbox(cfg.write_buffer, cfg.max_message + 1, cfg.framing._length_at)
        group.sched.add(conn, outbox)
        self.live = conn
        self.counters.connections_made += 1
        self.sm.fire(SlotEvent.CONNECTED if self.peer is None else SlotEvent.ATTACH)
        if tls is None:
            self.log.info("connected", local=_sockname(sock))
        else:
            t = tls.statistics()
            self.log.info("connected", local=_sockname(sock), tls=t.version, cipher=t.cipher, resumed=t.resumed,
                          server=t.server_subject)
        conn.start()
        return conn

    # -- what its connections tell it ------------------------------------------------------------

    def replace_now(self, conn: Conn) -> None:
        """``conn`` retired make-before-break: it finishes on its own; dial its replacement
        (an attached slot has none: its connection stays its live one until it ends)."""
        if conn is self.live and self.peer is None:
            self.live = None
            self.retiring.add(conn)
            self.counters.retired += 1
            self._wake.set()

    def conn_ended(self, conn: Conn, verdict: Verdict, spare: Outbox | None) -> None:
        """``conn`` closed (how it counted for its endpoint: ``verdict``); ``spare``: its outbox."""
        if conn.error:
            self.last_error = conn.error
        if verdict is Verdict.RECYCLE:
            self.counters.recycles += 1
            self.group.counters.recycles += 1
        if spare is not None and not spare.pending and not spare.owners:
            self._spare_outbox = spare
        if not conn.inbox.ends and self._spare_inbox is None:
            self._spare_inbox = conn.inbox
        self.retiring.discard(conn)
        if conn is self.live:
            self.live = None
            self._wake.set()
            if self.peer is not None:  # never redialled: the slot is done
                self.sm.fire(SlotEvent.CLOSE)
                self.group.attached.ended(self)

    def apply_deadlines(self, now: float) -> None:
        """Its connections' deadlines (the group's housekeeping)."""
        for conn in self.conns():
            conn.apply_deadlines(now)

    def retire_if_at(self, endpoint: Endpoint | None, reason: RetireReason) -> bool:
        """Retire the live connection make-before-break if it goes to ``endpoint``
        (None: wherever it goes). True if it did."""
        live = self.live
        if live is None or not live.sm.taking or (endpoint is not None and live.endpoint != endpoint):
            return False
        live.retire(reason, True)
        return True

    def queued_bytes(self) -> int:
        """Bytes accepted and not yet written on its connections."""
        sched = self.group.sched
        return sum(sched.outbox_of(c).pending for c in self.conns())

    # -- operator actions ------------------------------------------------------------------------

    def reconnect(self) -> bool:
        """Close the live connection and dial again at once. False if not connected."""
        return bool(self.group.reactor.call(self._reconnect))

    def _reconnect(self) -> bool:
        live = self.live
        if live is not None and live.sm.retiring:
            raise DrainInProgress(f"conn {self.index} is draining; it is replaced when the drain ends")
        if live is None or live.sm.closed:
            return False
        live.end(EndReason.REQUESTED, reason=RetireReason.RECONNECT)
        return True

    async def drain(self, timeout: float, *, remove: bool = False) -> tuple[int, int]:
        """Write everything queued here, taking nothing new, then replace the connection
        (``remove``: then stop the slot for good; a resize removed it).

        Returns (messages, bytes) written meanwhile. Raises DrainTimeout if
        the queue did not empty in time; the connection then stays in service.
        """
        live = self.live
        if live is not None and live.sm.retiring:
            raise DrainInProgress(f"conn {self.index} is already draining")
        if live is None or live.sm.closed:
            if remove:
                self.stop()
            return 0, 0
        msgs0, bytes0 = live.tx_msgs, live.tx_bytes
        deadline = trio.current_time() + timeout
        reactor = self.group.reactor
        # The drain keeps its own deadline: on time-out the connection stays in service.
        reactor.call(live.retire, RetireReason.DRAIN, False, float("inf"))
        with trio.move_on_at(deadline):
            await live.wait_closed()
        if not live.sm.closed:
            outbox = self.group.sched.outbox_of(live)
            if outbox.pending or outbox.owners:
                reactor.call(live.resume)
                raise DrainTimeout(
                    f"conn {self.index} still had {outbox.pending} bytes queued after {timeout}s; it stays in service"
                )
            reactor.call(live.end, EndReason.REQUESTED)  # written, but the service never closed its side
        if remove:
            self.stop()
        self.log.info("drained", msgs=live.tx_msgs - msgs0, bytes=live.tx_bytes - bytes0, remove=remove)
        return live.tx_msgs - msgs0, live.tx_bytes - bytes0

    def stop(self) -> None:
        """Take no new connections (the group is stopping or shrinking)."""
        self._stopping = True
        self._run_scope.cancel()

    def close_all(self) -> None:
        """The group is gone: close every connection now (queues were flushed or given up)."""
        self.stop()
        for conn in self.conns():
            conn.end(EndReason.REQUESTED)
        if self.sm.state is not SlotState.CLOSED:
            self.sm.fire(SlotEvent.CLOSE)

    @property
    def origin(self) -> dict:
        """How its connections came to be: dialled by the slot, or attached by a uid and pid."""
        if self.peer is None:
            return {"kind": "dialled"}
        return {"kind": "attached", "uid": self.peer.uid, "pid": self.peer.pid}

    # -- statistics ---------------------------------------------------------------------------------

    def statistics(self) -> ConnStatistics:
        sched = self.group.sched
        now = self.clock()
        c = self.counters
        live = self.live if self.live is not None and not self.live.sm.closed else None
        conns = self.conns()
        queued_bytes = queued_msgs = reserved = unreserved = in_flight = 0
        need_more_hdr = msg_too_big = bad_hdr_len = 0
        for conn in conns:
            ob = sched.outbox_of(conn)
            o = ob.statistics()
            queued_bytes += o.queued_bytes
            queued_msgs += o.queued_msgs
            reserved += ob.reserved_count
            unreserved += ob.unreserved_count
            if conn.flight is not None:
                in_flight += conn.flight.count()
            d = conn.inbox.decoder.statistics()
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
            tx_msgs=c.tx_msgs,
            tx_bytes=c.tx_bytes,
            rx_msgs=c.rx_msgs,
            rx_bytes=c.rx_bytes,
            reserved=reserved,
            unreserved=unreserved,
            tx_aborts=c.tx_aborts,
            queued_bytes=queued_bytes,
            queued_msgs=queued_msgs,
            in_flight=in_flight,
            requests=live.requests if live is not None else 0,
            need_more_hdr=need_more_hdr,
            msg_too_big=msg_too_big,
            msg_timeouts=c.msg_timeouts,
            bad_hdr_len=bad_hdr_len,
            reconnects=max(0, c.connections_made - 1),
            dial_failures=c.dial_failures,
            recycles=c.recycles,
            retired=c.retired,
            retiring=len([r for r in self.retiring if not r.sm.closed]),
            skipped_msgs=c.skipped_msgs,
            skipped_bytes=c.skipped_bytes,
            last_error=self.last_error,
            tcp=read_tcp_info(sock) if sock else None,
            socket=read_socket_options(sock) if sock else None,
            tls=live.tls.statistics() if live is not None and live.tls is not None else None,
            origin=self.origin,
        )


def _fmt_addr(addr: Any) -> str:
    if not isinstance(addr, tuple):
        return str(addr)  # not an IP socket (a socket made elsewhere; the unit tests' socketpairs)
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
