"""A group: its TCP connection slots, its clients, and the steering between them.

The group owns the sans-IO cores (:class:`~kmuxd.sendq.TxScheduler`,
:class:`~kmuxd.steering.BalanceSteering`) and the trio tasks that move bytes:
one task per connection slot (dialling, then a reader and a writer) and one
that re-steers messages clients hand back. Clients attach and detach; their
tasks live in the server's nursery.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from kmux.errors import BadFrame, BadPacket, ConnectionLost, DrainTimeout, RequestTimeout, UnknownConnection
from kmux.protocol import DATA_PREFIX, KIND_DATA, Notice

from kmuxd.system.config import DaemonConfig, GroupConfig
from .conn import ConnSlot, ConnStatistics
from kmuxd.core.endpoints import EndpointPool
from kmuxd.core.latency import LatencyHistogram
from kmuxd.system.log import RateLimit
from kmuxd.core.requests import DONE, IdTable, Request, fifo_match
from kmuxd.core.sendq import Outbox, TxScheduler
from kmuxd.core.steering import BalanceSteering

if TYPE_CHECKING:
    from .session import ClientSession, ClientStatistics

__all__ = ["Group", "GroupStatistics"]

#: Shortest interval between request_timeout sweeps, seconds.
TIMEOUT_TICK_MIN = 0.01


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
    #: Fewer connections up than min_connections.
    connections_degraded: bool
    latency_p50_us: float | None
    latency_p99_us: float | None
    uptime: float


class Group:
    def __init__(self, cfg: GroupConfig, daemon_cfg: DaemonConfig, log) -> None:
        self.cfg = cfg
        self.daemon_cfg = daemon_cfg
        self.log = log.bind(group=cfg.name)
        self.tx = TxScheduler()
        self.endpoints = EndpointPool(list(cfg.endpoints), cfg.reconnect_initial, cfg.reconnect_max)
        self.steering = BalanceSteering(cfg.rx_batch)
        self.slots = [self._new_slot(i) for i in range(cfg.connections)]
        self.clients: dict[int, "ClientSession"] = {}
        self._receiver_ready = trio.Event()
        self._requeued: deque[bytes] = deque()
        self._requeue_wanted = trio.Event()
        self.started_at = time.monotonic()
        self.tx_retries = 0
        self.rx_msgs = self.rx_bytes = 0
        self.attached = self.unattached = 0
        self.rx_paused = 0
        self._departed_refused = self._departed_requeued = self._departed_notices = 0
        #: Fed by request/response steering modes; empty in balance mode.
        self.latency = LatencyHistogram()
        # -- request/response steering (kmuxd.core.requests) --
        self.request_mode = cfg.steering in ("id", "fifo")
        self.ids = (
            IdTable(cfg.id.request_offset, cfg.id.response_offset, cfg.id.size, cfg.id.rewrite)
            if cfg.steering == "id" else None
        )
        #: requests neither done nor timed out, oldest first (for request_timeout)
        self.live: dict[Request, None] = {}
        self.unmatched_responses = 0
        self.late_responses = 0
        self.dropped_responses = 0
        self.requests_failed = 0
        self.requests_timed_out = 0
        self._unmatched_log = RateLimit(10.0)

    # -- lifecycle -------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Dial every slot; reports started once each has connected or failed once."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            # Dial all slots at once: a blackholed endpoint costs one
            # connect_timeout at start-up, not one per slot.
            async with trio.open_nursery() as starting:
                for slot in self.slots:
                    starting.start_soon(nursery.start, slot.run)
            nursery.start_soon(self._requeue_pump)
            if self.request_mode and self.cfg.request_timeout > 0:
                nursery.start_soon(self._timeout_loop)
            up = sum(s.connected for s in self.slots)
            self.log.info("group_up", connections_up=up, connections=len(self.slots))
            task_status.started()

    def _new_slot(self, index: int) -> ConnSlot:
        cfg = self.cfg
        slot = ConnSlot(self, index, cfg.endpoints[index % len(cfg.endpoints)])
        self.tx.add(slot, Outbox(cfg.write_buffer, cfg.max_message + 1, cfg.framing._length_at))
        return slot

    def slot(self, index: int) -> ConnSlot:
        for slot in self.slots:
            if slot.index == index:
                return slot
        raise UnknownConnection(
            f"group {self.cfg.name!r} has no connection {index} (0..{len(self.slots) - 1})"
        )

    async def resize(self, cfg: GroupConfig) -> None:
        """Apply a configuration that differs only in ``connections``.

        New slots dial at once; surplus slots (the highest numbers) drain
        their queues and close. Other slots and every client are untouched.
        """
        old = len(self.slots)
        self.cfg = cfg
        for index in range(old, cfg.connections):
            slot = self._new_slot(index)
            self.slots.append(slot)
            await self._nursery.start(slot.run)
        surplus = self.slots[cfg.connections :]
        del self.slots[cfg.connections :]
        for slot in surplus:
            try:
                await slot.drain(self.daemon_cfg.shutdown_grace, retire=True)
            except DrainTimeout:
                slot.fail(ConnectionLost("connection retired by a reload"), requested=True)
                slot._run_scope.cancel()
        self.log.info("group_resized", connections=cfg.connections, was=old)

    async def retire(self) -> None:
        """Stop the group: stop reading its clients (each told the last seq read),
        flush what they sent, then release them and close its connections."""
        for client in list(self.clients.values()):
            client.stop_reading(Notice(event="shutdown", details={"accepted": client.seq}))
        with trio.move_on_after(self.daemon_cfg.shutdown_grace):
            while self.queued_total():
                await trio.sleep(0.01)
        for client in list(self.clients.values()):
            client.scope.cancel()
        left = self.queued_total()
        self.log.info("group_retired", queued_bytes_lost=left)
        self._nursery.cancel_scope.cancel()

    def attach(self, client: "ClientSession", receive: bool) -> None:
        self.clients[client.id] = client
        self.attached += 1
        self.steering.add(client, receiving=False)  # turned on by the session's state
        if receive and self.steering.receive_on(client):
            self.receiver_ready()

    def detach(self, client: "ClientSession") -> None:
        if self.clients.pop(client.id, None) is None:
            return
        self.unattached += 1
        client.gone = True  # responses still on their way to it are dropped
        self.steering.remove(client)
        self.after_tx(self.tx.forget(client))
        # Its accepted messages still go out; keep its counts in the totals.
        self._departed_refused += client.refused
        self._departed_requeued += client.requeued
        self._departed_notices += client.notices_sent

    def after_tx(self, wake: list) -> None:
        """Let woken clients read again; write outboxes adopted from failed slots."""
        for owner in wake:
            owner.wake.set()
        if self.tx.to_flush:
            for conn in self.tx.take_flush():
                conn.flush_nowait()

    def queued_total(self) -> int:
        """Bytes accepted and not yet written, anywhere in the group."""
        return sum(s.outbox.pending for s in self.slots) + self.tx.statistics().orphaned_bytes

    def set_daemon_config(self, daemon_cfg: DaemonConfig) -> None:
        self.daemon_cfg = daemon_cfg

    # -- receive steering ---------------------------------------------------------

    def receiver_ready(self) -> None:
        self._receiver_ready.set()
        self._receiver_ready = trio.Event()

    async def wait_receiver(self) -> None:
        self.rx_paused += 1
        await self._receiver_ready.wait()

    # -- request/response steering -------------------------------------------------

    def new_request(self, owner: "ClientSession", buf, start: int, length: int) -> Request:
        """Register a request being accepted (id: its id is checked and rewritten in place)."""
        now = time.monotonic()
        if self.ids is not None:
            req = self.ids.add(owner, owner.seq, now, buf, start, length)
        else:
            req = Request(owner, owner.seq, now)
        self.live[req] = None
        return req

    def _finish(self, req: Request) -> None:
        req.state = DONE
        if self.ids is not None:
            self.ids.remove(req)
            if req.conn is not None:
                req.conn.inflight.pop(req, None)
        self.live.pop(req, None)

    def _tell(self, req: Request, err) -> None:
        err.details["seq"] = req.seq
        if req.orig_id is not None:
            err.details["id"] = req.id_value()
        if not req.owner.gone:
            req.owner.notify(Notice.for_error(err))

    def fail_requests(self, slot: ConnSlot, exc: BaseException) -> None:
        """``slot``'s connection is gone: every request written on it and not done gets one notice."""
        inflight = slot.inflight
        if not inflight:
            return
        reqs = list(inflight)
        inflight.clear()
        why = getattr(exc, "message", None) or str(exc)
        for req in reqs:
            if req.state == DONE:
                continue
            told = req.timed_out
            self._finish(req)
            if not told:
                self.requests_failed += 1
                self._tell(req, ConnectionLost(f"the connection carrying this request died: {why}"))

    async def _timeout_loop(self) -> None:
        timeout = self.cfg.request_timeout
        period = max(TIMEOUT_TICK_MIN, timeout / 4)
        while True:
            await trio.sleep(period)
            now = time.monotonic()
            expired = []
            for req in self.live:  # oldest first
                if now - req.t0 < timeout:
                    break
                expired.append(req)
            for req in expired:
                del self.live[req]
                req.timed_out = True  # its id stays reserved: a late answer is discarded
                self.requests_timed_out += 1
                self._tell(req, RequestTimeout(f"no response within request_timeout={timeout}s"))

    def _steer_requests(self, slot: ConnSlot) -> bool:
        """Each response to the client whose request it answers (id or fifo). False if paused."""
        ends = slot.rends
        buf, view = slot.rbuf, slot.rview
        pos = slot.rhead
        ids = self.ids
        i = 0
        count = len(ends)
        paused = False
        now = time.monotonic()
        while i < count:
            end = ends[i]
            length = end - pos
            if ids is not None:
                req = ids.match(buf, pos, length)
            else:
                req = fifo_match(slot.inflight, slot.outbox.requests)
            if req is None:
                self.unmatched_responses += 1
                if self._unmatched_log.allow():
                    self.log.warning("unmatched_response", conn=slot.index, bytes=length,
                                     policy=self.cfg.unmatched, suppressed=self._unmatched_log.take_suppressed())
                if self.cfg.unmatched == "balance" and not self._balance_one(buf, view, pos, end):
                    self.unmatched_responses -= 1  # counted again when retried
                    paused = True
                    break
            elif req.timed_out or req.owner.gone:
                if req.timed_out:
                    self.late_responses += 1
                else:
                    self.dropped_responses += 1
                self._finish(req)
            else:
                owner = req.owner
                if ids is not None:
                    ids.restore(req, buf, pos)
                buf[pos - 1] = KIND_DATA
                try:
                    owner.sock.send(view[pos - 1 : end])
                except BlockingIOError:
                    # Only this client may take it: wait for it (head of line).
                    if ids is not None:
                        ids.unrestore(req, buf, pos)
                    owner.rx_blocked()
                    paused = True
                    break
                except OSError:
                    self.dropped_responses += 1
                else:
                    owner.rx_msgs += 1
                    owner.rx_bytes += length
                    self.rx_msgs += 1
                    self.rx_bytes += length
                    self.latency.record(now - req.t0)
                self._finish(req)
            slot.rx_msgs += 1
            pos = end
            i += 1
        slot.rhead = pos
        if not paused:
            slot.rends = []
            return True
        del ends[:i]
        return False

    def _balance_one(self, buf, view, pos: int, end: int) -> bool:
        receiver, _ = self.steering.take()
        if receiver is None:
            return False
        buf[pos - 1] = KIND_DATA
        try:
            receiver.sock.send(view[pos - 1 : end])
        except BlockingIOError:
            receiver.rx_blocked()
            return False
        except OSError:
            self.steering.remove(receiver)
            return False
        self.steering.used(1)
        receiver.rx_msgs += 1
        receiver.rx_bytes += end - pos
        return True

    def steer(self, slot: ConnSlot) -> bool:
        """Hand the slot's parsed messages to ready receivers. False if some remain."""
        if self.request_mode:
            return self._steer_requests(slot)
        ends = slot.rends
        buf = slot.rbuf
        view = slot.rview
        pos = slot.rhead
        i = 0
        count = len(ends)
        steering = self.steering
        total_bytes = 0
        while i < count:
            receiver, quota = steering.take()
            if receiver is None:
                break
            send = receiver.sock.send
            k = 0
            start = pos
            try:
                while k < quota and i < count:
                    end = ends[i]
                    # The byte before the message is already steered (or the
                    # slot's scratch byte): the kind byte goes there.
                    buf[pos - 1] = KIND_DATA
                    send(view[pos - 1 : end])
                    pos = end
                    i += 1
                    k += 1
            except BlockingIOError:
                receiver.rx_blocked()
            except OSError:
                steering.remove(receiver)  # gone; its session ends on EOF
            else:
                steering.used(k)
            receiver.rx_msgs += k
            receiver.rx_bytes += pos - start
            total_bytes += pos - start
        self.rx_msgs += i
        self.rx_bytes += total_bytes
        slot.rx_msgs += i
        slot.rhead = pos
        if i == count:
            slot.rends = []
            return True
        del ends[:i]
        return False

    def requeue(self, client: "ClientSession", message: bytes) -> None:
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
        total = self.cfg.framing._length_at(message, 0, len(message)) if message else -1
        if total != len(message):
            raise BadFrame("requeued message is not one well-framed message")
        client.requeued += 1
        client.requeue_bytes += len(message)
        self._requeued.append(message)
        self._requeue_wanted.set()

    async def _requeue_pump(self) -> None:
        while True:
            await self._requeue_wanted.wait()
            self._requeue_wanted = trio.Event()
            queue = self._requeued
            while queue:
                receiver, quota = self.steering.take()
                if receiver is None:
                    await self.wait_receiver()
                    continue
                k = 0
                try:
                    while k < quota and queue:
                        receiver.sock.sendmsg([DATA_PREFIX, queue[0]])
                        receiver.rx_msgs += 1
                        receiver.rx_bytes += len(queue.popleft())
                        k += 1
                except BlockingIOError:
                    receiver.rx_blocked()
                except OSError:
                    self.steering.remove(receiver)
                else:
                    self.steering.used(k)
                await trio.lowlevel.checkpoint()

    # -- statistics ---------------------------------------------------------------

    def statistics(self) -> GroupStatistics:
        # Counters straight from the slots and their outboxes: the full
        # connection records (with a TCP_INFO call each) are not needed here.
        queues = [s.outbox.statistics() for s in self.slots]
        clients = list(self.clients.values())
        sched = self.tx.statistics()
        return GroupStatistics(
            name=self.cfg.name,
            endpoints=tuple(str(e) for e in self.cfg.endpoints),
            framing=self.cfg.framing.name,
            steering=self.cfg.steering,
            connections_up=sum(1 for s in self.slots if s.connected),
            connections_total=len(self.slots),
            clients=len(clients),
            receivers_ready=self.steering.statistics().ready,
            tx_msgs=sum(s.tx_msgs for s in self.slots),
            tx_bytes=sum(s.tx_bytes for s in self.slots),
            rx_msgs=self.rx_msgs,
            rx_bytes=self.rx_bytes,
            tx_retries=self.tx_retries,
            attached=self.attached,
            unattached=self.unattached,
            rx_ready_drops=0,
            rx_paused=self.rx_paused,
            queued_msgs=sum(q.queued_msgs for q in queues) + sched.orphaned_msgs,
            queued_bytes=sum(q.queued_bytes for q in queues) + sched.orphaned_bytes,
            waiting_clients=sched.waiting_clients,
            refused=self._departed_refused + sum(c.refused for c in clients),
            requeued=self._departed_requeued + sum(c.requeued for c in clients),
            notices_sent=self._departed_notices + sum(c.notices_sent for c in clients),
            requests_in_flight=len(self.live),
            unmatched_responses=self.unmatched_responses,
            late_responses=self.late_responses,
            dropped_responses=self.dropped_responses,
            requests_failed=self.requests_failed,
            requests_timed_out=self.requests_timed_out,
            connections_degraded=sum(1 for s in self.slots if s.connected) < self.cfg.min_connections,
            latency_p50_us=_us(self.latency.percentile(50)),
            latency_p99_us=_us(self.latency.percentile(99)),
            uptime=time.monotonic() - self.started_at,
        )

    def connection_statistics(self) -> list[ConnStatistics]:
        return [s.statistics() for s in self.slots]

    def client_statistics(self) -> list["ClientStatistics"]:
        return [c.statistics() for c in self.clients.values()]
