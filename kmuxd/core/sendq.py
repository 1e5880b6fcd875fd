"""The send path's core: which TCP connection carries which client's messages.

Theory of operation
-------------------
Each connection slot owns one :class:`Outbox`: a preallocated buffer of
whole, already validated messages waiting to be written on that stream. The
I/O shell reads a client's packets *straight into* the chosen outbox (no
intermediate queue, no copy) and writes ``outbox[head:tail]`` with one
non-blocking ``send``. The scheduler decides where a client's next messages
go, following KCM:

1. **Atomicity.** Bytes enter an outbox only as whole messages and leave it
   in order; a stream carries message after message, never interleaved.
2. **Availability.** A connection is *available* when it is connected, its
   last write was not refused by the kernel (it is not *blocked*), and its
   outbox has room. Unpinned clients take available connections in turn
   (round robin), so in one pass of the event core many clients' messages
   land in the same outboxes and each connection writes them with one
   ``send``: the batching across sockets that makes a busy daemon cheaper
   per message. A blocked or full connection is skipped.
3. **Per-client order.** A client with bytes still unwritten in an outbox is
   *pinned* to that outbox; its next messages go to the same outbox, after
   them. The pin ends when all of its bytes there are written.
4. **Queueing and push-back.** When no connection is available an unpinned
   client *waits* (FIFO); a pinned client whose outbox is full *parks* on
   it, and so does a pinned client while any client waits (its turn is
   over: it may not keep the connection by refilling the outbox). Neither
   is read meanwhile, so the apps block in the kernel: bounded memory,
   nothing dropped. A connection that becomes available again is reserved
   for the longest waiter, so a busy client that keeps refilling cannot
   starve the others; until that waiter has read, the room is its own (a
   pinned client parks rather than fill it).
5. **Failure.** When a connection dies, its outbox is cut back to the first
   message not fully written (re-sent from byte 0, as KCM does) and becomes
   an *orphan*; the next connection to be available adopts it whole, by
   swapping outboxes, so pinned clients keep their order with no copying.
   An orphan that no connection adopts within the group's
   ``queue_timeout`` is given back (:meth:`TxScheduler.expire_orphans`):
   its messages are refused, by seq, never written later.
6. **Continuation.** A message that arrives in several packets is
   assembled in place after ``tail`` (:meth:`Outbox.open`). While it is
   open the outbox is its sender's alone: nobody else is routed to it, so
   no other message can land inside it, and it is committed only when
   whole. A failed connection's open message moves with its outbox.

Each run of an owner's messages knows the seq of its first message, so a
message that will never be written can be named to its sender.

The shell talks to the scheduler through one typed interface each way.
Owners (clients, the retry feeder) and connections are :class:`Owner` and
:class:`Carrier` here: the scheduler wakes owners it let route again
(``wake``), counts for them what they got accepted, written or given back,
and asks a connection to write when a pass ends (``flush_soon``). The shell
fills an outbox's buffer (it receives straight into it) and then tells the
scheduler with one call, :meth:`TxScheduler.commit`, whoever fills it: a
client's packets, the last piece of a message in pieces, retried requests.
Everything else the shell reads: the outbox of a connection
(:meth:`TxScheduler.outbox_of`), the request records that were written
(:meth:`Outbox.take_written`), the counters. This module does no I/O and
imports neither ``socket`` nor ``trio``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Final, Protocol

if TYPE_CHECKING:
    from .router import Request

__all__ = ["BASE", "Outbox", "TxScheduler", "Owner", "Carrier", "OutboxStatistics", "Salvage"]


class Owner(Protocol):
    """A sender whose messages the scheduler places: a client, or the retry feeder."""

    #: It left: its accepted messages are still written, but it is told nothing more.
    gone: bool

    def wake(self) -> None:
        """It may route again (room came, a connection was handed to it): read it soon."""

    def count_accepted(self, msgs: int, nbytes: int) -> None:
        """``msgs`` of its messages (``nbytes`` bytes) were committed to an outbox."""

    def count_written(self, msgs: int, nbytes: int) -> None:
        """``msgs`` of its messages (``nbytes`` bytes) reached the kernel."""

    def count_given_back(self, msgs: int) -> None:
        """``msgs`` of its accepted messages will never be written (an orphan expired)."""


class Carrier(Protocol):
    """A connection that carries an outbox."""

    def count_accepted(self, msgs: int, nbytes: int) -> None:
        """``msgs`` messages, ``nbytes`` in all, were committed to its outbox
        (max_requests_per_connection; its TCP_NOTSENT_LOWAT, kmuxd.core.notsent)."""

    def count_written(self, msgs: int) -> None:
        """``msgs`` messages of the outbox it carries reached the kernel (a write, a
        compaction behind a blocked write, or the salvage when it failed)."""

    def flush_soon(self) -> None:
        """Its outbox holds bytes to write: write them when the pass ends."""


#: Reads ``buf`` at ``pos`` (with data up to ``end``): the length of the message there.
LengthAt = Callable[[Any, int, int], int]


class _Run:
    """Consecutive messages of one owner in an outbox, ending at ``end``; the
    first is that owner's message ``first_seq``, the rest follow without gaps."""

    __slots__ = ("owner", "end", "msgs", "first_seq")

    def __init__(self, owner: Owner, end: int, msgs: int, first_seq: int) -> None:
        self.owner = owner
        self.end = end
        self.msgs = msgs
        self.first_seq = first_seq


@dataclass(frozen=True, slots=True)
class OutboxStatistics:
    #: Bytes waiting to be written.
    queued_bytes: int
    #: Whole messages waiting (the one being written included).
    queued_msgs: int
    #: Clients with bytes in this outbox (pinned to it).
    pinned_clients: int


@dataclass(frozen=True, slots=True)
class Salvage:
    """What a failed connection's outbox still holds after cutting back."""

    #: Messages fully written before the failure (counted as sent).
    written_msgs: int
    #: Messages that will be re-sent from byte 0 on another connection.
    resend_msgs: int
    #: Of those, the one that was cut part-way (0 or 1).
    cut_msgs: int


#: Messages start at this offset: ``buf[BASE - 1]`` is a scratch byte, so
#: the byte before ``tail`` always exists (see :class:`Outbox`).
BASE: Final = 1


class Outbox:
    """A batch of whole messages for one stream, in a buffer allocated once.

    ``capacity`` is the batching limit (bytes queued before the outbox
    reports no room); ``reserve`` is the space one more packet may need, so
    a receive straight into :attr:`view` never truncates a legal message.

    The shell receives a packet (kind byte + message) at ``tail - 1``, so
    the message lands at ``tail`` with one plain ``recv_into``; it saves
    and restores the byte the kind overwrote. That byte is the scratch
    byte at ``BASE - 1`` when the outbox is empty, which is why offsets
    start at :data:`BASE`.
    """

    __slots__ = (
        "buf", "view", "head", "tail", "capacity", "reserve", "runs", "run_start", "owners", "parked", "conn",
        "written_msgs", "reserved_count", "unreserved_count", "length_at", "requests", "written_requests",
        "open_owner", "open_end", "orphaned_at",
    )

    def __init__(self, capacity: int, reserve: int, length_at: LengthAt) -> None:
        self.buf = bytearray(BASE + capacity + reserve)
        self.view = memoryview(self.buf)
        self.head = BASE  # written up to here
        self.tail = BASE  # filled up to here
        self.capacity = capacity
        self.reserve = reserve
        self.runs: deque[_Run] = deque()
        self.run_start = BASE  # where runs[0] begins (it may be partly written)
        #: owner -> number of its runs in this outbox (it is pinned while > 0)
        self.owners: dict[Owner, int] = {}
        #: pinned owners waiting for room here
        self.parked: list[Owner] = []
        #: the connection currently carrying this outbox (None: orphaned);
        #: the scheduler's own bookkeeping
        self.conn: Carrier | None = None
        #: when it became an orphan (None: carried by a connection)
        self.orphaned_at: float | None = None
        #: a message being assembled after ``tail`` (continuation), and where it ends so far
        self.open_owner: Owner | None = None
        self.open_end = BASE
        #: messages fully written from this outbox, ever
        self.written_msgs = 0
        #: times an owner pinned itself here / was released (KCM reserved/unreserved)
        self.reserved_count = 0
        self.unreserved_count = 0
        #: the group's framing: finds message boundaries when cutting back
        self.length_at = length_at
        #: request/response modes: one record per message here, in order
        #: (see kmuxd.core.router); empty in balance mode
        self.requests: deque[Request] = deque()
        #: records of messages written since the shell last asked (take_written)
        self.written_requests: list[Request] = []

    @property
    def pending(self) -> int:
        return self.tail - self.head

    def has_room(self) -> bool:
        """Whether one more packet (up to ``reserve`` bytes) may be received at ``tail`` now.

        A query only; the scheduler asks :meth:`make_room`, which may compact first.
        """
        return (self.open_owner is None and self.tail - self.head < self.capacity
                and len(self.buf) - self.tail >= self.reserve)

    def make_room(self) -> bool:
        """:meth:`has_room`, after compacting if a blocked write left too little space at the end."""
        if self.open_owner is not None or self.tail - self.head >= self.capacity:
            return False  # a message is being assembled at tail, or the batch is full
        if len(self.buf) - self.tail < self.reserve:
            self._compact()
            # A partly written message may still hold the front: no room yet.
            return len(self.buf) - self.tail >= self.reserve
        return True

    def _compact(self) -> None:
        # Only reached while a write is blocked part-way with room left: move
        # the unwritten bytes to the front. The cut is made at the start of
        # the message being written, never inside one, so ``run_start`` always
        # points at a whole message and :meth:`salvage` can walk from it.
        start = self._written_prefix()
        shift = start - BASE
        if shift <= 0:
            return
        self.buf[BASE : self.tail - shift] = self.view[start : self.tail]
        self.head -= shift
        self.tail -= shift
        self.run_start = BASE
        for run in self.runs:
            run.end -= shift

    def _written_prefix(self) -> int:
        """Count the whole messages before ``head`` as written; return where the next begins."""
        if not self.runs:
            return self.head
        pos = self.run_start
        done = 0
        length_at = self.length_at
        while pos < self.head:
            end = pos + length_at(self.buf, pos, self.tail)
            if end > self.head:
                break
            pos = end
            done += 1
        if done:
            first = self.runs[0]
            first.owner.count_written(done, pos - self.run_start)
            first.msgs -= done
            first.first_seq += done
            self._count(done)
            self.run_start = pos
        return pos

    def add_request(self, req: Request) -> None:
        """The record of the next message received at ``tail`` (id/fifo steering)."""
        self.requests.append(req)

    def add_run(self, owner: Owner, new_tail: int, msgs: int, first_seq: int) -> None:
        """Record that ``msgs`` whole messages of ``owner`` (seqs ``first_seq``
        onwards, no gaps) now fill ``[tail, new_tail)``."""
        runs = self.runs
        last = runs[-1] if runs else None
        if last is not None and last.owner is owner and last.first_seq + last.msgs == first_seq:
            last.end = new_tail
            last.msgs += msgs
        else:
            runs.append(_Run(owner, new_tail, msgs, first_seq))
            count = self.owners.get(owner, 0)
            if not count:
                self.reserved_count += 1
            self.owners[owner] = count + 1
        self.tail = new_tail

    def advance(self, n: int) -> list[Owner]:
        """``n`` more bytes were written. Returns owners no longer pinned here."""
        self.head += n
        head = self.head
        released = []
        runs = self.runs
        done = 0
        while runs and runs[0].end <= head:
            run = runs.popleft()
            run.owner.count_written(run.msgs, run.end - self.run_start)
            done += run.msgs
            self.run_start = run.end
            left = self.owners[run.owner] - 1
            if left:
                self.owners[run.owner] = left
            else:
                del self.owners[run.owner]
                self.unreserved_count += 1
                released.append(run.owner)
        if done:
            self._count(done)
        if head == self.tail:
            self.head = self.tail = self.run_start = BASE
        return released

    def _count(self, msgs: int) -> None:
        # Whoever completes messages (a write, a compaction, a salvage), the
        # connection carrying the outbox counts them, and their request
        # records (if any) wait in written_requests for it to take.
        self.written_msgs += msgs
        conn = self.conn
        if conn is not None:
            conn.count_written(msgs)
        requests = self.requests
        if requests:
            written = self.written_requests
            for _ in range(min(msgs, len(requests))):
                written.append(requests.popleft())

    def take_written(self) -> list[Request]:
        """Request records whose messages were written since the last call."""
        out = self.written_requests
        if out:
            self.written_requests = []
        return out

    # -- continuation ----------------------------------------------------------

    def open(self, owner: Owner) -> None:
        """``owner`` starts a message that arrives in pieces, at ``tail``."""
        self.open_owner = owner
        self.open_end = self.tail

    def grow_open(self, nbytes: int) -> None:
        """The next ``nbytes`` of the open message were received at ``open_end``."""
        self.open_end += nbytes

    def end_open(self) -> tuple[int, int]:
        """The open message is complete (or abandoned): ``(start, end)`` of its bytes.

        The scheduler commits ``end`` (:meth:`TxScheduler.commit`), or the
        bytes are dropped by not committing them.
        """
        span = (self.tail, self.open_end)
        self.open_owner = None
        self.open_end = self.tail
        return span

    def salvage(self) -> Salvage:
        """Cut back to the first message not fully written, after a stream died.

        Messages before ``head`` reached the kernel and count as written; the
        one ``head`` falls inside is re-sent from its first byte.
        """
        written_before = self.written_msgs
        pos = self._written_prefix()
        cut = 1 if self.runs and pos < self.head else 0
        shift = pos - BASE
        # An open message (continuation) travels with the outbox.
        end = self.open_end if self.open_owner is not None else self.tail
        self.buf[BASE : end - shift] = self.view[pos:end]
        for run in self.runs:
            run.end -= shift
        self.head, self.run_start = BASE, BASE
        self.tail -= shift
        self.open_end -= shift
        return Salvage(self.written_msgs - written_before, sum(r.msgs for r in self.runs), cut)

    def take_requests(self) -> list[Request]:
        """The records of every message still here, taken (an expired orphan's: refused)."""
        out = list(self.requests)
        self.requests.clear()
        return out

    def unwritten(self) -> list[tuple[Owner, int, int]]:
        """``(owner, first_seq, msgs)`` of every run not yet written (after :meth:`salvage`)."""
        return [(r.owner, r.first_seq, r.msgs) for r in self.runs if r.msgs]

    def statistics(self) -> OutboxStatistics:
        return OutboxStatistics(self.tail - self.head, sum(r.msgs for r in self.runs), len(self.owners))


class TxScheduler:
    """Connection selection for one group, as in the module docstring.

    Connections are opaque (:class:`Carrier`); the scheduler keeps which
    outbox each carries (:meth:`outbox_of`). Owners it lets route again are
    woken (:meth:`Owner.wake`) from whichever call freed the room.
    """

    def __init__(self) -> None:
        self._outbox: dict[Carrier, Outbox] = {}
        self._available: deque[Carrier] = deque()
        self._waiters: deque[Owner] = deque()
        self._orphans: deque[Outbox] = deque()
        self._connected: set[Carrier] = set()
        #: connections whose last write the kernel refused (until they write again)
        self._blocked: set[Carrier] = set()
        self.pins: dict[Owner, Outbox] = {}
        #: owner -> connection handed to it when it came free while the owner
        #: waited; held for it (not available to others) until it reads
        self._reserved: dict[Owner, Carrier] = {}

    # -- connections -------------------------------------------------------

    def add(self, conn: Carrier, outbox: Outbox) -> None:
        """``conn`` carries ``outbox`` from now on."""
        self._outbox[conn] = outbox
        outbox.conn = conn
        outbox.orphaned_at = None

    def remove(self, conn: Carrier) -> Outbox | None:
        """``conn`` is gone for good (call :meth:`failed` first if its outbox may
        hold messages). Returns the outbox it carried, for reuse."""
        self.disconnected(conn)
        outbox = self._outbox.pop(conn, None)
        if outbox is not None and outbox.conn is conn:
            outbox.conn = None
        return outbox

    def outbox_of(self, conn: Carrier) -> Outbox:
        return self._outbox[conn]

    def connected(self, conn: Carrier) -> None:
        """``conn`` has a fresh TCP connection. It adopts an orphan if any."""
        self._connected.add(conn)
        self._settle(conn)

    def blocked(self, conn: Carrier) -> None:
        """The kernel refused part of ``conn``'s write: send others elsewhere until it writes."""
        self._blocked.add(conn)
        self._drop_available(conn)

    def failed(self, conn: Carrier, now: float = 0.0) -> Salvage:
        """``conn``'s stream died: cut its outbox back and hand it on."""
        self._connected.discard(conn)
        self._blocked.discard(conn)
        self._drop_available(conn)
        self._drop_reserved(conn)
        outbox = self._outbox[conn]
        salvage = outbox.salvage()
        if outbox.owners or outbox.open_owner is not None:
            # The slot gets an empty outbox; the old one, pins and order
            # intact, goes whole to the next available connection.
            self.add(conn, Outbox(outbox.capacity, outbox.reserve, outbox.length_at))
            outbox.conn = None
            outbox.orphaned_at = now
            self._orphans.append(outbox)
            for free in [c for c in self._available if self._empty(c)]:
                if not self._orphans:
                    break
                self._available.remove(free)
                self._adopt(free)
            for owner, reserved in list(self._reserved.items()):
                if not self._orphans:
                    break
                if not self._empty(reserved):
                    continue  # only an empty outbox can be swapped for the orphan
                del self._reserved[owner]
                self._waiters.appendleft(owner)
                self._adopt(reserved)
        else:
            _wake_all(outbox)
        return salvage

    def retire(self, conn: Carrier) -> None:
        """Take no new messages on ``conn`` (draining); its outbox still flushes.

        Clients pinned to it park until it is written, then go elsewhere.
        """
        self._connected.discard(conn)
        self._drop_available(conn)
        for owner, reserved in list(self._reserved.items()):
            if reserved is conn:
                del self._reserved[owner]
                self._waiters.appendleft(owner)
                owner.wake()

    def disconnected(self, conn: Carrier) -> None:
        """``conn`` is gone for good (group stopping); nothing is salvaged."""
        self._connected.discard(conn)
        self._blocked.discard(conn)
        self._drop_available(conn)
        self._drop_reserved(conn)

    def _drop_reserved(self, conn: Carrier) -> None:
        for owner, reserved in list(self._reserved.items()):
            if reserved is conn:
                del self._reserved[owner]

    def _drop_available(self, conn: Carrier) -> None:
        try:
            self._available.remove(conn)
        except ValueError:
            pass

    # -- clients -----------------------------------------------------------

    def route_fresh(self, owner: Owner, age: Callable[[Any], int]) -> Carrier | None:
        """Like :meth:`route` for an unpinned owner, but take the available
        connection with the least ``age(conn)`` (written requests, say): the
        one least likely to be recycled soon. For retried requests."""
        if owner not in self.pins and owner not in self._reserved and len(self._available) > 1:
            best = min(self._available, key=age)
            self._available.remove(best)
            self._available.appendleft(best)
        return self.route(owner)

    def route(self, owner: Owner) -> Carrier | None:
        """Where ``owner``'s next messages go, or None (it was queued to wait).

        The outbox of the connection returned (:meth:`outbox_of`) has room
        for at least one packet. The caller receives into it and reports
        with :meth:`commit`, even if it took nothing.
        """
        outbox = self.pins.get(owner)
        if outbox is not None:
            conn = outbox.conn
            # While others wait (for a connection, parked on this outbox, or
            # handed this connection and not yet read) its turn is over: it
            # parks, so the outbox drains and the connection goes to the
            # longest waiter (rule 4). Refilling would hold the connection for
            # as long as it keeps sending when the connection, not the
            # clients, is the bottleneck; and refilling the room just handed
            # to a waiter would send that waiter back to the queue, every time.
            others = (self._waiters or (outbox.parked and outbox.parked != [owner])
                      or (self._reserved and conn in self._reserved.values()))
            if conn is not None and conn in self._connected and not others and outbox.make_room():
                return conn
            if owner not in outbox.parked:
                outbox.parked.append(owner)
            return None
        conn = self._reserved.pop(owner, None)
        if conn is not None:
            if conn in self._connected:
                if self._outbox[conn].make_room():
                    return conn
                # An open message (continuation) took it meanwhile: still first in line.
                self._waiters.appendleft(owner)
                return None
        else:
            available = self._available
            while available:
                conn = available[0]
                if self._outbox[conn].make_room():
                    available.rotate(-1)  # the next client takes the next connection
                    return conn
                # Full behind a blocked write, or an open message (continuation)
                # holds it: nobody may land there until it has room again.
                available.popleft()
        if owner not in self._waiters:
            self._waiters.append(owner)
        return None

    def commit(self, owner: Owner, outbox: Outbox, new_tail: int, msgs: int, first_seq: int = 0) -> int:
        """``owner`` filled ``outbox`` up to ``new_tail`` with ``msgs`` whole
        messages, seqs ``first_seq`` onwards (0: it took nothing). Returns ``msgs``.

        The one door for bytes into an outbox, whoever fills it: a client's
        packets (after :meth:`route`), the last piece of a message in pieces
        (its open message, after :meth:`open`), retried requests. The owner
        and the connection count what was accepted, the connection writes
        when the pass ends, and owners that may route again are woken.
        """
        conn = outbox.conn
        whole = outbox.open_owner is owner
        if whole:
            # The last piece of its message in pieces: the whole message is committed.
            new_tail = outbox.end_open()[1]
            msgs = 1
        if msgs:
            nbytes = new_tail - outbox.tail
            outbox.add_run(owner, new_tail, msgs, first_seq)
            self.pins[owner] = outbox
            owner.count_accepted(msgs, nbytes)
        if whole and outbox.parked and outbox.make_room():
            _wake_all(outbox)  # the outbox is everyone's again
        if conn is not None:
            if conn in self._available:
                if not outbox.make_room():
                    self._drop_available(conn)
            elif conn in self._connected:
                # A connection reserved for it (or held by its open message)
                # goes on to the next waiter, or back among the available.
                self._settle(conn)
            if msgs:
                conn.count_accepted(msgs, nbytes)
                conn.flush_soon()
        return msgs

    def open(self, owner: Owner, conn: Carrier) -> Outbox:
        """``owner`` starts a message in pieces on ``conn`` (see :meth:`Outbox.open`);
        nobody else lands in that outbox until it is committed or dropped."""
        outbox = self._outbox[conn]
        outbox.open(owner)
        self._drop_available(conn)
        return outbox

    def drop_open(self, owner: Owner, outbox: Outbox) -> None:
        """``owner``'s message in pieces was refused, or it left: its bytes are
        dropped and others may use the outbox again."""
        if outbox.open_owner is not owner:
            return
        outbox.end_open()
        if outbox.parked and outbox.make_room():
            _wake_all(outbox)
        conn = outbox.conn
        if conn is not None:
            self._settle(conn)

    def written(self, conn: Carrier, n: int) -> None:
        """``n`` bytes of ``conn``'s outbox went to the kernel."""
        outbox = self._outbox[conn]
        for owner in outbox.advance(n):
            if self.pins.get(owner) is outbox:
                del self.pins[owner]
        self._blocked.discard(conn)
        if outbox.parked and outbox.make_room():
            _wake_all(outbox)
        if conn in self._available:
            if self._orphans and self._empty(conn):
                self._drop_available(conn)  # written out: it adopts an orphan instead
                self._adopt(conn)
        else:
            self._settle(conn)

    def forget(self, owner: Owner) -> None:
        """``owner`` left. Its queued bytes still go out; it just stops waiting."""
        try:
            self._waiters.remove(owner)
        except ValueError:
            pass
        outbox = self.pins.get(owner)
        if outbox is not None and owner in outbox.parked:
            outbox.parked.remove(owner)
        conn = self._reserved.pop(owner, None)
        if conn is not None:
            self._settle(conn)

    # -- internals ---------------------------------------------------------

    def _empty(self, conn: Carrier) -> bool:
        outbox = self._outbox[conn]
        return not outbox.pending and not outbox.owners and outbox.open_owner is None

    def _settle(self, conn: Carrier) -> None:
        """``conn`` may take messages again: adopt an orphan, serve a waiter, or be available."""
        outbox = self._outbox[conn]
        if conn not in self._connected or conn in self._blocked or outbox.open_owner is not None:
            return
        if self._orphans and self._empty(conn):
            self._adopt(conn)
            return
        if conn in self._available or conn in self._reserved.values() or not outbox.make_room():
            return
        if self._waiters:
            # Hand the connection to the longest waiter, so a busy client
            # that keeps refilling cannot starve the others.
            owner = self._waiters.popleft()
            self._reserved[owner] = conn
            owner.wake()
            return
        self._available.append(conn)

    def _adopt(self, conn: Carrier) -> None:
        # The slot that lost the orphan already got a fresh outbox, so
        # conn's empty one is simply dropped.
        orphan = self._orphans.popleft()
        self.add(conn, orphan)
        conn.flush_soon()
        _wake_all(orphan)

    def has_orphans(self) -> bool:
        return bool(self._orphans)

    def expire_orphans(self, now: float, timeout: float) -> list[Outbox]:
        """Orphans no connection adopted within ``timeout``: given back, never to be written.

        The shell refuses each message still in the returned outboxes
        (:meth:`Outbox.unwritten` names them by seq, ``requests`` holds their
        records) and aborts an open message. Their owners are unpinned, told
        what was given back (:meth:`Owner.count_given_back`), and woken if parked.
        """
        expired = [o for o in self._orphans if o.orphaned_at is not None and now - o.orphaned_at >= timeout]
        for outbox in expired:
            self._orphans.remove(outbox)
            for owner in list(outbox.owners):
                if self.pins.get(owner) is outbox:
                    del self.pins[owner]
            for run in outbox.runs:
                if run.msgs:
                    run.owner.count_given_back(run.msgs)
            _wake_all(outbox)
        return expired

    def orphans(self) -> list[Outbox]:
        return list(self._orphans)

    def statistics(self) -> "SchedulerStatistics":
        return SchedulerStatistics(
            available=len(self._available),
            connected=len(self._connected),
            waiting_clients=len(self._waiters),
            pinned_clients=len(self.pins),
            orphaned_msgs=sum(sum(r.msgs for r in o.runs) for o in self._orphans),
            orphaned_bytes=sum(o.pending for o in self._orphans),
        )


def _wake_all(outbox: Outbox) -> None:
    """Wake the owners parked on ``outbox``: it has room, or it is gone."""
    parked = outbox.parked
    if parked:
        outbox.parked = []
        for owner in parked:
            owner.wake()


@dataclass(frozen=True, slots=True)
class SchedulerStatistics:
    #: Connections connected with nothing to write.
    available: int
    #: Connections with a live TCP stream.
    connected: int
    #: Clients with messages waiting for any connection to come free.
    waiting_clients: int
    #: Clients whose backlog is pinned to one outbox.
    pinned_clients: int
    #: Messages/bytes from failed connections not yet adopted by another.
    orphaned_msgs: int
    orphaned_bytes: int


__all__.append("SchedulerStatistics")
