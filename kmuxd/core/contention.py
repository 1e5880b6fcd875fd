"""Whether another client is sending: the rule behind ``client_max_in_flight_contended``
and ``client_rate_contended``.

Theory of operation
-------------------
A server answers a request after the ones it already holds, so a light
client's round trip grows with every request a heavy one keeps in flight
there. While the group is *contended* (another client sent a request
within ``contention_window``), the shell holds each client to the smaller
in-flight limit; otherwise the ordinary one applies.

In ``balance`` steering the shell reports only *light* senders here
(clients that send a message at a time, :mod:`kmuxd.io.intake`), so
"contended" means "a light client other than this one is active": that
is when a client that streams is paced (:mod:`kmuxd.core.pacing`).
Clients that all stream share the connections by turns, unpaced.

Asking "did anyone other than C send lately?" needs only the last two
distinct senders: the one read last (and when), and when the sender
before its streak last sent. For C the last sender, the other is the one
before its streak; for anyone else, it is the last sender itself. So the
cost is one comparison per client read, not per message, and nothing
grows with the number of clients.

Invariants: ``_other_sent_at <= _last_sent_at``; times are the caller's
clock (seconds, monotonic); the window is passed on each question, so a
reload that changes it takes effect at once.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Contention", "ContentionStatistics"]

_NEVER = float("-inf")


@dataclass(frozen=True, slots=True)
class ContentionStatistics:
    #: The client read last (-1: none yet).
    last_sender: int
    #: When it was last read, and when the sender before its streak last sent.
    last_sent_at: float
    other_sent_at: float


class Contention:
    """Who sent last, and whether another client sent within a window."""

    __slots__ = ("_last_sender", "_last_sent_at", "_other_sent_at")

    def __init__(self) -> None:
        self._last_sender = -1
        self._last_sent_at = _NEVER
        self._other_sent_at = _NEVER

    def sent(self, client_id: int, now: float) -> None:
        """``client_id`` is being read at ``now``."""
        if client_id != self._last_sender:
            self._other_sent_at = self._last_sent_at
            self._last_sender = client_id
        self._last_sent_at = now

    def contended(self, client_id: int, now: float, window: float) -> bool:
        """Did a client other than ``client_id`` send within ``window`` seconds of ``now``?"""
        other = self._other_sent_at if client_id == self._last_sender else self._last_sent_at
        return now - other < window

    def statistics(self) -> ContentionStatistics:
        return ContentionStatistics(self._last_sender, self._last_sent_at, self._other_sent_at)
