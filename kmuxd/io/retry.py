"""The retry feeder: writes again the requests whose connection went away unanswered.

Theory of operation
-------------------
In ``id`` and ``fifo`` steering with ``retry_unanswered``, a request written
on a connection that closed before its answer came is handed back by the
router (:meth:`ResponseRouter.lost <kmuxd.core.router.ResponseRouter.lost>`)
with a copy of its bytes and a fresh wire id. :class:`RetryFeeder` queues
them and is their sender: an :class:`~kmuxd.core.sendq.Owner` like a client,
it routes for a connection (the freshest available, :meth:`TxScheduler.route_fresh
<kmuxd.core.sendq.TxScheduler.route_fresh>`), asks the pure admission rule
(:func:`~kmuxd.core.router.retry_room`) how many that connection may take,
copies their bytes into its outbox and commits them like any message.

A retried request that timed out meanwhile is given back to the router,
never written; one that waits ``queue_timeout`` for a connection is refused
with ``group_unavailable`` (:meth:`RetryFeeder.expire`).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, cast

from kmuxd.core.router import PENDING, Request, retry_room

if TYPE_CHECKING:
    from .conn import Conn
    from .group import Group

__all__ = ["RetryFeeder"]


class RetryFeeder:
    """The owner of a group's retried requests (see the module docstring)."""

    #: An Owner never leaves: retried requests are the group's own.
    gone = False

    def __init__(self, group: "Group") -> None:
        self.group = group
        #: retried requests and when each was queued, oldest first
        self.queue: deque[tuple[Request, float]] = deque()

    # -- Owner protocol: retried requests are no client's; nothing to count

    def count_accepted(self, msgs: int, nbytes: int) -> None:
        pass

    def count_written(self, msgs: int, nbytes: int) -> None:
        pass

    def count_given_back(self, msgs: int) -> None:
        pass

    def wake(self) -> None:
        """A connection may have room: feed at the end of this pass."""
        if self.queue:
            self.group.reactor.call_soon(self.feed)

    # -- the queue -----------------------------------------------------------------------

    def add(self, reqs: list[Request]) -> None:
        now = self.group.clock()
        self.queue.extend((req, now) for req in reqs)
        self.wake()

    def feed(self) -> None:
        """Write queued retries on connections that may take them now."""
        group = self.group
        sched = group.sched
        router = group.router
        queue = self.queue
        if router is None:
            return  # only id/fifo steering retries
        while queue:
            # The scheduler's carriers are this group's connections.
            conn = cast("Conn | None", sched.route_fresh(self, _requests_carried))
            if conn is None:
                return  # woken when a connection comes free
            outbox = sched.outbox_of(conn)
            room = retry_room(
                len(queue), group.clock() - queue[0][1],
                limit=group.endpoints.requests_per_connection(conn.endpoint),
                carried=conn.flight_total, queued=len(outbox.requests), fresh=not conn.requests,
                coming=group.connection_coming(),
            )
            if room <= 0:
                # Not fresh enough: give it back; Conn.start feeds us for a new one.
                sched.commit(self, outbox, outbox.tail, 0)
                return
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
                outbox.add_request(req)
                msgs += 1
            if not sched.commit(self, outbox, tail, msgs):
                return

    def expire(self, now: float, timeout: float) -> list[Request]:
        """Retries that waited ``timeout`` for a connection: never written (returned)."""
        out = []
        queue = self.queue
        while queue and now - queue[0][1] >= timeout:
            out.append(queue.popleft()[0])
        return out


def _requests_carried(conn: Any) -> int:
    return int(conn.flight_total)
