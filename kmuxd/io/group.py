"""A group: its connection slots, its clients, and the steering between them.

Theory of operation
-------------------
The group owns the sans-IO cores and carries out their decisions:

* :class:`~kmuxd.core.sendq.TxScheduler`: which connection carries which
  client's messages (the clients and connections call it directly from
  their event handlers; the group wakes whoever it says may read again);
* :class:`~kmuxd.core.steering.BalanceSteering` (``balance``): received
  messages go round robin to ready receivers, ``rx_batch`` at a time; with
  none ready the connection stops reading and TCP pushes back on the server;
* :class:`~kmuxd.core.router.ResponseRouter` (``id`` and ``fifo``): each
  response goes to the client whose request it answers (with the client's
  own id put back, in ``id`` mode with rewrite). A client that is not
  reading gets its responses queued in its own bounded queue, so the
  connection never waits for it. Written requests whose connection went
  away are written again (:class:`RetryFeeder`, ``retry_unanswered``) or
  answered with ``connection_lost``; requests past ``request_timeout`` get
  ``request_timeout`` and their late answers are discarded;
* :class:`~kmuxd.core.endpoints.EndpointPool`: where slots dial, and which
  endpoints are ejected.

**REQUEUE** (``balance`` only): a client that switched receiving off hands
back the messages queued for it before the ``receive_off`` marker; they go
to other receivers, in order, before anything newer from the same stream
would (they are sent ahead of the paused connections when a receiver
becomes ready).

**Time** lives in one trio task per group, :meth:`Group._housekeeping`,
which ticks at a quarter of the shortest timeout in use (10 ms to 0.5 s)
and applies every deadline: ``request_timeout``, ``queue_timeout`` (clients
waiting for a connection, and orphaned outboxes nobody adopted),
``assembly_timeout`` (connections and clients with a partial message), the
end of a retiring connection, ``max_connection_age``, and
``client_idle_timeout``. Everything else happens in the event core.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from kmux.errors import (
    BadFrame,
    BadPacket,
    ConnectionLost,
    DrainTimeout,
    GroupUnavailable,
    IdleTimeout,
    PermissionDenied,
    RequestTimeout,
    UnknownConnection,
)
from kmux.protocol import KIND_DATA, Notice

from kmuxd.core.endpoints import EndpointPool, EndpointStatistics
from kmuxd.core.router import PENDING, IdTable, ResponseRouter
from kmuxd.core.sendq import TxScheduler
from kmuxd.core.states import ConnState, SlotState
from kmuxd.core.steering import BalanceSteering
from kmuxd.system.config import DaemonConfig, GroupConfig
from kmuxd.system.log import RateLimit

from .conn import ConnStatistics, Slot
from .tls import SecurityStatistics, TlsClient, security_statistics

if TYPE_CHECKING:
    from .reactor import Reactor
    from .session import AppSession, ClientStatistics

__all__ = ["Group", "GroupStatistics"]

#: Bounds of the housekeeping tick, seconds.
TICK_MIN = 0.01
TICK_MAX = 0.5
#: Most unread packets refused per client per tick when queue_timeout expires.
QUEUE_REFUSALS_PER_TICK = 10_000
#: Seconds retried requests wait for a fresh connection before taking the freshest one.
RETRY_FRESH_WAIT = 0.25
#: Seconds between "unmatched_response" log lines per group (all are counted).
UNMATCHED_LOG_INTERVAL = 10.0


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 1)


@dataclass(frozen=True, slots=True)
class GroupStatistics:
    name: str
    endpoints: tuple[str, ...]
    framing: str
    steering: str
    connections_up: int
    connections_total: int
    clients: int
    receivers_ready: int
    #: Messages/bytes written to TCP, and received from TCP and steered.
    tx_msgs: int
    tx_bytes: int
    rx_msgs: int
    rx_bytes: int
    #: Messages re-sent from byte 0 after their connection failed.
    tx_retries: int
    #: Clients attached / detached since start (KCM attach/unattach).
    attached: int
    unattached: int
    #: KCM's rx_ready_drops: always 0 here, parsing pauses instead.
    rx_ready_drops: int
    #: Times parsing paused because no receiver was ready.
    rx_paused: int
    #: Messages accepted and not yet written / bytes of them.
    queued_msgs: int
    queued_bytes: int
    #: Clients waiting for any connection to come free.
    waiting_clients: int
    refused: int
    requeued: int
    #: Notices (per-message errors and events) sent to clients.
    notices_sent: int
    #: Request/response steering: requests awaiting a response, responses
    #: that matched none, and request latency from a bounded histogram (µs).
    requests_in_flight: int
    unmatched_responses: int
    #: Responses that came after their request timed out, and responses for
    #: clients that had left: both discarded.
    late_responses: int
    dropped_responses: int
    #: Requests answered with connection_lost / request_timeout notices.
    requests_failed: int
    requests_timed_out: int
    #: Requests written again after their connection went away, and
    #: requests whose retries ran out.
    requests_retried: int
    retries_exhausted: int
    #: Messages refused with group_unavailable (they waited queue_timeout).
    queue_timeouts: int
    #: Clients detached as slow consumers; responses dropped (rx_overflow = "drop").
    slow_consumers: int
    responses_dropped: int
    #: Bytes of responses waiting in the daemon for clients that do not read.
    rx_queued_bytes: int
    #: Packets clients sent that were never read (dropped when they left).
    dropped_unread: int
    #: Connections retired to be replaced (make-before-break) and server recycles.
    recycles: int
    #: Fewer connections up than min_connections; no connection up at all.
    connections_degraded: bool
    down: bool
    latency_p50_us: float | None
    latency_p99_us: float | None
    uptime: float
    #: Who may use the group (kmuxd.core.access.AccessPolicy.to_wire()).
    access: dict
    endpoint_health: tuple[EndpointStatistics, ...]
    #: TLS and handshake steps ([groups.NAME.tls], [[groups.NAME.handshake]]).
    security: SecurityStatistics | None = None


class RetryFeeder:
    """The owner of retried requests: it waits for a connection like a client
    and writes their kept bytes (with fresh wire ids) when one has room.

    A retry must not be lost again with the next recycle. Servers that close
    after N requests close their connections at about the same time, so:

    * once the endpoint's limit is known (the fewest answers its recycled
      connections gave, :meth:`EndpointPool.requests_per_connection`), a
      connection takes retries only up to half of it, counting what it
      carried already; the rest wait for fresher connections (each slot dials
      its replacement at once) while one is on its way, within
      ``queue_timeout`` (then ``group_unavailable``) and ``request_timeout``.
      When none is coming (every slot up, so the close that taught the limit
      was not a rule of the server's) they wait ``RETRY_FRESH_WAIT``, then
      take the freshest connection;
    * before any limit is known, retries wait up to ``RETRY_FRESH_WAIT`` for
      a connection that carried nothing yet, then take the freshest one.
    """

    gone = False

    def __init__(self, group: "Group") -> None:
        self.group = group
        #: retried requests and when each was queued, oldest first
        self.queue: deque = deque()

    def count_written(self, msgs: int, nbytes: int) -> None:
        pass

    def add(self, reqs: list) -> None:
        now = time.monotonic()
        self.queue.extend((req, now) for req in reqs)
        self.wake()

    def wake(self) -> None:
        if self.queue:
            self.group.reactor.call_soon(self.feed)

    def feed(self) -> None:
        group = self.group
        sched = group.sched
        router = group.router
        queue = self.queue
        if router is None:
            return  # only id/fifo steering retries
        while queue:
            conn = sched.route_fresh(self, _requests_carried)
            if conn is None:
                return  # woken when a connection comes free
            limit = group.endpoints.requests_per_connection(conn.endpoint)
            waited = time.monotonic() - queue[0][1]
            if limit is not None:
                # Its place in the stream: what was written on it, and what waits in
                # its outbox (an adopted orphan's requests included).
                room = limit // 2 - conn.flight_total - len(sched.outbox_of(conn).requests)
                if room <= 0 and waited >= RETRY_FRESH_WAIT and not group.connection_coming():
                    # The limit came from one close that need not repeat, and nothing
                    # fresher is on its way: waiting could only end in group_unavailable.
                    room = len(queue)
            elif conn.requests and waited < RETRY_FRESH_WAIT:
                room = 0
            else:
                room = len(queue)
            if room <= 0:
                # Not fresh enough: give it back; Conn.start wakes us for a new one.
                group.wake(sched.committed(self, conn, sched.outbox_of(conn).tail, 0))
                return
            outbox = sched.outbox_of(conn)
            outbox.has_room()
            buf = outbox.buf
            tail = outbox.tail
            msgs = 0
            while queue and msgs < room and tail - outbox.head < outbox.capacity and len(buf) - tail >= outbox.reserve:
                req, _ = queue.popleft()
                if req.state != PENDING:
                    router.refused(req)  # timed out meanwhile: its id is given back, nobody is told twice
                    continue
                payload = req.payload
                assert payload is not None  # kept for every request while retries are on
                buf[tail : tail + len(payload)] = payload
                tail += len(payload)
                outbox.requests.append(req)
                msgs += 1
            group.wake(sched.committed(self, conn, tail, msgs))
            if msgs:
                conn.accepted(msgs)
                conn.flush_soon()
            else:
                return

    def expire(self, now: float, timeout: float) -> list:
        """Retries that waited ``timeout`` for a connection: never written (returned)."""
        out = []
        queue = self.queue
        while queue and now - queue[0][1] >= timeout:
            out.append(queue.popleft()[0])
        return out


def _requests_carried(conn: Any) -> int:
    return conn.flight_total


class Group:
    def __init__(self, cfg: GroupConfig, daemon_cfg: DaemonConfig, log: Any, reactor: "Reactor") -> None:
        self.cfg = cfg
        self.daemon_cfg = daemon_cfg
        self.log = log.bind(group=cfg.name)
        self.reactor = reactor
        self.sched = TxScheduler()
        self.endpoints = EndpointPool(
            list(cfg.endpoints), cfg.reconnect_initial, cfg.reconnect_max,
            max_dials_per_second=cfg.max_dials_per_second, eject_after_timeouts=cfg.eject_after_timeouts,
        )
        self.steering = BalanceSteering(cfg.rx_batch)
        self.check_message = cfg.framing.checker(cfg.max_message)
        #: (unpack_from, offset, header_end, adjust) of a fixed length field, or None
        self.fixed_field: Any = cfg.framing.fixed_field
        self.router: ResponseRouter | None = None
        if cfg.steering in ("id", "fifo"):
            idc = cfg.id
            ids = (IdTable(idc.request_offset, idc.response_offset, idc.size, idc.rewrite)
                   if idc is not None else None)
            self.router = ResponseRouter(cfg.steering, ids, retry_unanswered=cfg.retry_unanswered)
        self.request_mode = self.router is not None
        self.retry_feeder = RetryFeeder(self)
        #: The group's TLS (context, sessions to resume); None: plaintext.
        self.tls: TlsClient | None = TlsClient(cfg.tls) if cfg.tls is not None else None
        self.slots = [self._new_slot(i) for i in range(cfg.connections)]
        #: slots removed by a resize: no connection any more, but their traffic counts
        self.retired_slots: list[Slot] = []
        self.clients: dict[int, "AppSession"] = {}
        #: balance: connections that stopped reading for want of a ready receiver
        self.paused: list = []
        #: clients detached as slow consumers, until their last notice is out
        self.slow: set = set()
        self._requeued: deque[bytes] = deque()
        self._flushed = trio.Event()
        #: someone waits in wait_flushed(): emptied outboxes must say so
        self.flush_waited = False
        self.started_at = time.monotonic()
        self._nursery: trio.Nursery | None = None
        # counters
        self.tx_retries = 0
        self.rx_msgs = self.rx_bytes = 0
        self.attached = self.unattached = 0
        self.rx_paused = 0
        self.queue_timeouts = 0
        self.slow_consumers = 0
        self.responses_dropped = 0
        self.dropped_unread = 0
        self.dropped_rx_msgs = 0
        self.recycles = 0
        self._departed_refused = self._departed_requeued = self._departed_notices = 0
        self._departed_tx = [0, 0]
        self._unmatched_log = RateLimit(UNMATCHED_LOG_INTERVAL)

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
            nursery.start_soon(self._housekeeping)
            up = sum(s.connected for s in self.slots)
            self.log.info("group_up", connections_up=up, connections=len(self.slots))
            task_status.started()

    def _new_slot(self, index: int) -> Slot:
        cfg = self.cfg
        return Slot(self, index, cfg.endpoints[index % len(cfg.endpoints)])

    def slot(self, index: int) -> Slot:
        for slot in self.slots:
            if slot.index == index:
                return slot
        raise UnknownConnection(f"group {self.cfg.name!r} has no connection {index} (0..{len(self.slots) - 1})")

    def connection_coming(self) -> bool:
        """A slot is dialing, backing off or waiting for an endpoint: a fresh
        connection may come up (the retry feeder waits for one)."""
        return any(not slot.connected and slot.sm.state is not SlotState.CLOSED for slot in self.slots)

    @property
    def connections_up(self) -> int:
        return sum(1 for s in self.slots if s.connected)

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
        self.retired_slots.extend(surplus)  # their counts stay in the group's totals
        self.log.info("group_resized", connections=cfg.connections, was=old)
        return surplus

    async def shrink(self, surplus: list[Slot]) -> None:
        """Drain the slots a resize removed (each queue written, then closed)."""
        for slot in surplus:
            try:
                await slot.drain(self.daemon_cfg.shutdown_grace, retire=True)
            except DrainTimeout:
                pass
            slot.close_all()
            self.reactor.end_pass()

    def reconfigure(self, cfg: GroupConfig) -> None:
        """Settings that change in place (limits, timeouts, access): clients stay attached.

        Clients the new access policy no longer admits are told
        ``permission_denied`` and detached; what they sent and the daemon
        accepted is still written.
        """
        tls_changed = cfg.tls != self.cfg.tls
        self.cfg = cfg
        if tls_changed:
            self._renew_tls(cfg)
        self.endpoints.rate = cfg.max_dials_per_second
        self.endpoints.burst = max(1.0, cfg.max_dials_per_second)
        self.endpoints.eject_after_timeouts = cfg.eject_after_timeouts
        if self.router is not None:
            self.router.retry_unanswered = cfg.retry_unanswered
            self.router.keep_payload = cfg.retry_unanswered > 0
        for client in list(self.clients.values()):
            if cfg.access.groups is not None:
                # The hello reads supplementary groups only when the policy of
                # the day needs them: read them now, or a client the new
                # allow_groups admits only through one would be detached.
                client.cred = client.cred.with_groups(client.sock)
            cred = client.cred
            if not cfg.access.admits(cred.uid, cred.gid, cred.groups):
                client.log.info("client_no_longer_admitted", uid=cred.uid, pid=cred.pid)
                client.stop_reading(Notice.for_error(PermissionDenied(
                    f"group {cfg.name!r} no longer admits this client (reload)"
                )))
                client.close("access revoked by a reload")
        self.reactor.end_pass()

    def _renew_tls(self, cfg: GroupConfig) -> None:
        """[groups.NAME.tls] or its files changed: new connections use the new
        settings, and the connections up now are replaced make-before-break
        (as a recycle: each keeps its work until its replacement is dialled)."""
        self.tls = TlsClient(cfg.tls) if cfg.tls is not None else None
        replaced = 0
        for slot in self.slots:
            live = slot.live
            if live is not None and live.taking:
                live.retire("TLS settings or files changed (reload)", recycle=True)
                replaced += 1
        self.log.info("tls_renewed", tls=cfg.tls is not None, connections_replaced=replaced)

    async def retire(self) -> None:
        """Stop the group: stop reading its clients (each told the last seq read),
        flush what they sent, then release them and close its connections."""
        for client in list(self.clients.values()):
            client.stop_reading(Notice(event="shutdown", details={"accepted": client.seq}))
        self.reactor.end_pass()
        with trio.move_on_after(self.daemon_cfg.shutdown_grace):
            await self.wait_flushed()
        for client in list(self.clients.values()):
            client.close("group retired")
        left = self.queued_total()
        for slot in self.slots:
            slot.close_all()
        self.reactor.end_pass()
        self.log.info("group_retired", queued_bytes_lost=left)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

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

    def attach(self, client: "AppSession", receive: bool) -> None:
        self.clients[client.id] = client
        self.attached += 1
        self.steering.add(client, receiving=False)  # turned on by the session's state
        if receive and self.steering.receive_on(client):
            self.receiver_ready()

    def detach(self, client: "AppSession") -> None:
        if self.clients.pop(client.id, None) is None:
            return
        self.unattached += 1
        client.gone = True  # responses still on their way to it are dropped
        self.steering.remove(client)
        self.wake(self.sched.forget(client))
        # Its accepted messages still go out; keep its counts in the totals.
        self._departed_refused += client.refused
        self._departed_requeued += client.requeued
        self._departed_notices += client.notices_sent

    def wake(self, owners: list) -> None:
        """Let woken owners (clients, the retry feeder) try the scheduler again."""
        for owner in owners:
            owner.wake()

    def after_adoption(self) -> None:
        """Connections that adopted an orphaned outbox write it."""
        if self.sched.to_flush:
            for conn in self.sched.take_flush():
                conn.flush_soon()

    def queued_total(self) -> int:
        """Bytes accepted and not yet written, anywhere in the group."""
        sched = self.sched
        total = sum(sched.outbox_of(c).pending for s in self.slots + self.retired_slots
                    for c in s.conns() if not c.ended)
        return total + sched.statistics().orphaned_bytes

    def set_daemon_config(self, daemon_cfg: DaemonConfig) -> None:
        self.daemon_cfg = daemon_cfg

    # -- balance steering -------------------------------------------------------------

    def receiver_ready(self) -> None:
        """A receiver can take messages: requeued ones first, then paused connections."""
        self.reactor.call_soon(self._feed_receivers)

    def _feed_receivers(self) -> None:
        if self._requeued and not self._pump_requeued():
            return
        paused, self.paused = self.paused, []
        for conn in paused:
            conn.resume()

    def steer_balance(self, conn: Any) -> bool:
        """Hand the connection's ready messages to ready receivers. False if some remain."""
        if self._requeued:
            return False  # handed-back messages go first
        inbox = conn.inbox
        ends = inbox.ends
        buf, view = inbox.buf, inbox.view
        pos = inbox.head
        i = 0
        count = len(ends)
        steering = self.steering
        total_bytes = 0
        while i < count:
            receiver, quota = steering.take()
            if receiver is None:
                break
            send = receiver.sock.send
            limit = receiver.max_packet - 1
            k = 0
            start = pos
            try:
                while k < quota and i < count:
                    end = ends[i]
                    if end - pos > limit:
                        # Too large for one packet: the receiver's queue sends it in pieces.
                        receiver.send_message(view[pos:end])
                        pos = end
                        i += 1
                        k += 1
                        break
                    # The byte before the message is already steered (or the
                    # inbox's scratch byte): the kind byte goes there.
                    buf[pos - 1] = KIND_DATA
                    send(view[pos - 1 : end])
                    pos = end
                    i += 1
                    k += 1
            except BlockingIOError:
                receiver.rx_blocked()
            except OSError as exc:
                # It can take nothing: out of the ring, and the message that
                # failed (not consumed) goes to the next ready receiver at once.
                # An app that closed is detached on its hang-up; one that shut
                # down only its reading side stays attached, receiving nothing.
                receiver.socket_error("send", exc)
                steering.remove(receiver)
            else:
                steering.used(k)
            receiver.rx_msgs += k
            receiver.rx_bytes += pos - start
            total_bytes += pos - start
        self.rx_msgs += i
        self.rx_bytes += total_bytes
        conn.rx_msgs += i
        if i:
            conn.answered = True
        inbox.take(i, pos)
        if i == count:
            return True
        self.rx_paused += 1
        return False

    def requeue(self, client: "AppSession", message: bytes) -> None:
        """A client hands back a message it got before switching receiving off."""
        if self.request_mode:
            raise BadPacket(
                f"REQUEUE is only for balance steering; with steering = {self.cfg.steering!r} "
                "every response belongs to the client that asked"
            )
        if client.receiving:
            raise BadPacket("REQUEUE is only allowed while receiving is off")
        if client.requeued + 1 > client.rx_msgs or client.requeue_bytes + len(message) > client.rx_bytes:
            raise BadPacket("REQUEUE of more messages than were delivered to this client")
        if self.check_message(message, 0, len(message)) is not None:
            raise BadFrame("requeued message is not one well-framed message")
        client.requeued += 1
        client.requeue_bytes += len(message)
        self._requeued.append(message)
        self.receiver_ready()

    def _pump_requeued(self) -> bool:
        """Send handed-back messages to ready receivers. True when none is left."""
        queue = self._requeued
        steering = self.steering
        while queue:
            receiver, quota = steering.take()
            if receiver is None:
                return False
            k = 0
            try:
                while k < quota and queue:
                    message = queue[0]
                    if len(message) >= receiver.max_packet:
                        receiver.send_message(message)
                    else:
                        receiver.sock.send(b"\x00" + message)
                    receiver.rx_msgs += 1
                    receiver.rx_bytes += len(queue.popleft())
                    k += 1
            except BlockingIOError:
                receiver.rx_blocked()
            except OSError as exc:
                receiver.socket_error("send", exc)
                steering.remove(receiver)  # as in steer_balance: the message stays first in line
            else:
                steering.used(k)
        return True

    # -- request/response steering ---------------------------------------------------------

    def steer_responses(self, conn: Any) -> None:
        """Each response to the client whose request it answers (id or fifo); never waits."""
        inbox = conn.inbox
        ends = inbox.ends
        buf, view = inbox.buf, inbox.view
        pos = inbox.head
        router = self.router
        assert router is not None  # called only in id/fifo steering
        ids = router.ids
        flight = conn.flight
        pending = self.sched.outbox_of(conn).requests
        now = time.monotonic()
        answered = 0
        nbytes = 0
        for end in ends:
            req = router.match(flight, pending, buf, pos, end - pos)
            if req is None:
                self._unmatched(conn, view, pos, end)
            elif router.answered(req, now):
                if ids is not None:
                    ids.restore(req, buf, pos)
                if req.owner.send_response(buf, view, pos, end, req.seq):
                    answered += 1
                    nbytes += end - pos
                else:
                    router.dropped += 1
            pos = end
        count = len(ends)
        inbox.take(count, pos)
        conn.rx_msgs += count
        self.rx_msgs += answered
        self.rx_bytes += nbytes
        if answered:
            if not conn.answered:
                conn.answered = True
            self.endpoints.answered(conn.endpoint)
        if conn.state is ConnState.DRAINING:
            conn.maybe_finish_retiring()

    def _unmatched(self, conn: Any, view: memoryview, pos: int, end: int) -> None:
        if self._unmatched_log.allow():
            self.log.warning("unmatched_response", conn=conn.slot.index, bytes=end - pos, policy=self.cfg.unmatched,
                             suppressed=self._unmatched_log.take_suppressed())
        if self.cfg.unmatched == "balance":
            receiver, _ = self.steering.take()
            if receiver is None:
                return
            try:
                receiver.send_message(view[pos:end])
            except OSError as exc:
                receiver.socket_error("send", exc)
                self.steering.remove(receiver)  # best effort: the unmatched response is dropped
            else:
                self.steering.used(1)

    def settle_lost(self, flight: Any, why: str) -> None:
        """A connection with written requests went away: retry them or tell their clients."""
        router = self.router
        assert router is not None  # a flight exists only in id/fifo steering
        notify, retry = router.lost(flight)
        for req in notify:
            self._tell(req, ConnectionLost(f"the connection carrying this request went away ({why})"))
        if retry:
            self.retry_feeder.add(retry)

    def _tell(self, req: Any, err: Any) -> None:
        err.details["seq"] = req.seq
        if req.orig_id is not None:
            err.details["id"] = req.id_value()
        if not req.owner.gone:
            req.owner.notify(Notice.for_error(err))

    # -- time ----------------------------------------------------------------------------------

    def _tick(self) -> float:
        cfg = self.cfg
        timeouts = [t for t in (cfg.request_timeout, cfg.queue_timeout, cfg.assembly_timeout,
                                cfg.client_idle_timeout, cfg.max_connection_age) if t > 0]
        return min(TICK_MAX, max(TICK_MIN, min(timeouts, default=TICK_MAX * 4) / 4))

    async def _housekeeping(self) -> None:
        while True:
            await trio.sleep(self._tick())
            self.apply_deadlines(time.monotonic())
            self.reactor.end_pass()

    def apply_deadlines(self, now: float) -> None:
        cfg = self.cfg
        router = self.router
        if self.retry_feeder.queue:
            self.retry_feeder.feed()
        if router is not None and cfg.request_timeout > 0:
            for req in router.expire(now, cfg.request_timeout):
                self._tell(req, RequestTimeout(f"no response within request_timeout={cfg.request_timeout}s"))
                flight = req.flight
                if flight is not None and self.endpoints.request_timed_out(flight.conn.endpoint, now):
                    self._retire_endpoint(flight.conn.endpoint)
        if cfg.queue_timeout > 0:
            self._expire_queued(now, cfg.queue_timeout)
        for slot in self.slots:
            for conn in slot.conns():
                if conn.ended:
                    continue
                if conn.assembly_expired(now):
                    continue
                conn.retire_expired(now)
                if cfg.max_connection_age and conn.taking and conn.age(now) >= cfg.max_connection_age:
                    conn.retire("max_connection_age", recycle=True)
        idle = cfg.client_idle_timeout
        for client in list(self.clients.values()):
            if client.open is not None:
                client.open.expire(now)
            if idle:
                self._check_idle(client, now, idle)
        # Slow consumers are detached (not in self.clients) while their last notice drains.
        for client in list(self.slow):
            if client.closing_deadline is not None and now >= client.closing_deadline:
                client.close("slow consumer")

    def _check_idle(self, client: "AppSession", now: float, idle: float) -> None:
        mark = (client.seq, client.rx_msgs, client.notices_sent, len(client.txq))
        if client.idle_mark != mark:
            client.idle_mark = mark
            client.idle_since = now
            return
        if now - client.idle_since >= idle:
            client.log.info("client_idle", idle_seconds=round(now - client.idle_since, 3))
            client.stop_reading(Notice.for_error(IdleTimeout(
                f"sent and received nothing for client_idle_timeout={idle}s; detached"
            )))
            client.close("idle")

    def _expire_queued(self, now: float, timeout: float) -> None:
        up = self.connections_up
        # With no connection up, say why: the last failed dial (a refused
        # connect, a TLS certificate, a handshake step), so an app's error names it.
        why = next((s.last_error for s in self.slots if s.last_error), None) if up == 0 else None

        def unavailable() -> GroupUnavailable:
            return GroupUnavailable(
                f"no connection of group {self.cfg.name!r} took this message within queue_timeout={timeout}s "
                f"({up}/{len(self.slots)} connections up{f'; last failure: {why}' if why else ''}); "
                "it was not written and never will be"
            )

        for client in list(self.clients.values()):
            since = client.blocked_since
            if since is not None and now - since >= timeout and client.reading:
                n = client.refuse_unread(unavailable, QUEUE_REFUSALS_PER_TICK)
                self.queue_timeouts += n
                client.blocked_since = now
        router = self.router
        if router is not None:
            for req in self.retry_feeder.expire(now, timeout):
                if router.refused(req):
                    self.queue_timeouts += 1
                    self._tell(req, unavailable())
        expired, wake = self.sched.expire_orphans(now, timeout)
        for outbox in expired:
            owner = outbox.open_owner
            if owner is not None and owner.open is not None:
                owner.open.abort(unavailable())
            if self.router is not None:
                for req in list(outbox.requests):
                    if self.router.refused(req):
                        self.queue_timeouts += 1
                        self._tell(req, unavailable())
                outbox.requests.clear()
            else:
                for owner, first_seq, msgs in outbox.unwritten():
                    if owner.gone:
                        continue
                    for seq in range(first_seq, first_seq + msgs):
                        self.queue_timeouts += 1
                        err = unavailable()
                        err.details["seq"] = seq
                        owner.notify(Notice.for_error(err))
            for owner, _, msgs in outbox.unwritten():
                if hasattr(owner, "accepted"):
                    owner.accepted -= msgs  # given back: no longer queued for it
        if expired:
            self.log.warning("orphans_expired", outboxes=len(expired), queue_timeout=timeout)
        self.wake(wake)

    def _retire_endpoint(self, endpoint: Any) -> None:
        """An endpoint was ejected for request timeouts: its connections are replaced elsewhere."""
        for slot in self.slots:
            live = slot.live
            if live is not None and live.endpoint == endpoint and live.taking:
                live.retire("endpoint ejected: request timeouts", recycle=True)

    # -- statistics ---------------------------------------------------------------

    def statistics(self) -> GroupStatistics:
        sched = self.sched
        slots = self.slots + self.retired_slots
        conns = [c for s in slots for c in s.conns() if not c.ended]
        queues = [sched.outbox_of(c).statistics() for c in conns]
        clients = list(self.clients.values())
        sstats = sched.statistics()
        r = self.router.statistics() if self.router is not None else None
        up = self.connections_up
        return GroupStatistics(
            name=self.cfg.name,
            endpoints=tuple(str(e) for e in self.cfg.endpoints),
            framing=self.cfg.framing.name,
            steering=self.cfg.steering,
            connections_up=up,
            connections_total=len(self.slots),
            clients=len(clients),
            receivers_ready=self.steering.statistics().ready,
            tx_msgs=sum(s.ended_tx_msgs for s in slots) + sum(c.written_msgs() for c in conns),
            tx_bytes=sum(s.ended_tx_bytes for s in slots) + sum(c.tx_bytes for c in conns),
            rx_msgs=self.rx_msgs,
            rx_bytes=self.rx_bytes,
            tx_retries=self.tx_retries,
            attached=self.attached,
            unattached=self.unattached,
            rx_ready_drops=0,
            rx_paused=self.rx_paused,
            queued_msgs=sum(q.queued_msgs for q in queues) + sstats.orphaned_msgs,
            queued_bytes=sum(q.queued_bytes for q in queues) + sstats.orphaned_bytes,
            waiting_clients=sstats.waiting_clients,
            refused=self._departed_refused + sum(c.refused for c in clients),
            requeued=self._departed_requeued + sum(c.requeued for c in clients),
            notices_sent=self._departed_notices + sum(c.notices_sent for c in clients),
            requests_in_flight=r.in_flight if r else 0,
            unmatched_responses=r.unmatched if r else 0,
            late_responses=r.late if r else 0,
            dropped_responses=r.dropped if r else 0,
            requests_failed=r.failed if r else 0,
            requests_timed_out=r.timed_out if r else 0,
            requests_retried=r.retried if r else 0,
            retries_exhausted=r.retries_exhausted if r else 0,
            queue_timeouts=self.queue_timeouts,
            slow_consumers=self.slow_consumers,
            responses_dropped=self.responses_dropped,
            rx_queued_bytes=sum(c.txq_data_bytes for c in clients),
            dropped_unread=self.dropped_unread,
            recycles=self.recycles + sum(s.recycles for s in slots),
            connections_degraded=up < self.cfg.min_connections,
            down=up == 0,
            latency_p50_us=_us(r.latency_p50) if r else None,
            latency_p99_us=_us(r.latency_p99) if r else None,
            uptime=time.monotonic() - self.started_at,
            access=self.cfg.access.to_wire(),
            endpoint_health=tuple(self.endpoints.statistics(time.monotonic())),
            security=security_statistics(self.cfg, self.tls),
        )

    def connection_statistics(self) -> list[ConnStatistics]:
        return [s.statistics() for s in self.slots]

    def client_statistics(self) -> list["ClientStatistics"]:
        return [c.statistics() for c in self.clients.values()]
