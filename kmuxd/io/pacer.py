"""A group's paced clients: who is held for want of tokens, and the timers that release them.

Theory of operation
-------------------
``balance`` steering has no answers to count, so a client that streams is
paced instead while a light client is active (``client_rate_contended``;
the rule and the token bucket are :mod:`kmuxd.core.pacing`, "light" and
"contended" :mod:`kmuxd.core.contention`; the intake reports who streams
and who is light, :mod:`kmuxd.io.intake`). This is the shell around them:

* :meth:`Pacer.room` answers the intake's "how many may it take now?"
  (None: not paced), reading the clock once;
* :meth:`Pacer.hold` records a client out of tokens with the time its
  bucket holds a burst again, and starts one trio task that sleeps until
  then and releases it in a pass of its own (:meth:`Reactor.call
  <kmuxd.io.reactor.Reactor.call>`); a held client is not read (its
  messages wait in its own socket), and is held at most once at a time,
  so there is at most one task per client;
* the housekeeping tick releases whoever is due too
  (:meth:`Pacer.release_due`, :mod:`kmuxd.io.deadlines`): a backstop, and
  all a test without trio needs.

Invariants: a client is in :attr:`Pacer.held` exactly while it is held; a
client that leaves is forgotten (:meth:`Pacer.forget`), so a late timer
finds nothing to release.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from .group import Group
    from .members import Client

__all__ = ["Pacer"]


class Pacer:
    """The paced clients of one group (see the module docstring)."""

    def __init__(self, group: "Group") -> None:
        self.group = group
        #: Clients held for want of tokens now, each with when its bucket holds a burst again.
        self.held: dict[Any, float] = {}
        #: Times a client was held so, since start.
        self.holds = 0

    def room(self, client: "Client") -> int | None:
        """How many more messages ``client`` may be accepted now (0: hold it), or None:
        not paced (no rate set, or no light client other than it sent within contention_window)."""
        group = self.group
        cfg = group.cfg
        rate = cfg.client_rate_contended
        if not rate:
            return None
        now = group.clock()
        if not group.contention.contended(client.id, now, cfg.contention_window):
            return None
        return client.pace.room(now, rate, cfg.client_burst_contended)

    def hold(self, client: "Client") -> None:
        """``client`` is out of tokens: release it once its bucket holds a burst again."""
        group = self.group
        cfg = group.cfg
        at = client.pace.ready_at(cfg.client_rate_contended, cfg.client_burst_contended)
        self.holds += 1
        self.held[client] = at
        nursery = group.nursery
        if nursery is not None:
            nursery.start_soon(self._release_after, client, max(0.0, at - group.clock()))

    async def _release_after(self, client: "Client", delay: float) -> None:
        await trio.sleep(delay)
        self.group.reactor.call(self._release, client)

    def _release(self, client: "Client") -> None:
        if self.held.pop(client, None) is not None:
            client.unpace()

    def release_due(self, now: float) -> None:
        """Release the held clients whose buckets have refilled by ``now``."""
        for client, at in list(self.held.items()):
            if at <= now:
                self._release(client)

    def forget(self, client: "Client") -> None:
        """``client`` left: nothing to release any more."""
        self.held.pop(client, None)
