"""Which endpoint a connection slot dials, and when an endpoint is healthy: judged by traffic, not age.

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

Whatever the state, one endpoint is dialled at most ``max_dials_per_second``
times a second (a token bucket per endpoint): a server that accepts and
closes at once, or resets every connection, cannot make the group hammer it.
A connection that *answered* pays for its own replacement: its recycle (or
its planned make-before-break retirement) earns a dial credit that skips the
bucket, so a busy server that closes every 100 requests is redialled as
fast as it recycles, while an unproductive one stays bounded by the rate.

Health looks at what connections *did*:

* A connection closed by its server with a FIN after it answered, or with
  nothing asked of it after it had been open a moment (``CLOSED_AT_ONCE``),
  is a **recycle** (servers close after N requests, or when idle): the slot
  redials at once and the endpoint stays healthy.
  The first answer on a connection also resets the endpoint's back-off
  schedule.
* These **eject** the endpoint for the next back-off step (doubling, with
  jitter): a failed dial; a connection reset, or closed, before it answered
  anything; an assembly timeout (the server sent a partial message and
  stalled); ``eject_after_timeouts`` request timeouts in a row, unless it is
  the last healthy endpoint (a slow service beats none).
* A connection that dies *after* answering, other than by a FIN (a reset),
  is counted as a failure but does not eject by itself: the redial that
  follows decides, so a crashed server is ejected by its refused dials.

An attached connection (op ``attach``, :mod:`kmuxd.core.attach`) goes to
an :class:`~kmuxd.core.attach.AttachedPeer`, never one of the pool's
endpoints even at the same address: what happens on it is no evidence
about a configured endpoint, and it is never redialled. The pool ignores
it (``closed`` still says how it ended).

Each endpoint keeps the why and the when of its last failure for operators
(``kmux-cli group NAME``): the verdict (healthy, ejected, probing) is what
holds now; the last failure is history, shown with its age, so a healthy
endpoint never looks as if it were failing. No I/O; the caller sleeps.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from .backoff import Backoff

__all__ = ["EndpointPool", "EndpointStatistics", "Verdict", "HEALTHY", "EJECTED", "PROBING"]

E = TypeVar("E")

HEALTHY, EJECTED, PROBING = "healthy", "ejected", "probing"


class Verdict(str, enum.Enum):
    """How an ended connection counted for its endpoint's health (:meth:`EndpointPool.closed`)."""

    #: The server closed it after serving it (or for idleness): redial at once.
    RECYCLE = "recycle"
    #: It failed (reset, or closed before answering): counted, maybe ejected.
    FAILURE = "failure"
    #: We closed it: no verdict on the server.
    REQUESTED = "requested"


#: A connection closed by its server sooner than this after it was accepted,
#: without an answer, is a failure (an accept-and-close server), not an idle close.
CLOSED_AT_ONCE = 0.05
#: Recycles whose request counts an endpoint remembers (its learned limit).
RECYCLES_REMEMBERED = 8
#: Dial credits one endpoint may bank (one per productive connection that ended).
CREDITS_MAX = 64


class _Health:
    __slots__ = (
        "backoff", "ejected_until", "probing", "connections", "failures", "failures_total", "recycles",
        "reason", "reason_at", "timeouts", "tokens", "tokens_at", "credits", "recycled_after",
    )

    def __init__(self, backoff: Backoff, burst: float) -> None:
        self.backoff = backoff
        self.ejected_until: float | None = None  # None: healthy
        self.probing = False
        self.connections = 0
        self.failures = 0  # in a row, reset by an answer
        self.failures_total = 0
        self.recycles = 0
        self.reason: str | None = None  # why it last failed
        self.reason_at = 0.0  # when
        self.timeouts = 0  # request timeouts in a row
        self.tokens = burst  # dials allowed now (token bucket)
        self.tokens_at = 0.0
        self.credits = 0  # dials earned by productive connections (skip the bucket)
        #: answers given on the last connections the server recycled with requests unanswered
        self.recycled_after: deque[int] = deque(maxlen=RECYCLES_REMEMBERED)


@dataclass(frozen=True, slots=True)
class EndpointStatistics:
    endpoint: str
    #: The verdict now: "healthy", "ejected" (backing off) or "probing" (one slot is trying it).
    state: str
    #: Why it last failed (None if never): history, whatever the verdict now.
    reason: str | None
    connections: int
    #: Connections its server closed after answering (not failures).
    recycles: int
    #: Failures since start (failed dials, early closes, resets, timeouts).
    failures: int
    #: Seconds until an ejected endpoint may be probed again (0 when healthy or due).
    retry_in: float
    #: Seconds since that last failure (None if never).
    reason_age: float | None = None

    @property
    def healthy(self) -> bool:
        return self.state == HEALTHY


class EndpointPool(Generic[E]):
    def __init__(self, endpoints: list[E], initial: float, maximum: float, rng: random.Random | None = None, *,
                 max_dials_per_second: float = 10.0, eject_after_timeouts: int = 0) -> None:
        rng = rng or random.Random()
        self.endpoints = list(endpoints)
        self.rate = max_dials_per_second
        # A burst of one second's worth (at least one dial) lets a group's
        # slots dial at start-up together.
        self.burst = max(1.0, max_dials_per_second)
        self.eject_after_timeouts = eject_after_timeouts
        self._health = {ep: _Health(Backoff(initial, maximum, rng), self.burst) for ep in self.endpoints}

    # -- choosing --------------------------------------------------------------

    def choose(self, now: float) -> tuple[E | None, float]:
        """``(endpoint, 0)`` to dial now, or ``(None, seconds)`` to wait first."""
        for h in self._health.values():
            self._refill(h, now)
        healthy = [ep for ep in self.endpoints if self._health[ep].ejected_until is None]
        if healthy:
            ready = [ep for ep in healthy if self._health[ep].tokens >= 1.0 or self._health[ep].credits]
            if not ready:
                return None, min(self._token_wait(self._health[ep]) for ep in healthy)
            ep = min(ready, key=lambda e: self._health[e].connections)
            self._dial(self._health[ep])
            return ep, 0.0
        soonest = None
        for ep in self.endpoints:
            h = self._health[ep]
            if h.probing or h.ejected_until is None:
                continue
            due = max(h.ejected_until, now + self._token_wait(h))
            if due <= now:
                h.probing = True
                self._dial(h)
                return ep, 0.0
            soonest = due if soonest is None else min(soonest, due)
        # Everything is being probed or backing off: look again when the
        # first back-off runs out (or shortly, if all are being probed).
        wait = (soonest - now) if soonest is not None else min(h.backoff.initial for h in self._health.values())
        return None, max(wait, 0.0)

    def _dial(self, h: _Health) -> None:
        if h.credits and h.tokens < 1.0:
            h.credits -= 1
        else:
            h.tokens -= 1.0
        h.connections += 1  # counted from the dial on, so concurrent dials spread

    def reconfigure(self, max_dials_per_second: float, eject_after_timeouts: int) -> None:
        """A reload changed the dial rate or the ejection rule (health is kept)."""
        self.rate = max_dials_per_second
        self.burst = max(1.0, max_dials_per_second)
        self.eject_after_timeouts = eject_after_timeouts

    def _refill(self, h: _Health, now: float) -> None:
        if now > h.tokens_at:
            h.tokens = min(self.burst, h.tokens + (now - h.tokens_at) * self.rate)
            h.tokens_at = now

    def _token_wait(self, h: _Health) -> float:
        return 0.0 if h.tokens >= 1.0 else (1.0 - h.tokens) / self.rate

    # -- what the dial and the connection did ----------------------------------------

    def connected(self, ep: E) -> None:
        """The dial :meth:`choose` returned succeeded. The endpoint takes dials
        again, but its back-off schedule is reset only by an answer."""
        h = self._health[ep]
        h.ejected_until = None
        h.probing = False

    def dial_failed(self, ep: E, now: float, reason: str = "dial failed") -> None:
        """The dial :meth:`choose` returned failed: eject for the next back-off step."""
        h = self._health[ep]
        h.connections -= 1
        h.failures_total += 1
        self._eject(h, now, reason)

    def failed(self, ep: E, now: float) -> None:
        """The dial failed, for callers that give no reason."""
        self.dial_failed(ep, now)

    def answered(self, ep: E) -> None:
        """A connection to ``ep`` delivered an answer: proof of health."""
        h = self._health.get(ep)
        if h is None:
            return  # an attached connection: not one of the pool's endpoints
        h.failures = 0
        h.timeouts = 0
        h.backoff.reset()

    def request_timed_out(self, ep: E, now: float) -> bool:
        """A request on ``ep`` timed out. True if that ejected the endpoint.

        Timeouts never eject the last healthy endpoint: a slow service is
        still better than none (Envoy's outlier detection keeps a floor too).
        """
        h = self._health.get(ep)
        if h is None:
            return False  # an attached connection: never ejected, never redialled
        h.timeouts += 1
        others = any(o is not h and o.ejected_until is None for o in self._health.values())
        if self.eject_after_timeouts and h.timeouts >= self.eject_after_timeouts and others:
            h.timeouts = 0
            h.failures_total += 1
            self._eject(h, now, f"{self.eject_after_timeouts} request timeouts in a row")
            return True
        return False

    def closed(self, ep: E, now: float, *, answered: bool, graceful: bool, reason: str = "",
               requested: bool = False, unanswered: bool = True, age: float = float("inf"),
               answers: int = 0) -> Verdict:
        """A connection to ``ep`` ended. Returns how it counted (a :class:`Verdict`).

        ``answered``: it delivered at least one answer (or, with nothing to
        answer, carried traffic); ``graceful``: the server closed it with a
        FIN (not a reset, timeout or error); ``requested``: we closed it
        (operator reconnect, drain, recycling, reload); ``unanswered``: it
        had written something that got no answer (an idle connection the
        server closed had not); ``age``: seconds it was open. A server that
        closes a connection it was never asked anything on is closing it for
        idleness, unless it does so at once (within ``CLOSED_AT_ONCE``): a
        server that accepts and closes at once is failing.
        """
        h = self._health.get(ep)
        if h is None:  # an attached connection: how it ended, but no health to keep
            return Verdict.REQUESTED if requested else Verdict.RECYCLE if graceful else Verdict.FAILURE
        h.connections -= 1
        if requested:
            if answered:
                h.credits = min(h.credits + 1, CREDITS_MAX)
            return Verdict.REQUESTED
        if graceful and (answered or (not unanswered and age >= CLOSED_AT_ONCE)):
            h.recycles += 1
            if answered:
                h.credits = min(h.credits + 1, CREDITS_MAX)
                if unanswered:
                    h.recycled_after.append(answers)  # the server's own limit, as it shows
            return Verdict.RECYCLE
        h.failures_total += 1
        if answered:
            self._failed(h, now, reason or "reset after answering")
            return Verdict.FAILURE  # the redial decides
        self._eject(h, now, reason or ("closed before answering" if graceful else "reset before answering"))
        return Verdict.FAILURE

    def requests_per_connection(self, ep: E) -> int | None:
        """The fewest answers ``ep`` gave on a connection before it closed it with
        requests unanswered, over its last recycles (None: not seen)."""
        seen = self._health[ep].recycled_after
        return min(seen) if seen else None

    def eject(self, ep: E, now: float, reason: str) -> None:
        """Eject ``ep`` now (an assembly timeout, say)."""
        h = self._health.get(ep)
        if h is None:
            return  # an attached connection: there is nothing to eject from
        h.failures_total += 1
        self._eject(h, now, reason)

    def _eject(self, h: _Health, now: float, reason: str) -> None:
        h.probing = False
        h.failures += 1
        self._failed(h, now, reason)
        h.ejected_until = now + h.backoff.next_delay()

    @staticmethod
    def _failed(h: _Health, now: float, reason: str) -> None:
        h.reason = reason
        h.reason_at = now

    # -- statistics ------------------------------------------------------------------

    def statistics(self, now: float) -> list[EndpointStatistics]:
        out = []
        for ep, h in self._health.items():
            if h.ejected_until is None:
                state = HEALTHY
            else:
                state = PROBING if h.probing else EJECTED
            out.append(EndpointStatistics(
                endpoint=str(ep),
                state=state,
                reason=h.reason,
                connections=h.connections,
                recycles=h.recycles,
                failures=h.failures_total,
                retry_in=0.0 if h.ejected_until is None else max(0.0, h.ejected_until - now),
                reason_age=None if h.reason is None else max(0.0, now - h.reason_at),
            ))
        return out
