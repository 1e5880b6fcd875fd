"""The receive path's core: one TCP connection's incoming bytes, cut into messages.

Theory of operation
-------------------
:class:`Inbox` is the receive twin of :class:`~kmuxd.core.sendq.Outbox`: one
buffer allocated for the connection's life, cursors into it, the framing's
decoder and the assembly clock. The shell reads straight into
:meth:`Inbox.space` with one ``recv_into``, reports the count with
:meth:`Inbox.received`, then hands the complete messages to clients *from the
buffer* (no copy) and tells the inbox how far it got with :meth:`Inbox.take`.

::

    RX_BASE    head           parsed              tail
       |        |  m1 | m2 | m3  | partial message  |   free ...   |
                 `-- ends: [end(m1), end(m2), end(m3)]

Invariants (tested with random schedules in ``tests/unit/test_inbox.py``):

1. ``RX_BASE <= head <= parsed <= tail <= len(buf)``; ``ends`` is increasing,
   its last entry is ``parsed`` and its first is after ``head``.
2. The byte before ``head`` is always free to overwrite: it is the last
   byte of a message already handed over (or the scratch byte at
   ``RX_BASE - 1``). The shell writes the DATA kind byte there and sends
   ``buf[head-1:end]`` as one packet.
3. A partial message holds fewer than ``max_message`` bytes (the decoder
   skips or refuses a longer announced length, and a record as soon as the
   fragments announced so far leave no room for the rest; a skipped message
   holds at most ``max_message``: its stub and a fragment mark cut short),
   and one read adds at most
   ``read_buffer`` bytes, so the buffer never needs to grow: it is
   ``RX_BASE + read_buffer + max_message`` bytes.
4. The assembly clock runs only while a partial message waits for the
   *remote's* bytes: not while the shell itself has stopped reading (no
   ready receiver), which is push-back, not a slow remote. It starts at a
   message's first byte, so for a record it bounds the whole record (a
   record whose last fragment never comes), not each fragment.
5. The decoder sees the partial message again, from its first byte, at
   every read (wherever a compaction moved it): a record's decoder resumes
   its walk over the fragment headers from there, so a record that trickles
   in costs work in proportion to its bytes, not to its bytes times its reads.
6. A message over ``max_message`` (and within ``max_skip``) is *skipped*:
   while it goes by, the partial message is only its stub (its first bytes,
   the response id among them) and at most a fragment mark cut short; every
   other byte of it is dropped in the read that brought it. A read past its
   end leaves it in :attr:`Inbox.skip`, after the messages before it, and
   nothing after it is cut until the shell has handed it over
   (:meth:`Inbox.skip_taken`), so it keeps its place in the stream's order.
   The assembly clock runs over it as over any partial message.

::

    head       stub_end  (dropped)  next         tail
     | stub |  ..................  | m4 | m5 ...   |     skip = (head, stub_end, size)

No I/O here; nothing imports ``socket`` or ``trio``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from kmux.framing import NEED_MORE, SKIPPED, DecoderStatistics, FrameDecoder, Framing

__all__ = ["Inbox", "InboxStatistics", "RX_BASE"]

#: Offset of the first received byte: one scratch byte precedes it (invariant 2).
RX_BASE: Final = 1
#: The decoder's "no message under way" (Final: a C static, read at every read).
_NEED_MORE: Final = NEED_MORE


@dataclass(frozen=True, slots=True)
class InboxStatistics:
    #: Complete messages received and not yet handed over.
    ready_msgs: int
    #: Bytes received and not yet handed over (ready messages and the partial one).
    buffered_bytes: int
    #: Bytes of the message being assembled.
    partial_bytes: int
    decoder: DecoderStatistics


class Inbox:
    __slots__ = (
        "buf", "view", "size", "head", "tail", "parsed", "ends", "partial_since",
        "decoder", "read_buffer", "skip", "_split", "_low_water", "_skip_next",
    )

    def __init__(self, framing: Framing, max_message: int, read_buffer: int, max_skip: int | None = None,
                 keep: int = 0) -> None:
        """``max_skip``: skip messages over ``max_message`` up to this long (None: none);
        ``keep``: bytes of a skipped message's start to keep for the shell (an id's end)."""
        self.buf = bytearray(RX_BASE + read_buffer + max_message)
        self.view = memoryview(self.buf)
        self.size = len(self.buf)
        self.read_buffer = read_buffer
        self.decoder = FrameDecoder(framing, max_message, max_skip, keep)
        self._split = self.decoder.split
        # Compact before a read when less than this is free: a read smaller
        # than a quarter of read_buffer costs more in system calls than the
        # copy saves.
        self._low_water = read_buffer // 4
        self.head = self.tail = self.parsed = RX_BASE
        self.ends: list[int] = []
        #: When the partial message started waiting for the remote (None: none waits).
        self.partial_since: float | None = None
        #: A message skipped whole, after the ready messages: ``(start, stub_end, size)``,
        #: its stub at ``buf[start:stub_end]`` (invariant 6). None: none.
        self.skip: tuple[int, int, int] | None = None
        self._skip_next = 0  # where the message after it starts

    def reset(self) -> None:
        """Forget everything: a new TCP connection starts on a clean stream."""
        self.head = self.tail = self.parsed = RX_BASE
        self.ends = []
        self.partial_since = None
        self.skip = None
        self.decoder.reset()

    @property
    def skipping(self) -> bool:
        """A message over max_message is going by (its stub is the partial message)."""
        return self.decoder.skipping

    @property
    def partial_bytes(self) -> int:
        return self.tail - self.parsed

    def partial_text(self, max_message: int) -> str:
        """What waits for the remote, for an operator (an assembly timeout's reason)."""
        if self.decoder.skipping:
            return (f"a message over max_message ({max_message}), {self.decoder.skip_total} bytes "
                    f"announced and being skipped,")
        return f"a partial message of {self.partial_bytes} bytes"

    def space(self) -> memoryview:
        """Where the next read goes (compacting first when little is free).

        Only while no ready message waits (``not ends``): then at most a
        partial message precedes the free space, so at least a quarter of
        ``read_buffer`` is free (all of it right after a compaction) and a
        read never gets an empty buffer, which would look like end of file.
        """
        if self.head == self.tail:
            self.head = self.tail = self.parsed = RX_BASE
        elif self.size - self.tail < self._low_water:
            self._compact()
        # One read takes at most read_buffer bytes: that bounds the work one
        # connection brings into a pass (every message it completes is
        # steered in the same pass), so a flood of responses for one client
        # cannot stretch the passes that everyone else's messages wait for.
        tail = self.tail
        return self.view[tail : tail + self.read_buffer]

    def received(self, n: int, now: float) -> int:
        """``n`` bytes were read into :meth:`space`. Returns the number of ready
        messages, a skipped one (:attr:`skip`) included.

        Raises the decoder's :class:`~kmux.errors.RemoteFrameTooBig` or
        :class:`~kmux.errors.RemoteBadHeader`: the stream is then unusable.
        """
        self.tail += n
        if self.skip is None:
            self._cut(now)
        return self._ready()

    def skip_taken(self, now: float) -> int:
        """The skipped message was handed over (every ready message before it was):
        cut what follows it. Returns the number of ready messages, as :meth:`received`."""
        assert self.skip is not None and not self.ends
        self.skip = None
        self.head = self.parsed = self._skip_next
        if self.parsed < self.tail:
            self._cut(now)
        return self._ready()

    def _ready(self) -> int:
        # A method, not inline: after ``self.skip = None`` the compiler would take
        # ``self.skip`` for None even after _cut() set it (mypyc narrows attributes).
        return len(self.ends) + (self.skip is not None)

    def _cut(self, now: float) -> None:
        ends, consumed, pending = self._split(self.buf, self.parsed, self.tail)
        if ends:
            if self.ends:
                self.ends.extend(ends)
            else:
                self.ends = ends
            self.parsed = consumed
        if pending < _NEED_MORE:
            self._skipped(consumed, pending == SKIPPED, bool(ends), now)
        elif consumed < self.tail:
            # A partial message: its clock starts when its first bytes came
            # (a message that completed in this read restarted it).
            if ends or self.partial_since is None:
                self.partial_since = now
            if pending > 0 and self.parsed + pending > self.size:
                self._compact()
        else:
            self.partial_since = None

    def _skipped(self, start: int, whole: bool, fresh: bool, now: float) -> None:
        """The message at ``start`` is being skipped (invariant 6): drop what came of it."""
        decoder = self.decoder
        stub_end = start + decoder.skip_stub
        drop_to = decoder.skip_drop_to
        if whole:
            self.skip = (start, stub_end, decoder.skip_total)
            self._skip_next = drop_to
            self.partial_since = None
            return
        rest = self.tail - drop_to  # a fragment mark cut short: it stays, right after the stub
        if rest:
            self.buf[stub_end : stub_end + rest] = self.buf[drop_to : self.tail]
        self.tail = stub_end + rest
        if fresh or self.partial_since is None:
            self.partial_since = now

    def take(self, count: int, pos: int) -> None:
        """The first ``count`` ready messages were handed over; the next begins at ``pos``."""
        self.head = pos
        if count >= len(self.ends):
            self.ends = []
        else:
            del self.ends[:count]

    def pause_clock(self) -> None:
        """The shell stopped reading (push-back): a partial message is not the remote's delay."""
        self.partial_since = None

    def resume_clock(self, now: float) -> None:
        if self.tail > self.parsed and self.partial_since is None:
            self.partial_since = now

    def expired(self, now: float, timeout: float) -> bool:
        """Whether a partial message has waited ``timeout`` seconds for the remote."""
        since = self.partial_since
        return since is not None and now - since >= timeout

    def _compact(self) -> None:
        # Ready messages and the partial one move to the front. Whole
        # messages only move, never split, so ``ends`` shifts uniformly.
        shift = self.head - RX_BASE
        if shift <= 0:
            return
        self.buf[RX_BASE : self.tail - shift] = self.view[self.head : self.tail]
        self.head = RX_BASE
        self.tail -= shift
        self.parsed -= shift
        if self.ends:
            self.ends = [e - shift for e in self.ends]
        if self.skip is not None:
            start, stub_end, size = self.skip
            self.skip = (start - shift, stub_end - shift, size)
            self._skip_next -= shift

    def statistics(self) -> InboxStatistics:
        return InboxStatistics(
            ready_msgs=len(self.ends),
            buffered_bytes=self.tail - self.head,
            partial_bytes=self.tail - self.parsed,
            decoder=self.decoder.statistics(),
        )
