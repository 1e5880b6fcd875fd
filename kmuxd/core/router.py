"""Request/response steering (``steering = "id"`` and ``"fifo"``): who gets each response, with no I/O.

Theory of operation
-------------------
In these modes every DATA message a client sends is a *request* and gets a
:class:`Request` record when the daemon accepts it into an outbox. The
record follows its bytes through a lifecycle kept as a table
(:data:`TRANSITIONS`); an input the table does not allow raises
:class:`~kmux.errors.IllegalTransition` (a bug, never a wire error)::

    PENDING --write--> WRITTEN --answer--> DONE      (response delivered)
       |                  |---lose------> DONE       (connection_lost notice)
       |                  |---retry-----> PENDING    (written again elsewhere)
       |                  `---time_out--> TIMED_OUT  (request_timeout notice)
       |---time_out--> TIMED_OUT --answer/lose/expire--> DONE (late: discarded, no 2nd notice)
       |---expire----> DONE                          (group_unavailable notice: never written)
       `---answer----> DONE                          (fifo: answered before its write was counted)

* **pending**: its bytes are in an outbox (``outbox.requests``, one record
  per message, in order). If the connection dies first, the bytes are
  re-sent elsewhere with the outbox (KCM's retry from byte 0) and the
  record goes with them, still pending.
* **written**: the bytes reached the kernel on a connection; the record is
  in that connection's :class:`Flight`. If the connection dies or is
  recycled before the answer, the request is written again on another
  connection while it has ``retry_unanswered`` tries left (its bytes were
  kept for that), else its client gets one ``connection_lost`` notice.
* **timed out**: its client was told (``request_timeout``); in id mode its
  id stays reserved, so a late answer is recognised and discarded, never
  delivered to a newer request that reused the id.
* **done**: exactly one outcome reached the client (a response or one
  notice), or the client had left and the outcome was dropped and counted.

Matching a response:

* ``id``: the id at ``response_offset`` is looked up in the group's
  :class:`IdTable`. With ``rewrite`` each outgoing id is replaced by one
  unique among the group's requests in flight and the client's own id is
  put back into the response; without it, a second request with an id in
  flight is refused (``id_in_use``). A retried request gets a fresh wire id.
* ``fifo``: the oldest request on that connection that is not done:
  written ones first, then those still pending in its outbox (a server
  answers a request only after reading it, so that is the stream's order).

Invariants (``tests/unit/test_router.py`` checks them under random
schedules of writes, answers, losses, timeouts and late answers): every
request ends in exactly one outcome; a response only ever reaches the
client whose request it matched; per connection, fifo answers keep order.

Owners (clients) are opaque here except for a ``gone`` attribute (True
once the client left). Nothing here imports ``socket`` or ``trio``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Final, Iterable

from kmux.errors import BadFrame, IdInUse, IdsExhausted, IllegalTransition

from .latency import LatencyHistogram

__all__ = [
    "Request", "IdTable", "Flight", "FifoFlight", "IdFlight", "ResponseRouter", "RouterStatistics",
    "PENDING", "WRITTEN", "TIMED_OUT", "DONE", "TRANSITIONS", "STATE_NAMES", "retry_room", "RETRY_FRESH_WAIT",
]

# States and inputs are small ints so a transition is one dict lookup on the
# hot path (two per request); the table below is the whole machine. Final:
# mypyc inlines them (a plain module global is a dict lookup at every use).
PENDING: Final = 0
WRITTEN: Final = 1
TIMED_OUT: Final = 2
DONE: Final = 3
STATE_NAMES: Final = ("pending", "written", "timed_out", "done")
WRITE: Final = 0
ANSWER: Final = 1
LOSE: Final = 2
RETRY: Final = 3
TIME_OUT: Final = 4
EXPIRE: Final = 5
EVENT_NAMES: Final = ("write", "answer", "lose", "retry", "time_out", "expire")

TRANSITIONS: dict[tuple[int, int], int] = {
    (PENDING, WRITE): WRITTEN,
    (PENDING, ANSWER): DONE,
    (PENDING, TIME_OUT): TIMED_OUT,
    (PENDING, EXPIRE): DONE,
    (WRITTEN, ANSWER): DONE,
    (WRITTEN, LOSE): DONE,
    (WRITTEN, RETRY): PENDING,
    (WRITTEN, TIME_OUT): TIMED_OUT,
    (TIMED_OUT, WRITE): TIMED_OUT,
    (TIMED_OUT, ANSWER): DONE,
    (TIMED_OUT, LOSE): DONE,
    (TIMED_OUT, EXPIRE): DONE,
}
_NEXT: Final = {s * 8 + e: n for (s, e), n in TRANSITIONS.items()}


class Request:
    __slots__ = ("owner", "seq", "orig_id", "wire_id", "t0", "state", "flight", "payload", "tries")

    def __init__(self, owner: Any, seq: int, t0: float, orig_id: bytes | None = None,
                 wire_id: bytes | None = None) -> None:
        self.owner = owner
        self.seq = seq
        self.t0 = t0
        self.orig_id = orig_id  # the client's id (id mode)
        self.wire_id = wire_id  # the id on the wire (== orig_id without rewrite)
        self.state = PENDING
        #: The Flight it was written on (None while pending).
        self.flight: Flight | None = None
        #: A copy of its bytes (id rewritten), kept only when retry_unanswered > 0.
        self.payload: bytearray | None = None
        #: Times it was written again after its connection went away.
        self.tries = 0

    def fire(self, event: int) -> int:
        try:
            self.state = _NEXT[self.state * 8 + event]
        except KeyError:
            raise IllegalTransition(
                f"request seq {self.seq}: no transition from {STATE_NAMES[self.state]!r} on {EVENT_NAMES[event]!r}"
            ) from None
        return self.state

    def id_value(self) -> int | None:
        """The client's original id as an integer, for notices."""
        return None if self.orig_id is None else int.from_bytes(self.orig_id, "big")

    def __repr__(self) -> str:
        return f"Request(seq={self.seq}, state={STATE_NAMES[self.state]}, id={self.orig_id!r})"


class IdTable:
    """Group-wide ids in flight, keyed by the id bytes on the wire."""

    __slots__ = ("request_offset", "response_offset", "size", "rewrite", "_by_wire", "_next", "_space")

    def __init__(self, request_offset: int, response_offset: int, size: int, rewrite: bool) -> None:
        self.request_offset = request_offset
        self.response_offset = response_offset
        self.size = size
        self.rewrite = rewrite
        self._by_wire: dict[bytes, Request] = {}
        self._next = 0
        self._space = 1 << (8 * size)

    def __len__(self) -> int:
        return len(self._by_wire)

    def add(self, owner: Any, seq: int, t0: float, buf: Any, start: int, length: int) -> Request:
        """Register the request at ``buf[start:start+length]``; rewrites its id in place.

        Raises BadFrame (too short for its id), IdInUse or IdsExhausted; the
        message must then be refused and not written.
        """
        off = start + self.request_offset
        size = self.size
        if self.request_offset + size > length:
            raise BadFrame(f"a {length}-byte request cannot hold its {size}-byte id at offset {self.request_offset}")
        orig = bytes(buf[off : off + size])
        table = self._by_wire
        if not self.rewrite:
            if orig in table:
                raise IdInUse(f"id {int.from_bytes(orig, 'big')} is already in flight")
            req = Request(owner, seq, t0, orig, orig)
            table[orig] = req
            return req
        wire = self._fresh()
        buf[off : off + size] = wire
        req = Request(owner, seq, t0, orig, wire)
        table[wire] = req
        return req

    def rewire(self, req: Request, buf: Any, start: int) -> None:
        """A retried request gets a fresh wire id (written into its copy at ``buf[start:]``)."""
        if not self.rewrite:
            return  # the client's own id; its old connection is gone, so it cannot collide
        self.remove(req)
        wire = self._fresh()
        off = start + self.request_offset
        buf[off : off + self.size] = wire
        req.wire_id = wire
        self._by_wire[wire] = req

    def _fresh(self) -> bytes:
        table = self._by_wire
        if len(table) >= self._space:
            raise IdsExhausted(f"all {self._space} ids are in flight")
        # Next free id after the last one handed out: ids are reused as late
        # as possible, which keeps a stray late answer from matching.
        n = self._next
        size = self.size
        while True:
            wire = n.to_bytes(size, "big")
            n = (n + 1) % self._space
            if wire not in table:
                break
        self._next = n
        return wire

    def match(self, buf: Any, start: int, length: int) -> Request | None:
        """The request a response at ``buf[start:start+length]`` answers (it stays registered)."""
        off = self.response_offset
        if off + self.size > length:
            return None
        return self._by_wire.get(bytes(buf[start + off : start + off + self.size]))

    def restore(self, req: Request, buf: Any, start: int) -> None:
        """Put the client's own id back into its response (rewrite only)."""
        if self.rewrite:
            off = start + self.response_offset
            buf[off : off + self.size] = req.orig_id

    def remove(self, req: Request) -> None:
        wire = req.wire_id
        if wire is not None and self._by_wire.get(wire) is req:
            del self._by_wire[wire]


class Flight:
    """The requests written on one TCP connection and not done."""

    __slots__ = ("conn",)

    def __init__(self, conn: Any) -> None:
        #: The shell's connection, opaque here (for per-endpoint health).
        self.conn = conn

    def written(self, req: Request) -> None:
        raise NotImplementedError

    def forget(self, req: Request) -> None:
        raise NotImplementedError

    def take_all(self) -> list[Request]:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError


class FifoFlight(Flight):
    """Written order; done records at the front are dropped as matching passes them."""

    __slots__ = ("reqs",)

    def __init__(self, conn: Any) -> None:
        super().__init__(conn)
        self.reqs: deque[Request] = deque()

    def written(self, req: Request) -> None:
        self.reqs.append(req)

    def forget(self, req: Request) -> None:
        pass  # skipped lazily by match()

    def oldest(self, pending: Iterable[Request]) -> Request | None:
        reqs = self.reqs
        while reqs:
            req = reqs[0]
            if req.state != DONE:
                return req
            reqs.popleft()
        for req in pending:
            if req.state != DONE:
                return req
        return None

    def take_all(self) -> list[Request]:
        out = [r for r in self.reqs if r.state != DONE]
        self.reqs.clear()
        return out

    def count(self) -> int:
        return sum(1 for r in self.reqs if r.state != DONE)


class IdFlight(Flight):
    __slots__ = ("reqs",)

    def __init__(self, conn: Any) -> None:
        super().__init__(conn)
        self.reqs: dict[Request, None] = {}

    def written(self, req: Request) -> None:
        self.reqs[req] = None

    def forget(self, req: Request) -> None:
        self.reqs.pop(req, None)

    def take_all(self) -> list[Request]:
        out = list(self.reqs)
        self.reqs.clear()
        return out

    def count(self) -> int:
        return len(self.reqs)


@dataclass(frozen=True, slots=True)
class RouterStatistics:
    #: Requests accepted and neither answered, failed nor timed out.
    in_flight: int
    #: Responses that matched no request (counted, then dropped or balanced).
    unmatched: int
    #: Responses to requests that had timed out (discarded).
    late: int
    #: Responses, or notices, owed to clients that had left (discarded).
    dropped: int
    #: Requests answered with a connection_lost notice.
    failed: int
    #: Requests answered with a request_timeout notice.
    timed_out: int
    #: Requests refused with group_unavailable after they were accepted.
    expired: int
    #: Writes of a request again after its connection went away, and
    #: requests whose tries ran out (then connection_lost).
    retried: int
    retries_exhausted: int
    latency_p50: float | None
    latency_p99: float | None


class ResponseRouter:
    """Request records, matching and outcomes for one group (id or fifo)."""

    def __init__(self, mode: str, ids: IdTable | None, *, retry_unanswered: int = 0) -> None:
        if mode not in ("id", "fifo") or (mode == "id") != (ids is not None):
            raise ValueError("mode 'id' needs an IdTable, 'fifo' none")
        self.mode = mode
        self.ids = ids
        self.retry_unanswered = retry_unanswered
        #: a copy of each request's bytes is kept while retries are on
        self.keep_payload = retry_unanswered > 0
        #: requests neither done nor timed out, oldest first (for request_timeout)
        self.live: dict[Request, None] = {}
        #: owner -> its requests in ``live`` (client_max_in_flight)
        self.owed: dict[Any, int] = {}
        self.latency = LatencyHistogram()
        self.unmatched = self.late = self.dropped = 0
        self.failed = self.timed_out = self.expired = 0
        self.retried = self.retries_exhausted = 0

    def reconfigure(self, retry_unanswered: int) -> None:
        """A reload changed ``retry_unanswered`` (requests accepted from now on follow it)."""
        self.retry_unanswered = retry_unanswered
        self.keep_payload = retry_unanswered > 0

    # -- lifecycle ------------------------------------------------------------

    def flight(self, conn: Any) -> Flight:
        return IdFlight(conn) if self.ids is not None else FifoFlight(conn)

    def accept(self, owner: Any, seq: int, now: float, buf: Any, start: int, length: int) -> Request:
        """A request is being accepted into an outbox (id: its id is checked and rewritten in place).

        Raises BadFrame, IdInUse or IdsExhausted: refuse the message, do not write it.
        """
        if self.ids is not None:
            req = self.ids.add(owner, seq, now, buf, start, length)
        else:
            req = Request(owner, seq, now)
        if self.keep_payload:
            req.payload = bytearray(buf[start : start + length])
        self.live[req] = None
        self.owed[owner] = self.owed.get(owner, 0) + 1
        return req

    def owed_by(self, owner: Any) -> int:
        """Requests of ``owner`` neither answered nor told."""
        return self.owed.get(owner, 0)

    def room_for(self, owner: Any, limit: int) -> int | None:
        """How many more requests ``owner`` may have accepted now under ``limit`` in
        flight (0: none until one is answered or told); None: no limit applies."""
        if not limit:
            return None
        return max(0, limit - self.owed.get(owner, 0))

    def _unlive(self, req: Request) -> None:
        if self.live.pop(req, 0) is None:  # it was live: one fewer owed by its owner
            owner = req.owner
            left = self.owed[owner] - 1
            if left:
                self.owed[owner] = left
            else:
                del self.owed[owner]

    def written(self, req: Request, flight: Flight) -> None:
        """Its bytes reached the kernel on ``flight``'s connection."""
        if req.state == DONE:
            return  # fifo: answered while its batch was still being counted
        req.fire(WRITE)
        req.flight = flight
        flight.written(req)

    def match(self, flight: Flight, pending: Iterable[Request], buf: Any, pos: int, length: int) -> Request | None:
        """The request a response on ``flight``'s connection answers, or None (unmatched, counted)."""
        if self.ids is not None:
            req = self.ids.match(buf, pos, length)
        else:
            req = flight.oldest(pending)  # type: ignore[attr-defined]
        if req is None:
            self.unmatched += 1
        return req

    def answered(self, req: Request, now: float) -> bool:
        """A response matched ``req``. True: deliver it to ``req.owner``; False: discard it (counted)."""
        was = req.state
        req.fire(ANSWER)
        self._settle(req)
        if was == TIMED_OUT:
            self.late += 1
            return False
        self._unlive(req)
        if req.owner.gone:
            self.dropped += 1
            return False
        self.latency.record(now - req.t0)
        return True

    def undelivered(self, n: int) -> None:
        """``n`` responses matched their requests but their clients could not take
        them (a full queue with ``rx_overflow = "drop"``, a failed socket, a client
        that left with them queued): dropped, counted."""
        self.dropped += n

    def lost(self, flight: Flight) -> tuple[list[Request], list[Request]]:
        """``flight``'s connection went away. Returns (notify connection_lost, write again)."""
        notify: list[Request] = []
        retry: list[Request] = []
        for req in flight.take_all():
            req.flight = None
            if req.state == TIMED_OUT:
                req.fire(LOSE)
                self._settle(req)
                continue
            if req.owner.gone:
                req.fire(LOSE)
                self._finish(req)
                self.dropped += 1
                continue
            if req.payload is not None and req.tries < self.retry_unanswered and self._rewire(req):
                req.fire(RETRY)
                req.tries += 1
                self.retried += 1
                retry.append(req)
                continue
            req.fire(LOSE)
            self._finish(req)
            self.failed += 1
            if req.tries:
                self.retries_exhausted += 1
            notify.append(req)
        return notify, retry

    def expire(self, now: float, timeout: float) -> list[Request]:
        """Requests older than ``timeout``: each gets one request_timeout notice (returned)."""
        out: list[Request] = []
        owed: list[Request] = []
        for req in self.live:  # oldest first
            if now - req.t0 < timeout:
                break
            owed.append(req)
        for req in owed:
            self._unlive(req)
            req.fire(TIME_OUT)  # its id stays reserved: a late answer is discarded
            self.timed_out += 1
            if req.owner.gone:
                self.dropped += 1
            else:
                out.append(req)
        return out

    def refused(self, req: Request) -> bool:
        """A pending request will never be written (group_unavailable). True: tell its owner."""
        was = req.state
        req.fire(EXPIRE)
        self._settle(req)
        if was == TIMED_OUT:
            return False
        self._unlive(req)
        self.expired += 1
        if req.owner.gone:
            self.dropped += 1
            return False
        return True

    def _rewire(self, req: Request) -> bool:
        # A retried request gets a fresh wire id, so no answer to its first
        # copy can ever be taken for the second.
        if self.ids is None:
            return True
        try:
            self.ids.rewire(req, req.payload, 0)
        except IdsExhausted:
            return False
        return True

    def _finish(self, req: Request) -> None:
        self._unlive(req)
        self._settle(req)

    def _settle(self, req: Request) -> None:
        # A request that is done gives back its id and leaves its flight.
        if req.state != DONE:
            return
        if self.ids is not None:
            self.ids.remove(req)
        if req.flight is not None:
            req.flight.forget(req)
            req.flight = None
        req.payload = None

    def statistics(self) -> RouterStatistics:
        return RouterStatistics(
            in_flight=len(self.live),
            unmatched=self.unmatched,
            late=self.late,
            dropped=self.dropped,
            failed=self.failed,
            timed_out=self.timed_out,
            expired=self.expired,
            retried=self.retried,
            retries_exhausted=self.retries_exhausted,
            latency_p50=self.latency.percentile(50),
            latency_p99=self.latency.percentile(99),
        )


#: Seconds retried requests wait for a fresh connection before taking the freshest one.
RETRY_FRESH_WAIT: Final = 0.25


def retry_room(backlog: int, waited: float, *, limit: int | None, carried: int, queued: int, fresh: bool,
               coming: bool) -> int:
    """How many of ``backlog`` retried requests a connection may take now (0: wait).

    A retry must not be lost again with the next recycle, and servers that
    close after N requests close their connections at about the same time:

    * once the endpoint's limit is known (``limit``: the fewest answers its
      recycled connections gave), a connection takes retries only up to half
      of it, counting what it ``carried`` (requests written on it) and what is
      ``queued`` in its outbox already; the rest wait for a fresher connection
      (each slot dials its replacement at once) while one is ``coming``. When
      none is (every slot up, so the close that taught the limit was not a
      rule of the server's), they wait ``RETRY_FRESH_WAIT`` (``waited``: the
      oldest retry's wait so far), then take it;
    * before any limit is known, retries wait up to ``RETRY_FRESH_WAIT`` for a
      connection that carried nothing yet (``fresh``), then take any.

    Pure: no state, no clock of its own.
    """
    if limit is not None:
        room = limit // 2 - carried - queued
        if room <= 0 and waited >= RETRY_FRESH_WAIT and not coming:
            # The limit came from one close that need not repeat, and nothing
            # fresher is on its way: waiting could only end in group_unavailable.
            return backlog
        return room
    if not fresh and waited < RETRY_FRESH_WAIT:
        return 0
    return backlog
