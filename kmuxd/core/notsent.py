"""How much unsent data a connection lets the kernel hold: its ``TCP_NOTSENT_LOWAT`` mark, as it goes.

Theory of operation
-------------------
kmuxd sets ``TCP_NOTSENT_LOWAT`` on every connection (``[groups.NAME.socket]
tcp_notsent_lowat``, the *floor*) so that the kernel's send buffer, which
autotuning grows to megabytes, does not swallow a thousand messages in one
write: messages beyond the mark wait in kmuxd, where clients take turns
(:mod:`kmuxd.core.sendq`).

A fixed mark in bytes is a different thing for different message sizes.
The kernel takes a write only while fewer than ``mark`` bytes are unsent,
and it reports the socket writable again only once fewer than *half* the
mark are unsent (``tcp_stream_memory_free(sk, wake)``: ``notsent << wake < lowat``,
since Linux 4.8's "tcp: reduce POLLOUT events caused by TCP_NOTSENT_LOWAT").
With 1 KiB messages, 128 KiB is 128 messages: the write
that follows a wake-up moves many. With 256 KiB messages, one message is
larger than the whole mark: every message is cut into pieces, each piece
waits for its own wake-up from a nearly drained buffer, and between them
the stream idles until kmuxd runs again (a pipeline bubble per piece). On
loopback that cost 8-18% of the 256 KiB flood rate and 15-23% more CPU per
message.

So the mark counts in messages as well as bytes. :class:`NotsentMark`
keeps, per connection, the largest message size committed to it lately
(each commit's mean: the scheduler reports messages and bytes per commit,
never a size per message), and the mark is::

    max(floor, messages × largest recent message size)

(``tcp_notsent_lowat_messages``, default :data:`~kmuxd.system.config.NOTSENT_LOWAT_MESSAGES_DEFAULT`).
The kernel then holds at most about that many of the group's largest
messages beyond what is in flight, whatever their size, and a wake-up
always has room for whole messages. Turns are decided per message, so a
few large messages queued in the kernel cost the other clients' turns no
more than the floor does with small ones.

"Lately" is one or two epochs of :data:`EPOCH_COMMITS` commits: the mark
rises at once when a larger message comes, and falls back (to the floor,
with small messages again) after at most two epochs without one. Each
change returns the new mark for the shell to set (one ``setsockopt``, only
when it changes); the common path is two comparisons.

Invariants: ``floor <= mark <= ceiling``; the mark changes only on
:meth:`NotsentMark.committed`; ``messages == 0`` keeps the mark at the floor.
No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EPOCH_COMMITS", "NotsentMark", "NotsentMarkStatistics"]

#: Commits per epoch: the mark follows the largest message of the last one or two epochs.
EPOCH_COMMITS = 256


@dataclass(frozen=True, slots=True)
class NotsentMarkStatistics:
    #: TCP_NOTSENT_LOWAT as last set, bytes.
    mark: int
    #: The configured floor (``tcp_notsent_lowat``), bytes.
    floor: int
    #: Times the mark was changed since the connection was made.
    changes: int


class NotsentMark:
    """One connection's TCP_NOTSENT_LOWAT: at least ``floor``, at least ``messages`` of its largest recent message."""

    __slots__ = ("floor", "messages", "ceiling", "mark", "changes", "_peak", "_previous", "_left")

    def __init__(self, floor: int, messages: int, ceiling: int) -> None:
        if not 1 <= floor <= ceiling or messages < 0:
            raise ValueError(f"bad mark: floor {floor}, messages {messages}, ceiling {ceiling}")
        self.floor = floor
        self.messages = messages
        self.ceiling = ceiling
        #: The mark the connection has now (set when it was dialled: the floor).
        self.mark = floor
        self.changes = 0
        self._peak = 0  # the largest message size of this epoch
        self._previous = 0  # ... and of the one before
        self._left = EPOCH_COMMITS

    def committed(self, msgs: int, nbytes: int) -> int:
        """``msgs`` whole messages of ``nbytes`` in all were committed to the connection.
        Returns the new mark when it changes (set it now), else 0."""
        if not self.messages or msgs <= 0:
            return 0
        size = nbytes // msgs
        if size > self._peak:
            self._peak = size
        self._left -= 1
        if self._left <= 0:
            self._previous = self._peak
            self._peak = 0
            self._left = EPOCH_COMMITS
        elif size * self.messages <= self.mark:
            return 0  # the common path: nothing larger than the mark allows for
        want = max(self._peak, self._previous) * self.messages
        want = min(max(self.floor, want), self.ceiling)
        if want == self.mark:
            return 0
        self.mark = want
        self.changes += 1
        return want

    def statistics(self) -> NotsentMarkStatistics:
        return NotsentMarkStatistics(mark=self.mark, floor=self.floor, changes=self.changes)
