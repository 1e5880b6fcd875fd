"""A group: its connection slots, its clients, and the cores between them.

Theory of operation
-------------------
The group owns the sans-IO cores, built once from its configuration, and
the objects of the shell that carry out their decisions:

* :class:`~kmuxd.core.sendq.TxScheduler`: which connection carries which
  client's messages. Clients and connections call it from their event
  handlers through its typed interface (``Owner``, ``Carrier``, ``commit``).
* the steering strategy (:mod:`kmuxd.core.steering`), chosen once from
  ``steering``: ``balance`` hands received messages round robin to ready
  receivers, and with none ready the connection stops reading (TCP pushes
  back on the server); ``id`` and ``fifo`` hand each response to the client
  whose request it answers, through the
  :class:`~kmuxd.core.router.ResponseRouter`. Written requests whose
  connection went away are written again (:mod:`kmuxd.io.retry`,
  ``retry_unanswered``) or answered with ``connection_lost``; requests past
  ``request_timeout`` get ``request_timeout`` and their late answers are
  discarded;
* :class:`~kmuxd.core.endpoints.EndpointPool`: where slots dial, and which
  endpoints are ejected; how they dial is the group's
  :class:`~kmuxd.io.sockopts.SocketPlan` (``[groups.NAME.socket]``) and
  :class:`~kmuxd.io.tls.TlsClient` (``[groups.NAME.tls]``; a reload that
  changes it replaces the live connections make-before-break);
* its slots (:mod:`kmuxd.io.slot`), each keeping one TCP connection up, and
  its clients (:mod:`kmuxd.io.session`), seen through
  :class:`~kmuxd.io.members.Client` (:mod:`kmuxd.io.members`).

**REQUEUE** (``balance`` only): a client that switched receiving off hands
back the messages queued for it before the ``receive_off`` marker; they go
to other receivers, in order, before anything newer from the same stream
would (they are sent ahead of the paused connections when a receiver
becomes ready).

**Time** lives in one trio task per group (:mod:`kmuxd.io.deadlines`),
which applies every deadline in a pass of its own. Everything else happens
in the event core.

**Counts**: one :class:`~kmuxd.core.counters.GroupCounters` record, counted
into as events happen by whoever sees them; :meth:`Group.statistics` reads
it, and the gauges (what is queued, who is connected) from their holders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from kmux.errors import ConnectionLost, DrainTimeout, KmuxError, ResponseTooBig, UnknownConnection
from kmux.protocol import Notice

from kmuxd.core.contention import Contention
from kmuxd.core.counters import GroupCounters
from kmuxd.core.endpoints import EndpointPool
from kmuxd.core.router import Flight, IdTable, Request, ResponseRouter
from kmuxd.core.sendq import TxScheduler
from kmuxd.core.states import CloseReason, RetireReason, SlotState
from kmuxd.core.steering import ReceiverRing, Steering, steering_for
from kmuxd.system.config import DaemonConfig, GroupConfig
from kmuxd.system.log import RateLimit

from .attach import AttachedPool
from .members import Client, PausedReader
from .conn import ConnStatistics
from .deadlines import Housekeeper
from .pacer import Pacer
from .retry import RetryFeeder
from .slot import Slot
from .sockopts import SocketPlan
from .statistics import ClientStatistics, GroupStatistics
from .tls import TlsClient, security_statistics

if TYPE_CHECKING:
    from .reactor import Clock, Reactor

__all__ = ["Group", "GroupStatistics", "Client"]  # Client: re-exported from .members

#: Seconds between "unmatched_response" log lines per group (all are counted).
UNMATCHED_LOG_INTERVAL = 10.0
#: Seconds between "response_skipped" log lines per group (all are counted).
SKIPPED_LOG_INTERVAL = 10.0


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 1)


class Group:
    def __init__(self, cfg: GroupConfig, daemon_cfg: DaemonConfig, log: Any, reactor: "Reactor") -> None:
        self.cfg = cfg
        self.daemon_cfg = daemon_cfg
        self.log = log.bind(group=cfg.name)
        self.reactor = reactor
        #: The shell's clock (the reactor's): every deadline of the group is read from it.
        self.clock: "Clock" = reactor.clock
        #: The one record of the group's totals (see kmuxd.core.counters).
        self.counters = GroupCounters()
        self.sched = TxScheduler()
        self.endpoints = EndpointPool(
            list(cfg.endpoints), cfg.reconnect_initial, cfg.reconnect_max,
            max_dials_per_second=cfg.max_dials_per_second, eject_after_timeouts=cfg.eject_after_timeouts,
        )
        self.check_message = cfg.framing.checker(cfg.max_message)
        #: (unpack_from, offset, header_end, adjust) of a fixed length field, or None
        self.fixed_field: Any = cfg.framing.fixed_field
        #: Bytes of a skipped response's start its connection keeps: the id, for id steering.
        self.skip_keep = cfg.id.response_offset + cfg.id.size if cfg.id is not None else 0
        self.router: ResponseRouter | None = None
        if cfg.steering in ("id", "fifo"):
            idc = cfg.id
            ids = (IdTable(idc.request_offset, idc.response_offset, idc.size, idc.rewrite)
                   if idc is not None else None)
            self.router = ResponseRouter(cfg.steering, ids, retry_unanswered=cfg.retry_unanswered)
        #: Ready receivers, round robin (balance; id/fifo for unmatched responses).
        self.receivers = ReceiverRing(cfg.rx_batch)
        #: Receive steering, chosen once (see kmuxd.core.steering).
        self.steering: Steering = steering_for(
            cfg.steering, self.receivers, self.counters, self.router,
            unmatched_to_balance=cfg.unmatched == "balance", on_unmatched=self._unmatched,
        )
        self.retry_feeder = RetryFeeder(self)
        #: Every deadline of the group, applied on a timer (see kmuxd.io.deadlines).
        self.housekeeper = Housekeeper(self)
        #: [groups.NAME.socket]: how each dial makes its socket (see kmuxd.io.sockopts).
        self.sockets = SocketPlan(cfg.name, cfg.socket)
        #: The group's TLS (context, sessions to resume); None: plaintext.
        self.tls: TlsClient | None = TlsClient(cfg.tls) if cfg.tls is not None else None
        self.slots = [self._new_slot(i) for i in range(cfg.connections)]
        #: connections apps made and passed in (op attach; kmuxd.io.attach), numbered from 1024
        self.attached = AttachedPool(self)
        #: slots removed by a resize: no connection any more, their totals still the group's
        self.removed_slots: list[Slot] = []
        self.clients: dict[int, Client] = {}
        #: Whether another client sent lately (client_max_in_flight_contended).
        self.contention = Contention()
        #: Clients held at their in-flight limit since start (each hold counted once).
        self.holds = 0
        #: balance: clients held for want of tokens (client_rate_contended).
        self.pacer = Pacer(self)
        #: balance: connections that stopped reading for want of a ready receiver
        self._paused: list[PausedReader] = []
        #: clients detached as slow consumers, until their last notice is out
        self.slow: set[Client] = set()
        self._flushed = trio.Event()
        #: someone waits in wait_flushed(): emptied outboxes must say so
        self.flush_waited = False
        self.started_at = self.clock()
        self._nursery: trio.Nursery | None = None
        self._unmatched_log = RateLimit(UNMATCHED_LOG_INTERVAL)
        self._skipped_log = RateLimit(SKIPPED_LOG_INTERVAL)

    @property
    def nursery(self) -> "trio.Nursery | None":
        """Where the group's own tasks run (None until it runs)."""
        return self._nursery

    @property
    def request_mode(self) -> bool:
        """``id`` or ``fifo`` steering: every message is a request that gets a response."""
        return self.router is not None

    # -- lifecycle -------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Dial every slot; reports started once each has connected or failed once."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            # Dial all slots at once: a blackholed endpoint costs one
            # connect_timeout at start-up, not one per slot.
            async with trio.open_nursery() as starting:
                for slot in self.slots:
                    starting.start_soon(nursery.start, slot.run)
            nursery.start_soon(self.housekeeper.run)
            up = sum(s.connected for s in self.slots)
            self.log.info("group_up", connections_up=up, connections=len(self.slots))
            task_status.started()

    def _new_slot(self, index: int) -> Slot:
        cfg = self.cfg
        return Slot(self, index, cfg.endpoints[index % len(cfg.endpoints)])

    def every_slot(self) -> list[Slot]:
        """Its dialled slots, then its attached ones."""
        return self.slots + self.attached.slots

    def slot(self, index: int) -> Slot:
        for slot in self.every_slot():
            if slot.index == index:
                return slot
        raise UnknownConnection(f"group {self.cfg.name!r} has no connection {index} (0..{len(self.slots) - 1})")

    def connection_coming(self) -> bool:
        """A slot is dialing, backing off or waiting for an endpoint: a fresh
        connection may come up (the retry feeder waits for one)."""
        return any(not slot.connected and slot.sm.state is not SlotState.CLOSED for slot in self.slots)

    @property
    def connections_up(self) -> int:
        return sum(1 for s in self.every_slot() if s.connected)

    def resize(self, cfg: GroupConfig) -> list[Slot]:
        """Apply a configuration that differs in ``connections`` (and soft settings).

        New slots are created and start dialling at once (so the statistics
        show them as soon as the reload is answered); the surplus slots (the
        highest numbers) are returned: the caller drains them with
        :meth:`shrink`. Other slots and every client are untouched.
        """
        old = len(self.slots)
        self.reconfigure(cfg)
        nursery = self._nursery
        assert nursery is not None  # the group runs
        for index in range(old, cfg.connections):
            slot = self._new_slot(index)
            self.slots.append(slot)
            nursery.start_soon(slot.run)
        surplus = self.slots[cfg.connections :]
        del self.slots[cfg.connections :]
        self.removed_slots.extend(surplus)  # their totals stay the group's
        self.log.info("group_resized", connections=cfg.connections, was=old)
        return surplus

    async def shrink(self, surplus: list[Slot]) -> None:
        """Drain the slots a resize removed (each queue written, then closed)."""
        for slot in surplus:
            try:
                await slot.drain(self.daemon_cfg.shutdown_grace, remove=True)
            except DrainTimeout:
                pass
            self.reactor.call(slot.close_all)

    def reconfigure(self, cfg: GroupConfig) -> None:
        """Settings that change in place (limits, timeouts, access): clients stay attached.

        Clients the new access policy no longer admits are told
        ``permission_denied`` and detached; what they sent and the daemon
        accepted is still written.
        """
        self.reactor.call(self._reconfigure, cfg)

    def _reconfigure(self, cfg: GroupConfig) -> None:
        tls_changed = cfg.tls != self.cfg.tls
        self.cfg = cfg
        self.sockets = self.sockets.reconfigured(cfg.socket)
        if tls_changed:
            self._renew_tls(cfg)
        self.endpoints.reconfigure(cfg.max_dials_per_second, cfg.eject_after_timeouts)
        if self.router is not None:
            self.router.reconfigure(cfg.retry_unanswered)
        for client in list(self.clients.values()):
            client.check_access(cfg.access, cfg.name)

    def _renew_tls(self, cfg: GroupConfig) -> None:
        """[groups.NAME.tls] or its files changed: new connections use the new
        settings, and the connections up now are replaced make-before-break
        (as a recycle: each keeps its work until its replacement is dialled)."""
        self.tls = TlsClient(cfg.tls) if cfg.tls is not None else None
        replaced = sum(slot.retire_if_at(None, RetireReason.TLS_RENEWED) for slot in self.slots)
        self.log.info("tls_renewed", tls=cfg.tls is not None, connections_replaced=replaced)

    async def stop(self) -> None:
        """Stop the group: stop reading its clients (each told the last seq read),
        flush what they sent, then release them and close its connections."""
        self.reactor.call(self._stop_reading)
        with trio.move_on_after(self.daemon_cfg.shutdown_grace):
            await self.wait_flushed()
        left = self.queued_total()
        self.reactor.call(self._close_all)
        self.log.info("group_stopped", queued_bytes_lost=left)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _stop_reading(self) -> None:
        for client in list(self.clients.values()):
            client.stop_reading(Notice(event="shutdown", details={"accepted": client.seq}))

    def _close_all(self) -> None:
        for client in list(self.clients.values()):
            client.close(CloseReason.GROUP_STOPPED)
        for slot in self.every_slot():
            slot.close_all()

    async def wait_flushed(self) -> None:
        """Wait until nothing accepted is left unwritten (no polling: flushes wake us)."""
        while self.queued_total():
            self._flushed = trio.Event()
            self.flush_waited = True
            try:
                await self._flushed.wait()
            finally:
                self.flush_waited = False

    def note_flushed(self) -> None:
        """A connection's outbox emptied: wake wait_flushed() if everything is written."""
        if self.flush_waited and not self.queued_total():
            self._flushed.set()

    def queued_total(self) -> int:
        """Bytes accepted and not yet written, anywhere in the group."""
        total = sum(s.queued_bytes() for s in self.every_slot() + self.removed_slots)
        return total + self.sched.statistics().orphaned_bytes

    def set_daemon_config(self, daemon_cfg: DaemonConfig) -> None:
        self.daemon_cfg = daemon_cfg

    # -- clients ---------------------------------------------------------------------------

    def attach(self, client: Client, receive: bool) -> None:
        self.clients[client.id] = client
        self.counters.clients_joined += 1
        if receive and self.receivers.receive_on(client):
            self.receiver_ready()

    def detach(self, client: Client) -> None:
        """The client left, or was detached (it is ``gone``): its accepted messages still go out."""
        if self.clients.pop(client.id, None) is None:
            return
        self.counters.clients_left += 1
        self.receivers.remove(client)
        self.sched.forget(client)
        self.pacer.forget(client)

    def detach_slow(self, client: Client) -> None:
        """A slow consumer: detached now, closed once its last notice is out (or its grace ends)."""
        self.detach(client)
        self.slow.add(client)

    def forget_slow(self, client: Client) -> None:
        self.slow.discard(client)

    # -- balance steering -------------------------------------------------------------

    def receiver_ready(self) -> None:
        """A receiver can take messages: requeued ones first, then paused connections."""
        self.reactor.call_soon(self._feed_receivers)

    def _feed_receivers(self) -> None:
        if not self.steering.pump_requeued():
            return
        paused, self._paused = self._paused, []
        for conn in paused:
            conn.resume_reading()

    def wait_for_receiver(self, conn: PausedReader) -> None:
        """Balance: ``conn`` has messages no receiver could take; it reads again when one can."""
        self._paused.append(conn)

    def requeue(self, message: bytes) -> None:
        """A client handed back a message (validated by its session): it goes out first."""
        self.steering.requeue(message)
        self.receiver_ready()

    # -- request/response steering ---------------------------------------------------------

    def _unmatched(self, flight: Flight, nbytes: int) -> None:
        """A response matched no request (counted by the router): say so, rate-limited."""
        if self._unmatched_log.allow(self.clock()):
            self.log.warning("unmatched_response", conn=flight.conn.slot.index, bytes=nbytes,
                             policy=self.cfg.unmatched, suppressed=self._unmatched_log.take_suppressed())

    def response_skipped(self, conn: int, req: Request | None, size: int) -> None:
        """A message over max_message went by unread on connection ``conn`` (steering
        counted it): ``req``'s client is told ``response_too_big``; logged, rate-limited."""
        max_message = self.cfg.max_message
        if req is not None:
            self.tell(req, ResponseTooBig(
                f"the response was {size} bytes, over the group's max_message ({max_message}); "
                f"it was skipped and the connection carries on", size=size, max_message=max_message))
        if self._skipped_log.allow(self.clock()):
            self.log.warning("response_skipped", conn=conn, bytes=size, max_message=max_message,
                             seq=req.seq if req is not None else None, steering=self.cfg.steering,
                             suppressed=self._skipped_log.take_suppressed())

    def settle_lost(self, flight: Flight, why: str) -> None:
        """A connection with written requests went away: retry them or tell their clients."""
        router = self.router
        assert router is not None  # a flight exists only in id/fifo steering
        notify, retry = router.lost(flight)
        for req in notify:
            self.tell(req, ConnectionLost(f"the connection carrying this request went away ({why})"))
        if retry:
            self.retry_feeder.add(retry)

    def tell(self, req: Request, err: KmuxError) -> None:
        """The one outcome of ``req`` is this error: a notice to its client, naming it."""
        err.details["seq"] = req.seq
        if req.orig_id is not None:
            err.details["id"] = req.id_value()
        owner = req.owner
        if not owner.gone:
            owner.notify(Notice.for_error(err))

    def flight_room(self, client: Any) -> int | None:
        """How many more requests ``client`` may have accepted now (0: none until one
        is answered or told; in balance, messages under client_rate_contended, see
        :mod:`kmuxd.io.pacer`). None: no limit applies, as while it is the group's
        only client (nobody's answer can wait behind its).

        The limit is client_max_in_flight, and client_max_in_flight_contended
        while another client sent within contention_window: a request is
        answered after those the server already holds, so a light client's
        round trip grows with every request a heavy one keeps in flight."""
        router = self.router
        if len(self.clients) < 2:
            return None
        if router is None:
            return self.pacer.room(client)
        cfg = self.cfg
        limit = cfg.client_max_in_flight
        contended = cfg.client_max_in_flight_contended
        if contended and (not limit or contended < limit) and \
                self.contention.contended(client.id, self.clock(), cfg.contention_window):
            limit = contended
        return router.room_for(client, limit)

    # -- time ----------------------------------------------------------------------------------

    def apply_deadlines(self, now: float) -> None:
        """Every deadline of the group at ``now`` (inside a pass; see kmuxd.io.deadlines)."""
        self.housekeeper.apply(now)

    # -- statistics ---------------------------------------------------------------

    def statistics(self) -> GroupStatistics:
        c = self.counters
        sched = self.sched
        queues = [sched.outbox_of(conn).statistics() for s in self.every_slot() + self.removed_slots for conn in s.conns()]
        sstats = sched.statistics()
        r = self.router.statistics() if self.router is not None else None
        up = self.connections_up
        now = self.clock()
        return GroupStatistics(
            name=self.cfg.name,
            endpoints=tuple(str(e) for e in self.cfg.endpoints),
            framing=self.cfg.framing.name,
            steering=self.cfg.steering,
            connections_up=up,
            connections_total=len(self.slots) + len(self.attached.slots),
            clients=len(self.clients),
            receivers_ready=self.receivers.statistics().ready,
            tx_msgs=c.tx_msgs,
            tx_bytes=c.tx_bytes,
            rx_msgs=c.rx_msgs,
            rx_bytes=c.rx_bytes,
            tx_retries=c.tx_retries,
            clients_joined=c.clients_joined,
            clients_left=c.clients_left,
            rx_ready_drops=0,
            rx_paused=c.rx_paused,
            queued_msgs=sum(q.queued_msgs for q in queues) + sstats.orphaned_msgs,
            queued_bytes=sum(q.queued_bytes for q in queues) + sstats.orphaned_bytes,
            waiting_clients=sstats.waiting_clients,
            clients_held=sum(1 for client in self.clients.values() if client.awaiting_answers),
            holds=self.holds,
            clients_paced=len(self.pacer.held),
            paces=self.pacer.holds,
            refused=c.refused,
            requeued=c.requeued,
            notices_sent=c.notices_sent,
            requests_in_flight=r.in_flight if r else 0,
            unmatched_responses=r.unmatched if r else 0,
            late_responses=r.late if r else 0,
            dropped_responses=r.dropped if r else 0,
            requests_failed=r.failed if r else 0,
            requests_timed_out=r.timed_out if r else 0,
            requests_retried=r.retried if r else 0,
            retries_exhausted=r.retries_exhausted if r else 0,
            queue_timeouts=c.queue_timeouts,
            slow_consumers=c.slow_consumers,
            responses_dropped=c.responses_dropped,
            rx_queued_bytes=sum(client.queued_response_bytes() for client in self.clients.values()),
            dropped_unread=c.dropped_unread,
            recycles=c.recycles,
            skipped_msgs=c.skipped_msgs,
            skipped_bytes=c.skipped_bytes,
            connections_degraded=up < self.cfg.min_connections,
            down=up == 0,
            latency_p50_us=_us(r.latency_p50) if r else None,
            latency_p99_us=_us(r.latency_p99) if r else None,
            uptime=now - self.started_at,
            access=self.cfg.access.to_wire(),
            endpoint_health=tuple(self.endpoints.statistics(now)),
            socket=self.sockets.statistics(),
            security=security_statistics(self.cfg, self.tls),
        )

    def connection_statistics(self) -> list[ConnStatistics]:
        return [s.statistics() for s in self.every_slot()]

    def client_statistics(self) -> list[ClientStatistics]:
        return [c.statistics() for c in self.clients.values()]

