"""How fast one client may send while others are active: the rule behind ``client_rate_contended``.

Theory of operation
-------------------
In ``balance`` steering nothing answers, so the in-flight limit of
``id``/``fifo`` (``client_max_in_flight_contended``) has nothing to count.
What a flooding client costs the others there is the CPU: kmuxd, the
flooder and the server each spend a few microseconds per message, and on a
host with few cores the light client's message, its server and kmuxd then
wait for a CPU behind them (measured: a lockstep client's p99 rose 12-22x,
the tail on both legs of its round trip, with every queue near empty).

So while the group is *contended* (another client sent within
``contention_window``, :mod:`kmuxd.core.contention`) each client may be
accepted at most ``rate`` messages a second, with bursts of up to
``burst``: a token bucket per client. A client out of tokens is *held*: it
is not read (its messages wait in its own socket, the push-back, nothing
lost) until :meth:`Pace.ready_at`, when its bucket holds a burst again; the
shell wakes it then. A lockstep client far below the rate never waits; a
client alone is never contended, so never paced.

Tokens refill while a client is not contended too, so a client that
becomes contended starts with a full burst.

Invariants: ``tokens <= burst`` (below 0 only after a read took more
than :meth:`Pace.room` allowed: a message in pieces); ``room() >= 0``; time is the
caller's clock (seconds, monotonic); ``rate`` and ``burst`` are passed on
each question, so a reload that changes them takes effect at once. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Pace", "PaceStatistics"]


@dataclass(frozen=True, slots=True)
class PaceStatistics:
    #: Messages it may be accepted now without waiting (as of the last question).
    tokens: float
    #: Times it was held for want of tokens, since it attached.
    holds: int


class Pace:
    """One client's token bucket (see the module docstring)."""

    __slots__ = ("tokens", "at", "holds")

    def __init__(self, burst: int, now: float) -> None:
        #: Messages it may be accepted now (fractional: refills continuously).
        self.tokens = float(burst)
        #: When ``tokens`` was last brought up to date.
        self.at = now
        self.holds = 0

    def room(self, now: float, rate: float, burst: int) -> int:
        """Whole messages it may be accepted at ``now`` (0: hold it until :meth:`ready_at`)."""
        tokens = self.tokens + (now - self.at) * rate
        if tokens > burst:
            tokens = float(burst)
        self.tokens = tokens
        self.at = now
        return int(tokens) if tokens > 0.0 else 0

    def spend(self, msgs: int) -> None:
        """``msgs`` of its messages were read (after :meth:`room`, at the same ``now``)."""
        self.tokens -= msgs

    def ready_at(self, rate: float, burst: int) -> float:
        """When its bucket holds a whole burst again (after :meth:`room`); counts a hold.

        Waking it only once a burst has refilled keeps wake-ups to one per
        ``burst`` messages, not one per message."""
        self.holds += 1
        missing = burst - self.tokens
        return self.at + (missing / rate if missing > 0 else 0.0)

    def statistics(self) -> PaceStatistics:
        return PaceStatistics(tokens=self.tokens, holds=self.holds)
