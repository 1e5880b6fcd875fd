"""Which endpoint a connection slot dials: spread over healthy ones, eject failing ones.

Theory of operation
-------------------
A group's slots share one :class:`EndpointPool`. A slot about to dial asks
:meth:`EndpointPool.choose`:

1. A *healthy* endpoint, the one carrying the fewest of the group's
   connections, so connections spread over the servers.
2. Otherwise an *ejected* endpoint whose back-off has run out and that no
   other slot is probing: this slot probes it. Only one slot probes an
   endpoint at a time, so a dead endpoint costs at most one dial per
   back-off step, however many slots the group has (no reconnect storm).
3. Otherwise nothing: the slot waits the returned number of seconds.

A failed dial, or a connection that dies before it was stable, ejects the
endpoint with the next (doubled, jittered) back-off step; a successful dial
makes it healthy again and resets its schedule. No I/O; the caller sleeps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Generic, TypeVar

from .backoff import Backoff

__all__ = ["EndpointPool", "EndpointStatistics"]

E = TypeVar("E")


class _Health:
    __slots__ = ("backoff", "ejected_until", "probing", "connections", "failures")

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff
        self.ejected_until: float | None = None  # None: healthy
        self.probing = False
        self.connections = 0
        self.failures = 0


@dataclass(frozen=True, slots=True)
class EndpointStatistics:
    endpoint: str
    healthy: bool
    connections: int
    #: Failed dials (and connections that died before they were stable) in a row.
    failures: int
    #: Seconds until an ejected endpoint may be probed again (0 when healthy or due).
    retry_in: float


class EndpointPool(Generic[E]):
    def __init__(self, endpoints: list[E], initial: float, maximum: float, rng: random.Random | None = None) -> None:
        rng = rng or random.Random()
        self.endpoints = list(endpoints)
        self._health = {ep: _Health(Backoff(initial, maximum, rng)) for ep in self.endpoints}

    def choose(self, now: float) -> tuple[E | None, float]:
        """``(endpoint, 0)`` to dial now, or ``(None, seconds)`` to wait first."""
        healthy = [ep for ep in self.endpoints if self._health[ep].ejected_until is None]
        if healthy:
            ep = min(healthy, key=lambda e: self._health[e].connections)
            self._health[ep].connections += 1  # counted from the dial on, so concurrent dials spread
            return ep, 0.0
        soonest = None
        for ep in self.endpoints:
            h = self._health[ep]
            if h.probing:
                continue
            if h.ejected_until <= now:
                h.probing = True
                h.connections += 1
                return ep, 0.0
            soonest = h.ejected_until if soonest is None else min(soonest, h.ejected_until)
        # Everything is being probed or backing off: look again when the
        # first back-off runs out (or shortly, if all are being probed).
        wait = (soonest - now) if soonest is not None else min(h.backoff.initial for h in self._health.values())
        return None, max(wait, 0.0)

    def connected(self, ep: E) -> None:
        """The dial :meth:`choose` returned succeeded: the endpoint is healthy."""
        h = self._health[ep]
        h.ejected_until = None
        h.probing = False
        h.failures = 0

    def closed(self, ep: E, now: float, *, stable: bool) -> None:
        """A connection to ``ep`` ended; one that was not stable counts as a failure.

        A stable one resets the endpoint's back-off schedule, so a server that
        accepts and closes at once keeps backing off instead of being redialled.
        """
        h = self._health[ep]
        h.connections -= 1
        if stable:
            h.backoff.reset()
        else:
            self._eject(h, now)

    def failed(self, ep: E, now: float) -> None:
        """The dial :meth:`choose` returned failed: eject for the next back-off step."""
        h = self._health[ep]
        h.connections -= 1
        self._eject(h, now)

    @staticmethod
    def _eject(h: _Health, now: float) -> None:
        h.probing = False
        h.failures += 1
        h.ejected_until = now + h.backoff.next_delay()

    def statistics(self, now: float) -> list[EndpointStatistics]:
        return [
            EndpointStatistics(
                endpoint=str(ep),
                healthy=h.ejected_until is None,
                connections=h.connections,
                failures=h.failures,
                retry_in=0.0 if h.ejected_until is None else max(0.0, h.ejected_until - now),
            )
            for ep, h in self._health.items()
        ]
