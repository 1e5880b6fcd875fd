"""Receive steering: which client gets each message parsed from a connection.

Theory of operation
-------------------
A group's steering mode is a strategy object, chosen once when the group is
built (:func:`steering_for`). The connection's shell reads bytes into its
:class:`~kmuxd.core.inbox.Inbox` and calls :meth:`Steering.steer`; the
strategy decides who gets each complete message and hands it to that
client through the :class:`Receiver` protocol, straight from the inbox's
buffer. The client's shell does the send (and queues what its socket does
not take). What a strategy could not hand over stays in the inbox.

* :class:`ResponseSteering` (``id`` and ``fifo``): the
  :class:`~kmuxd.core.router.ResponseRouter` matches each response to the
  request it answers; the response goes to that request's client, with the
  client's own id put back (``id`` with rewrite). It never waits: a client
  that does not read has its responses queued in its own bounded queue. A
  response that matches nothing is counted (and, with ``unmatched =
  "balance"``, offered to a ready receiver).
* :class:`BalanceSteering` (``balance``, KCM's): messages go round robin to
  ready receivers (:class:`ReceiverRing`), ``rx_batch`` at a time. With no
  receiver ready the rest stays in the inbox and the connection stops
  reading: push-back through TCP, nothing dropped. Messages a client hands
  back after switching receiving off (REQUEUE) go first, before anything
  newer from any connection.

**The ring** (balance): a receiver is *ready* when its receiving is on, its
socket took the last message without blocking, and it has no notices
waiting. Messages go to the receiver at the front, ``batch`` at a time,
then the ring turns, so wake-ups are amortised over a batch and no
receiver is starved. A receiver whose socket is full is marked *blocked*
and leaves the ring (the message it could not take goes to the next one);
it comes back when its socket is writable again. A receiver that switches
receiving off leaves the ring. A receiver that leaves the ring during its
turn (blocked by the message it just took) ends that turn; the next
receiver's turn starts whole, so each receiver in the ring is offered a
message before any receiver gets a second turn.

**Skipped messages.** A message over ``max_message`` goes by unread
(``Inbox`` invariant 6); only its stub stays, and :meth:`Steering.skipped`
decides what it was, in its place in the stream's order: in ``id`` and
``fifo`` the answer to the request it matches (by the id in its stub, or as
the oldest request), whose client the shell tells ``response_too_big``; in
``balance`` nobody's. Either way it is counted.

**The kind byte.** A message is sent to its client as one DATA packet: the
kind byte, then the message. The byte before a message in the inbox is
free (``Inbox`` invariant 2), so :func:`data_packet` writes the kind there
and the packet is sent from the buffer with no copy. It is the only place
that writes it.

No I/O; receivers are opaque objects behind :class:`Receiver`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Final, Protocol

from kmux.protocol import KIND_DATA

from .counters import GroupCounters

if TYPE_CHECKING:
    from .inbox import Inbox
    from .router import Flight, Request, ResponseRouter

__all__ = [
    "ReceiverRing", "SteeringStatistics", "Receiver", "Steering", "BalanceSteering", "ResponseSteering",
    "steering_for", "data_packet", "TAKEN", "TAKEN_LAST", "BLOCKED", "FAILED",
]

#: KIND_DATA as a C static (a module global would be a dict lookup per message).
_KIND_DATA: Final = KIND_DATA

#: What :meth:`Receiver.offer` did with a message: took it (and may take the
#: next), took it and its turn is over (it went out in pieces), could not take
#: it for now (socket full: the receiver left the ring itself), or failed (it
#: can take nothing; the message goes to the next receiver).
TAKEN: Final = 0
TAKEN_LAST: Final = 1
BLOCKED: Final = 2
FAILED: Final = 3


def data_packet(buf: bytearray, view: memoryview, pos: int, end: int) -> memoryview:
    """The DATA packet of the message at ``buf[pos:end]``: its kind byte is written
    into the free byte before it (``Inbox`` invariant 2), so it is sent without a copy."""
    buf[pos - 1] = _KIND_DATA
    return view[pos - 1 : end]


class Receiver(Protocol):
    """A client as receive steering sees it."""

    #: It left: answers still owed to it are dropped (counted).
    gone: bool

    def deliver(self, buf: bytearray, view: memoryview, pos: int, end: int, seq: int) -> bool:
        """The response to its request ``seq`` is at ``buf[pos:end]`` (the byte before
        it is free). True if sent or queued for it, False if dropped (counted)."""

    def offer(self, buf: bytearray, view: memoryview, pos: int, end: int, keep: bool = False) -> int:
        """Balance: the message at ``buf[pos:end]`` (the byte before it is free).
        TAKEN, TAKEN_LAST, BLOCKED or FAILED. ``keep``: queue it rather than
        leave it when the socket is full (it has nowhere else to go)."""


@dataclass(frozen=True, slots=True)
class SteeringStatistics:
    #: Receivers that can take a message now.
    ready: int
    #: Receivers with receiving on (ready or blocked).
    receiving: int


class ReceiverRing:
    """Round robin over ready receivers, ``batch`` messages per turn.

    Leaving is O(1) wherever the receiver sits (a mass disconnect of N
    clients would otherwise cost O(N²): ``deque.remove`` scans). The ring
    holds ``(receiver, ticket)`` entries and ``_ready`` maps each ready
    receiver to its current ticket: an entry whose ticket is not current
    is stale (it left, perhaps to come back later with a new ticket) and is
    dropped when it reaches the front, or when stale entries outnumber live
    ones (so the ring stays within twice the ready receivers, plus a few).
    """

    __slots__ = ("batch", "_ring", "_ready", "_tickets", "_receiving", "_blocked", "_left")

    def __init__(self, batch: int) -> None:
        if batch < 1:
            raise ValueError("batch must be >= 1")
        self.batch = batch
        self._ring: deque[tuple[Any, int]] = deque()
        self._ready: dict[Any, int] = {}
        self._tickets = 0
        self._receiving: set[Any] = set()
        self._blocked: set[Any] = set()
        self._left = 0  # messages the ring's front may still take this turn

    def remove(self, receiver: Any) -> None:
        self._receiving.discard(receiver)
        self._blocked.discard(receiver)
        self._leave_ring(receiver)

    def receive_on(self, receiver: Any) -> bool:
        """Returns True if the receiver became ready (wake paused parsers)."""
        if receiver in self._receiving:
            return False
        self._receiving.add(receiver)
        if receiver not in self._blocked:
            self._join_ring(receiver)
            return True
        return False

    def receive_off(self, receiver: Any) -> None:
        self._receiving.discard(receiver)
        self._leave_ring(receiver)

    def blocked(self, receiver: Any) -> None:
        """The receiver could not take a message (socket full, notices pending)."""
        self._blocked.add(receiver)
        self._leave_ring(receiver)

    def unblocked(self, receiver: Any) -> bool:
        """The receiver can take messages again. True if it became ready."""
        self._blocked.discard(receiver)
        if receiver in self._receiving and receiver not in self._ready:
            self._join_ring(receiver)
            return True
        return False

    def take(self) -> tuple[Any, int]:
        """The receiver for the next messages and how many it may take now (None, 0: none ready)."""
        ring = self._ring
        ready = self._ready
        if self._left <= 0 and ring:
            ring.rotate(-1)
            self._left = self.batch
        while ring:
            receiver, ticket = ring[0]
            if ready.get(receiver) == ticket:
                return receiver, self._left
            ring.popleft()  # stale: it left
            self._left = self.batch
        return None, 0

    def used(self, receiver: Any, n: int) -> None:
        """``receiver``, the front when :meth:`take` named it, took ``n`` of the messages
        offered. If it left the ring meanwhile (it blocked while taking its last one), the
        new front's turn is whole: charging it would let the ring turn past a receiver
        that was never offered anything (and, when the first came back before the next
        message, skip it every time)."""
        ring = self._ring
        if ring and ring[0][0] is receiver:  # entries are (receiver, ticket)
            self._left -= n

    def _join_ring(self, receiver: Any) -> None:
        self._tickets += 1
        self._ready[receiver] = self._tickets
        self._ring.append((receiver, self._tickets))

    def _leave_ring(self, receiver: Any) -> None:
        if self._ready.pop(receiver, None) is None:
            return
        ring = self._ring
        if ring[0][0] is receiver:
            ring.popleft()
            self._left = self.batch
        elif len(ring) > 2 * len(self._ready) + 16:
            ready = self._ready
            self._ring = deque(entry for entry in ring if ready.get(entry[0]) == entry[1])

    def statistics(self) -> SteeringStatistics:
        return SteeringStatistics(ready=len(self._ready), receiving=len(self._receiving))


class Steering:
    """A group's receive steering: who gets each message a connection's inbox completed."""

    #: Its deliveries answer requests: each is proof of the endpoint's health.
    answers: bool = False

    def __init__(self, ring: ReceiverRing, counters: GroupCounters) -> None:
        #: Ready receivers (balance; id/fifo use it for unmatched responses).
        self.ring = ring
        #: The group's record: delivered messages and bytes are counted here.
        self.counters = counters

    def steer(self, inbox: Inbox, flight: Flight | None, pending: deque[Request], now: float) -> int:
        """Hand the inbox's complete messages to their clients; returns how many were
        delivered. What could not be handed over stays in the inbox (balance only)."""
        raise NotImplementedError

    def skipped(self, inbox: Inbox, flight: Flight | None, pending: deque[Request], now: float) -> Request | None:
        """The inbox's skipped message (:attr:`Inbox.skip`), every message before it handed
        over: counted. Returns the request it answers, whose client must be told; None
        when there is nobody to tell (balance, an unmatched or a late response)."""
        skip = inbox.skip
        assert skip is not None
        counters = self.counters
        counters.skipped_msgs += 1
        counters.skipped_bytes += skip[2]
        return None

    def requeue(self, message: bytes) -> None:
        """A message a client handed back (balance only)."""
        raise NotImplementedError

    def pump_requeued(self) -> bool:
        """Send handed-back messages to ready receivers. True when none is left."""
        return True


class BalanceSteering(Steering):
    """``balance``: round robin over ready receivers, handed-back messages first."""

    def __init__(self, ring: ReceiverRing, counters: GroupCounters) -> None:
        super().__init__(ring, counters)
        #: Messages clients handed back (REQUEUE), oldest first.
        self.requeued: deque[bytes] = deque()

    def steer(self, inbox: Inbox, flight: Flight | None, pending: deque[Request], now: float) -> int:
        if self.requeued:
            return 0  # handed-back messages go first
        ends = inbox.ends
        buf, view = inbox.buf, inbox.view
        pos = inbox.head
        i = 0
        count = len(ends)
        ring = self.ring
        first = pos
        while i < count:
            receiver, quota = ring.take()
            if receiver is None:
                break
            k = 0
            got = TAKEN
            while k < quota and i < count:
                end = ends[i]
                got = receiver.offer(buf, view, pos, end)
                if got > TAKEN_LAST:
                    break  # not taken: it stays first in line
                pos = end
                i += 1
                k += 1
                if got == TAKEN_LAST:
                    break
            if got == FAILED:
                # It can take nothing: out of the ring, and the message goes to
                # the next ready receiver at once. An app that closed is
                # detached on its hang-up; one that shut down only its reading
                # side stays attached, receiving nothing.
                ring.remove(receiver)
            elif got != BLOCKED:
                ring.used(receiver, k)
        counters = self.counters
        counters.rx_msgs += i
        counters.rx_bytes += pos - first
        inbox.take(i, pos)
        if i < count:
            counters.rx_paused += 1
        return i

    def requeue(self, message: bytes) -> None:
        self.requeued.append(message)

    def pump_requeued(self) -> bool:
        queue = self.requeued
        ring = self.ring
        while queue:
            receiver, quota = ring.take()
            if receiver is None:
                return False
            k = 0
            got = TAKEN
            while k < quota and queue:
                message = queue[0]
                packet = bytearray(1 + len(message))
                packet[1:] = message
                got = receiver.offer(packet, memoryview(packet), 1, len(packet))
                if got > TAKEN_LAST:
                    break  # as in steer: the message stays first in line
                queue.popleft()
                k += 1
            if got == FAILED:
                ring.remove(receiver)
            elif got != BLOCKED:
                ring.used(receiver, k)
        return True


class ResponseSteering(Steering):
    """``id`` and ``fifo``: each response to the client whose request it answers."""

    answers = True

    def __init__(self, ring: ReceiverRing, counters: GroupCounters, router: ResponseRouter, *,
                 unmatched_to_balance: bool, on_unmatched: Callable[[Flight, int], None]) -> None:
        super().__init__(ring, counters)
        self.router = router
        #: ``unmatched = "balance"``: a response that matches nothing goes to a ready receiver.
        self.unmatched_to_balance = unmatched_to_balance
        #: The shell's log line for a response that matched nothing (its size).
        self.on_unmatched = on_unmatched

    def steer(self, inbox: Inbox, flight: Flight | None, pending: deque[Request], now: float) -> int:
        assert flight is not None  # every connection has one in id/fifo steering
        ends = inbox.ends
        buf, view = inbox.buf, inbox.view
        pos = inbox.head
        router = self.router
        ids = router.ids
        delivered = 0
        nbytes = 0
        for end in ends:
            req = router.match(flight, pending, buf, pos, end - pos)
            if req is None:
                self._unmatched(flight, buf, view, pos, end)
            elif router.answered(req, now):
                if ids is not None:
                    ids.restore(req, buf, pos)
                if req.owner.deliver(buf, view, pos, end, req.seq):
                    delivered += 1
                    nbytes += end - pos
                else:
                    router.undelivered(1)
            pos = end
        inbox.take(len(ends), pos)
        counters = self.counters
        counters.rx_msgs += delivered
        counters.rx_bytes += nbytes
        return delivered

    def skipped(self, inbox: Inbox, flight: Flight | None, pending: deque[Request], now: float) -> Request | None:
        super().skipped(inbox, flight, pending, now)
        assert flight is not None and inbox.skip is not None
        start, stub_end, size = inbox.skip
        router = self.router
        req = router.match(flight, pending, inbox.buf, start, stub_end - start)
        if req is None:
            self.on_unmatched(flight, size)  # it cannot be offered to anyone: it is gone
            return None
        return req if router.answered(req, now) else None

    def _unmatched(self, flight: Flight, buf: bytearray, view: memoryview, pos: int, end: int) -> None:
        self.on_unmatched(flight, end - pos)
        if not self.unmatched_to_balance:
            return
        receiver, _ = self.ring.take()
        if receiver is None:
            return
        got = receiver.offer(buf, view, pos, end, True)
        if got == FAILED:
            self.ring.remove(receiver)  # best effort: the unmatched response is dropped
        elif got != BLOCKED:
            self.ring.used(receiver, 1)


def steering_for(mode: str, ring: ReceiverRing, counters: GroupCounters, router: ResponseRouter | None, *,
                 unmatched_to_balance: bool = False,
                 on_unmatched: Callable[[Flight, int], None] | None = None) -> Steering:
    """The strategy for a group's ``steering`` setting (``router``: id and fifo only)."""
    if mode == "balance":
        return BalanceSteering(ring, counters)
    if router is None or on_unmatched is None:
        raise ValueError(f"steering {mode!r} needs a ResponseRouter and an unmatched-response hook")
    return ResponseSteering(ring, counters, router, unmatched_to_balance=unmatched_to_balance,
                            on_unmatched=on_unmatched)
