"""Opt-in reconnecting: the policy and the accounting, with no I/O.

Theory of operation
-------------------
kmuxd numbers a connection's DATA packets from 1 (the *connection seq*).
When it stops gracefully it tells each client ``{"event": "shutdown",
"accepted": N}``: every packet up to N was read and will be written (or was
refused with its own notice), every packet after N was never read. A crash
tells nothing: whatever was sent on that connection has an unknown fate.

:class:`ReconnectCore` keeps what a reconnecting client needs to act on that:

* **seq.** The app sees one *message seq* per client, counted from 1 across
  reconnects; a re-sent message keeps its seq. Each connection carries first
  the re-sent messages (their seqs are kept), then new ones numbered on, so
  :meth:`ReconnectCore.message_seq` maps a connection seq (the daemon's
  count, which notices name) back to the message seq.
* **Resend buffer.** Every message sent since the last accounted seq, oldest
  first, bounded by count and bytes. A message past the bound is dropped from
  the buffer, counted and reported at once (:class:`Overflow`): from then on
  the client cannot re-send it if the daemon turns out not to have it. If a
  later recovery does need it, recovery raises :class:`AccountingLost`.
* **Recovery.** :meth:`ReconnectCore.connection_lost` takes the ``accepted``
  of the shutdown notice (or ``None`` after a crash) and decides: accepted
  messages leave the buffer; the others are queued to be re-sent first on the
  next connection (exactly once: the daemon never read them). After a crash
  the buffered messages have an unknown fate: an :class:`UnknownFate` record
  names them, and they are re-sent (``unknown="resend"``, at-least-once) or
  handed to the app (``unknown="report"``, at-most-once).
* **Settled messages.** A notice that names a message (``bad_frame``,
  ``group_unavailable``, ``connection_lost``, ``response_dropped``...) says
  the daemon read it and decided its fate: refused, never written, or
  written and not to be retried. :meth:`ReconnectCore.settle` records that,
  and no recovery ever sends a settled message again, nor reports it as of
  unknown fate (``group_unavailable`` promises "never written later").
* **Sessions the daemon ends.** ``slow_consumer``, ``idle_timeout`` and
  ``permission_denied`` detach the client; the connection is then lost like
  any other. If the notice carries ``accepted`` the accounting is exact, as
  after a shutdown notice; without it, what was sent since the last
  accounted seq has an unknown fate, as after a crash.
* **Back-off.** :class:`ReconnectBackoff` yields the jittered, capped,
  exponential delays between connect attempts and says when to give up.

The driver (:mod:`kmux._driver`) does the connecting and the locking;
nothing here imports ``socket``, ``threading`` or ``trio``.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from .errors import LocalError

__all__ = [
    "ReconnectPolicy",
    "ReconnectCore",
    "ReconnectBackoff",
    "UnknownFate",
    "Overflow",
    "Recovery",
    "AccountingLost",
    "AccountingWarning",
]


class AccountingLost(LocalError):
    """Messages the client must re-send were dropped from its resend buffer.

    ``details``: ``first_seq``/``last_seq`` (message seqs) and ``count``.
    Raised once, by the call that found out, after the reconnect is complete;
    that call's own message was not sent yet, so call it again.
    """

    code = "accounting_lost"


class AccountingWarning(UserWarning):
    """The resend buffer overflowed and no ``on_overflow`` callback is set."""


@dataclass(frozen=True)
class ReconnectPolicy:
    """How a reconnecting client behaves. Every bound is per outage.

    * ``max_attempts`` / ``deadline`` (seconds): give up an outage after this
      many connect attempts or this long, whichever comes first (at least one
      of them must be set). The call that gave up raises DaemonUnavailable;
      the next call starts a new outage, the buffer is kept.
    * ``initial_delay``, ``max_delay``, ``multiplier``: the delay before
      attempt k+1 is ``min(max_delay, initial_delay * multiplier**(k-1))``,
      scaled by a random factor in ``[1 - jitter, 1]``. The first attempt is
      immediate.
    * ``buffer_messages``, ``buffer_bytes``: bound of the resend buffer.
    * ``unknown``: after a crash (EOF without a shutdown notice), ``"resend"``
      sends the buffered messages again (at-least-once: some may arrive
      twice), ``"report"`` does not (at-most-once: the app gets them in the
      :class:`UnknownFate` record).
    * ``on_unknown(UnknownFate)``, ``on_overflow(Overflow)``: called in the
      thread/task that noticed. Without ``on_overflow`` an overflow emits an
      :class:`AccountingWarning`.
    """

    max_attempts: int | None = None
    deadline: float | None = 30.0
    initial_delay: float = 0.05
    max_delay: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5
    buffer_messages: int = 10_000
    buffer_bytes: int = 16 << 20
    unknown: Literal["resend", "report"] = "resend"
    on_unknown: Callable[["UnknownFate"], Any] | None = None
    on_overflow: Callable[["Overflow"], Any] | None = None

    def __post_init__(self) -> None:
        if self.max_attempts is None and self.deadline is None:
            raise ValueError("a ReconnectPolicy needs max_attempts or deadline (or both): reconnecting must be bounded")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.deadline is not None and self.deadline < 0:
            raise ValueError("deadline must not be negative")
        if not 0 <= self.initial_delay <= self.max_delay:
            raise ValueError("need 0 <= initial_delay <= max_delay")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be within [0, 1]")
        if self.buffer_messages < 0 or self.buffer_bytes < 0:
            raise ValueError("buffer bounds must not be negative")
        if self.unknown not in ("resend", "report"):
            raise ValueError("unknown must be 'resend' or 'report'")


def as_policy(reconnect: bool | ReconnectPolicy | None) -> ReconnectPolicy | None:
    """``connect(reconnect=...)``: False/None off, True the default policy."""
    if reconnect is None or reconnect is False:
        return None
    if reconnect is True:
        return ReconnectPolicy()
    if isinstance(reconnect, ReconnectPolicy):
        return reconnect
    raise TypeError("reconnect must be a bool or a kmux.ReconnectPolicy")


class ReconnectBackoff:
    """The connect attempts of one outage. Times are the caller's monotonic clock.

    (Not :class:`kmuxd.core.backoff.Backoff`, the daemon's back-off for its TCP
    connections: this one also bounds an outage by attempts and deadline.)
    """

    def __init__(self, policy: ReconnectPolicy, now: float, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.started = now
        #: Failed attempts so far.
        self.failures = 0
        self._rng = rng or random.Random()

    def failed(self, now: float) -> float | None:
        """Count a failed attempt; the delay before the next one, or None: give up."""
        p = self.policy
        self.failures += 1
        if p.max_attempts is not None and self.failures >= p.max_attempts:
            return None
        delay = min(p.max_delay, p.initial_delay * p.multiplier ** (self.failures - 1))
        delay *= 1 - p.jitter * self._rng.random()
        if p.deadline is not None:
            left = self.started + p.deadline - now
            if left <= 0:
                return None
            delay = min(delay, left)
        return delay


@dataclass(frozen=True)
class UnknownFate:
    """Messages sent on a connection that ended without a shutdown notice.

    The daemon may or may not have written them. ``first_seq..last_seq``
    (message seqs) is the whole range; ``held`` of them (the newest) were
    still in the buffer, ``missing`` had been dropped by an overflow.
    ``resent``: whether the held ones are sent again. ``messages``: the held
    messages as ``(seq, bytes)`` when they are *not* re-sent, else empty.
    """

    first_seq: int
    last_seq: int
    held: int
    missing: int
    resent: bool
    messages: tuple[tuple[int, bytes], ...] = ()
    #: messages of the range whose fate a notice had told (never re-sent, not in ``held``)
    settled: int = 0

    @property
    def count(self) -> int:
        return self.last_seq - self.first_seq + 1


@dataclass(frozen=True)
class Overflow:
    """The resend buffer dropped its oldest messages ``first_seq..last_seq``."""

    first_seq: int
    last_seq: int
    count: int
    nbytes: int


@dataclass
class Recovery:
    """What :meth:`ReconnectCore.connection_lost` decided."""

    #: message seq up to which everything is accounted after this loss
    accepted_seq: int
    #: messages queued to be re-sent first on the next connection
    resend: int = 0
    unknown: UnknownFate | None = None
    lost: AccountingLost | None = None


@dataclass
class _Counters:
    reconnects: int = 0
    resent: int = 0
    resent_unknown: int = 0
    unknown: int = 0
    dropped: int = 0


class ReconnectCore:
    """Resend buffer, accepted-seq bookkeeping and resend queue of one reconnecting client."""

    def __init__(self, policy: ReconnectPolicy) -> None:
        self.policy = policy
        #: Message seq of the last message sent (0 before the first).
        self.seq = 0
        #: Every message up to this message seq is accounted for: written by
        #: the daemon (or refused with its own notice), or handed over in an
        #: UnknownFate/AccountingLost report.
        self.accepted_seq = 0
        #: Messages sent on the current connection (its connection seq).
        self.conn_sent = 0
        # The current connection carries first the re-sent messages (their
        # message seqs, in order: settled ones are skipped, so the run may
        # have gaps), then new messages numbered on from _new_base.
        self._resent_here: list[int] = []
        self._new_base = 0
        self._first_here = 1
        # Message seqs a notice settled (a subset of the buffer's seqs).
        self._settled: set[int] = set()
        self._buffer: deque[tuple[int, bytes]] = deque()
        self._buffer_bytes = 0
        #: Messages to send again, before anything new, on the next connection.
        self.resend_queue: deque[tuple[int, bytes]] = deque()
        #: False while some unaccounted message was dropped from the buffer.
        self.guaranteed = True
        self.counters = _Counters()
        self._connected_once = False
        # Message seqs up to this one were re-queued after a crash (at-least-once).
        self._unknown_upto = 0

    # -- the app's messages -------------------------------------------------

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def buffered_bytes(self) -> int:
        return self._buffer_bytes

    def message_sent(self, message: Any) -> int:
        """A new message went out on the current connection; returns its message seq.

        Raises ``ValueError`` while re-sends are queued: they go first.
        """
        if self.resend_queue:
            raise ValueError("re-send the queued messages before new ones")
        self.seq += 1
        self.conn_sent += 1
        data = bytes(message)
        self._buffer.append((self.seq, data))
        self._buffer_bytes += len(data)
        self._bound()
        return self.seq

    def _bound(self) -> None:
        p = self.policy
        first = last = 0
        count = nbytes = 0
        while self._buffer and (len(self._buffer) > p.buffer_messages or self._buffer_bytes > p.buffer_bytes):
            seq, data = self._buffer.popleft()
            self._buffer_bytes -= len(data)
            self._settled.discard(seq)
            first = first or seq
            last = seq
            count += 1
            nbytes += len(data)
        if count:
            self.guaranteed = False
            self.counters.dropped += count
            report = Overflow(first, last, count, nbytes)
            if p.on_overflow is not None:
                p.on_overflow(report)
            else:
                import warnings

                warnings.warn(
                    f"kmux resend buffer full: messages {first}..{last} dropped from it; "
                    "they cannot be re-sent if the daemon crashes",
                    AccountingWarning,
                    stacklevel=4,
                )

    def message_seq(self, conn_seq: int) -> int:
        """The message seq of the current connection's message ``conn_seq``."""
        resent = self._resent_here
        if conn_seq <= len(resent):
            return resent[conn_seq - 1]
        return self._new_base + conn_seq - len(resent)

    def settle(self, seq: int) -> None:
        """A notice named message ``seq``: the daemon read it and decided its
        fate. It is never sent again, nor reported as of unknown fate."""
        if self._buffer and self._buffer[0][0] <= seq <= self.seq:
            self._settled.add(seq)

    def _unsettled(self, messages: Any) -> list[tuple[int, bytes]]:
        settled = self._settled
        return [m for m in messages if m[0] not in settled] if settled else list(messages)

    # -- losing and regaining the connection --------------------------------

    def connection_lost(self, accepted: int | None) -> Recovery:
        """The connection ended; ``accepted`` from its shutdown notice, None if there was none.

        Fills :attr:`resend_queue` and returns what happened. Calls
        ``on_unknown`` for an UnknownFate. Idempotent per connection is the
        shell's job: call it exactly once per lost connection.
        """
        # Whatever had not been re-sent yet from an earlier loss is still in the
        # buffer (the queue is the buffer's unaccounted tail): rebuild the queue.
        self.resend_queue.clear()
        sent_upto = self.message_seq(self.conn_sent) if self.conn_sent else 0  # last message seq sent here
        rec = Recovery(accepted_seq=self.accepted_seq)
        if accepted is not None:
            accepted = max(0, min(accepted, self.conn_sent))
            acc = self.message_seq(accepted) if accepted else self._first_here - 1
            self._account_upto(acc)
            first_needed = acc + 1
            first_held = self._buffer[0][0] if self._buffer else self.seq + 1
            if first_held > first_needed:  # dropped by an overflow and never read by the daemon
                n = first_held - first_needed
                rec.lost = AccountingLost(
                    f"{n} message(s) {first_needed}..{first_held - 1} were never read by the daemon "
                    "and had been dropped from the resend buffer",
                    first_seq=first_needed,
                    last_seq=first_held - 1,
                    count=n,
                )
            self.accepted_seq = max(self.accepted_seq, first_held - 1)
            self.resend_queue.extend(self._unsettled(self._buffer))
        else:
            first = self.accepted_seq + 1
            held = list(self._buffer)
            first_held = held[0][0] if held else self.seq + 1
            # Messages still only queued for re-sending were never on this connection:
            # their fate is known (undelivered) if they are past what was sent here.
            unknown_last = max(sent_upto, first - 1)
            missing = max(0, first_held - first)
            resend = self.policy.unknown == "resend"
            in_range = [(s, d) for s, d in held if s <= unknown_last]
            unsure = self._unsettled(in_range)
            report = UnknownFate(
                first_seq=first,
                last_seq=unknown_last,
                held=len(unsure),
                missing=missing,
                resent=resend,
                messages=() if resend else tuple(unsure),
                settled=len(in_range) - len(unsure),
            )
            if report.count > 0:
                rec.unknown = report
                self.counters.unknown += report.count
            if missing:
                rec.lost = AccountingLost(
                    f"the daemon went away without a shutdown notice; {missing} message(s) "
                    f"{first}..{first_held - 1} of unknown fate had been dropped from the resend buffer",
                    first_seq=first,
                    last_seq=first_held - 1,
                    count=missing,
                )
            if resend:
                self.accepted_seq = max(self.accepted_seq, first_held - 1)
                self._unknown_upto = max(self._unknown_upto, unknown_last)
                self.resend_queue.extend(self._unsettled(held))
            else:
                self._account_upto(unknown_last)
                self.accepted_seq = max(self.accepted_seq, unknown_last)
                self.resend_queue.extend(self._unsettled(self._buffer))  # never sent: their fate is known
            if report.count > 0 and self.policy.on_unknown is not None:
                self.policy.on_unknown(report)
        if not self._buffer or self.accepted_seq >= self._buffer[0][0] - 1:
            self.guaranteed = True
        rec.resend = len(self.resend_queue)
        rec.accepted_seq = self.accepted_seq
        self._new_connection()
        return rec

    def _account_upto(self, seq: int) -> None:
        buf = self._buffer
        while buf and buf[0][0] <= seq:
            done, data = buf.popleft()
            self._buffer_bytes -= len(data)
            self._settled.discard(done)
        self.accepted_seq = max(self.accepted_seq, seq)

    def connected(self) -> None:
        """A new connection completed its handshake; re-sends come next."""
        if self._connected_once:
            self.counters.reconnects += 1
        self._connected_once = True
        self._new_connection()

    def _new_connection(self) -> None:
        # Nothing is sent between a loss and connected(): the numbering starts afresh.
        self.conn_sent = 0
        self._resent_here = []
        self._new_base = self.seq
        self._first_here = self.resend_queue[0][0] if self.resend_queue else self.seq + 1

    def next_resend(self) -> bytes | None:
        """The next message to re-send on this connection, or None."""
        return self.resend_queue[0][1] if self.resend_queue else None

    def resent_one(self) -> int:
        """The message from :meth:`next_resend` went out; returns its message seq."""
        seq, _ = self.resend_queue.popleft()
        self.conn_sent += 1
        self._resent_here.append(seq)
        self.counters.resent += 1
        if seq <= self._unknown_upto:  # sent before, fate unknown: may arrive twice
            self.counters.resent_unknown += 1
        return seq

    def stats(self) -> dict[str, Any]:
        """Counters, for logs and tests."""
        c = self.counters
        return {
            "reconnects": c.reconnects,
            "resent": c.resent,
            "resent_unknown": c.resent_unknown,
            "unknown": c.unknown,
            "dropped": c.dropped,
            "accepted_seq": self.accepted_seq,
            "seq": self.seq,
            "buffered": len(self._buffer),
            "buffered_bytes": self._buffer_bytes,
            "guaranteed": self.guaranteed,
        }


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed connect attempt is worth repeating (the daemon may be restarting)."""
    from .errors import DaemonShutdown, DaemonUnavailable, GroupUnavailable, KmuxError, TooManyClients

    # GroupUnavailable: connect(require_up=True) found the group down; after a
    # daemon restart its connections may take a moment to come up.
    if isinstance(exc, (DaemonUnavailable, DaemonShutdown, TooManyClients, GroupUnavailable, TimeoutError)):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, KmuxError)


def translate_seq(err: Any, core: ReconnectCore) -> Any:
    """Rewrite a notice's connection seq into the message seq (the original stays as ``conn_seq``)."""
    details = getattr(err, "details", None)
    if isinstance(details, dict) and isinstance(details.get("seq"), int) and "conn_seq" not in details:
        details["conn_seq"] = details["seq"]
        details["seq"] = core.message_seq(details["seq"])
    return err
