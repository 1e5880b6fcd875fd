"""A group's deadlines: one trio task that applies every timeout in a pass of its own.

Theory of operation
-------------------
Nothing on the data path keeps a timer: each object records when what it
waits for began (a request's ``t0``, a client's ``blocked_since``, an
orphan's ``orphaned_at``, a partial message's clock), and
:class:`Housekeeper` looks at all of them on a tick, a quarter of the
shortest timeout in use (``TICK_MIN`` to ``TICK_MAX``). Each tick is a pass
of its own (:meth:`Reactor.call <kmuxd.io.reactor.Reactor.call>`), with the
time read once from the shell's clock:

* ``request_timeout``: requests get ``request_timeout`` (late answers are
  discarded); timeouts in a row may eject their endpoint, whose connections
  are then replaced elsewhere;
* ``queue_timeout``: clients that waited that long for a connection have
  what waits unread refused, by seq; so do retried requests, and the
  messages of orphaned outboxes no connection adopted (``group_unavailable``);
* ``assembly_timeout`` (connections and clients with a partial message),
  the end of a retiring connection, ``max_connection_age``
  (:meth:`Slot.apply_deadlines <kmuxd.io.slot.Slot.apply_deadlines>`);
* ``client_idle_timeout`` and a slow consumer's grace
  (:meth:`AppSession.apply_deadlines <kmuxd.io.session.AppSession.apply_deadlines>`);
* paced clients (``client_rate_contended``) whose bucket has refilled: each
  has a timer of its own (:meth:`Pacer.hold <kmuxd.io.pacer.Pacer.hold>`),
  so this is only the backstop.

A test drives :meth:`Housekeeper.apply` with any ``now``, so no test of a
timeout needs to sleep.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import trio

from kmux.errors import GroupUnavailable, KmuxError, RequestTimeout
from kmux.protocol import Notice

from kmuxd.core.states import RetireReason
from kmuxd.system.config import Endpoint

if TYPE_CHECKING:
    from .group import Group
    from .members import Client

__all__ = ["Housekeeper", "TICK_MIN", "TICK_MAX"]

#: Bounds of the housekeeping tick, seconds.
TICK_MIN = 0.01
TICK_MAX = 0.5


class Housekeeper:
    """The deadlines of one group (see the module docstring)."""

    def __init__(self, group: "Group") -> None:
        self.group = group

    def tick(self) -> float:
        """Seconds between two passes over the deadlines."""
        cfg = self.group.cfg
        timeouts = [t for t in (cfg.request_timeout, cfg.queue_timeout, cfg.assembly_timeout,
                                cfg.client_idle_timeout, cfg.max_connection_age) if t > 0]
        return min(TICK_MAX, max(TICK_MIN, min(timeouts, default=TICK_MAX * 4) / 4))

    async def run(self) -> None:
        """The group's timer task: a pass over the deadlines every tick."""
        group = self.group
        while True:
            await trio.sleep(self.tick())
            group.reactor.call(self.apply, group.clock())

    def apply(self, now: float) -> None:
        """Every deadline at ``now`` (inside a pass)."""
        group = self.group
        cfg = group.cfg
        router = group.router
        if group.retry_feeder.queue:
            group.retry_feeder.feed()
        if router is not None and cfg.request_timeout > 0:
            for req in router.expire(now, cfg.request_timeout):
                group.tell(req, RequestTimeout(f"no response within request_timeout={cfg.request_timeout}s"))
                flight = req.flight
                if flight is not None and group.endpoints.request_timed_out(flight.conn.endpoint, now):
                    self._retire_endpoint(flight.conn.endpoint)
        if cfg.queue_timeout > 0:
            self._expire_queued(now, cfg.queue_timeout)
        for slot in group.every_slot():
            slot.apply_deadlines(now)
        for client in list(group.clients.values()):
            client.apply_deadlines(now)
        if group.pacer.held:  # each has a timer of its own; this is the backstop
            group.pacer.release_due(now)
        # Slow consumers are detached (not among its clients) while their last notice drains.
        for client in list(group.slow):
            client.apply_deadlines(now)

    def _expire_queued(self, now: float, timeout: float) -> None:
        """queue_timeout: what waited that long for a connection is refused, each by its seq."""
        group = self.group
        up = group.connections_up
        # With no connection up, say why: the last failed dial (a refused
        # connect, a TLS certificate, a handshake step), so an app's error names it.
        why = next((s.last_error for s in group.slots if s.last_error), None) if up == 0 else None

        def unavailable() -> KmuxError:
            return GroupUnavailable(
                f"no connection of group {group.cfg.name!r} took this message within queue_timeout={timeout}s "
                f"({up}/{len(group.slots)} connections up{f'; last failure: {why}' if why else ''}); "
                "it was not written and never will be"
            )

        counters = group.counters
        for client in list(group.clients.values()):
            counters.queue_timeouts += client.expire_queued(now, timeout, unavailable)
        router = group.router
        if router is not None:
            for req in group.retry_feeder.expire(now, timeout):
                if router.refused(req):
                    counters.queue_timeouts += 1
                    group.tell(req, unavailable())
        expired = group.sched.expire_orphans(now, timeout)
        for outbox in expired:
            # Only clients open messages and, in balance mode, own runs (the
            # retry feeder exists only in id/fifo steering).
            if outbox.open_owner is not None:
                cast("Client", outbox.open_owner).abort_open(unavailable())
            if router is not None:
                for req in outbox.take_requests():
                    if router.refused(req):
                        counters.queue_timeouts += 1
                        group.tell(req, unavailable())
            else:
                for owner, first_seq, msgs in outbox.unwritten():
                    if owner.gone:
                        continue
                    client = cast("Client", owner)
                    for seq in range(first_seq, first_seq + msgs):
                        counters.queue_timeouts += 1
                        err = unavailable()
                        err.details["seq"] = seq
                        client.notify(Notice.for_error(err))
        if expired:
            group.log.warning("orphans_expired", outboxes=len(expired), queue_timeout=timeout)

    def _retire_endpoint(self, endpoint: Endpoint) -> None:
        """An endpoint was ejected for request timeouts: its connections are replaced elsewhere."""
        for slot in self.group.slots:
            slot.retire_if_at(endpoint, RetireReason.ENDPOINT_EJECTED)
