"""What the backend's connections do with their frames: count, record, or misbehave on a plan.

Theory of operation
-------------------
A protocol object per connection (:class:`~.loop.ConnProtocol`) decides;
the loop (:mod:`.loop`) does the socket work. Three kinds serve every user
of the backend:

* :class:`Counting`: ``echo`` or ``sink``, counting messages and bytes per
  connection as fast as the loop reads them, for the demo and the
  benchmark, which compare kmuxd with apps writing straight to it: it must
  never be the bottleneck. A run of equal-sized frames (the benchmark's
  case) is counted in C: the length field of every frame in the run is
  checked with a strided slice comparison, so a 256 KiB read of 64-byte
  frames costs a handful of operations, not 4096 Python calls. Anything
  irregular falls back to :class:`kmux.framing.FrameDecoder`.
* :class:`Recording`: every frame handed to ``record(conn, frame)`` (the
  integration tests' server keeps a summary of each), optionally echoed.
* :class:`FaultyEcho` and :class:`FaultySink`: a server that misbehaves on
  a *plan*: each :class:`Plan` handles ``after`` frames normally, then
  strikes with its fault; a connection that survives its fault (``none``,
  ``late``, ``trickle``, ``unmatched``) goes on with its next plan, so a
  long-lived connection meets fault after fault (the soak draws them from
  a seeded RNG; a test scripts one).

==============  =====================================================================
``fin``         close gracefully (FIN), the frame just read unanswered; read on until
                the peer closes too (a server's "N requests" limit)
``fin_mid``     write half of the answer, then the same
``rst``         reset the connection (RST), the frame just read unanswered
``rst_mid``     write half of the answer, then reset
``stall``       read on, answer nothing for ``hold`` s, then close gracefully
``late``        hold every answer for ``hold`` s, then send them all, then go on
``trickle``     write the next ``count`` answers a few bytes at a time
``unmatched``   send ``count`` unasked frames, one every ``every`` answers
``none``        nothing: the next plan begins
==============  =====================================================================

A sink knows ``fin``, ``stall`` (stop reading for ``hold`` s: push-back;
then the next plan) and ``trickle`` (read a few bytes at a time for
``hold`` s).

What the faulty protocols record, and what they answer with, is their
subclass's business (:meth:`FaultyEcho.record`, :meth:`FaultyEcho.reply`,
...): the soak stamps the connection's number into each answer and checks
its frames; a test records ``(client, seq)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from kmux.framing import NEED_MORE, Framing

from .conn import Conn

__all__ = ["Counting", "Recording", "Plan", "CALM", "FaultyEcho", "FaultySink", "ECHO_FAULTS", "SINK_FAULTS",
           "TRICKLE_CHUNK", "TRICKLE_PAUSE", "TRICKLE_MAX_WRITES"]

#: A run must hold at least this many frames to take the strided fast path.
FAST_PATH_MIN_FRAMES = 4
#: Faults an echo / a sink knows.
ECHO_FAULTS = ("none", "fin", "fin_mid", "rst", "rst_mid", "stall", "late", "trickle", "unmatched")
SINK_FAULTS = ("none", "fin", "stall", "trickle")
#: Bytes per trickled write or read: (least, most); seconds between them.
TRICKLE_CHUNK = (1, 64)
TRICKLE_PAUSE = 0.001
#: A trickled answer is written in at most this many pieces, so one large frame takes
#: well under a second (not the daemon's assembly_timeout).
TRICKLE_MAX_WRITES = 200


# -- counting (the demo and the benchmark) ---------------------------------------------------------


class Counting:
    """``echo`` (every whole frame written back on its connection) or ``sink``, counting as it goes."""

    __slots__ = ("conn", "echo", "msgs", "error", "_field", "_framing", "_max")

    def __init__(self, conn: Conn, *, echo: bool) -> None:
        self.conn = conn
        self.echo = echo
        self.msgs = 0
        self.error: str | None = None
        framing: Framing = conn.listener.framing
        self._framing = framing
        self._max = conn.listener.max_message
        # Strided fast path: only for a fixed length field (its bytes are the same in every frame of equal size).
        self._field = (framing.length_offset, framing.length_size) if framing.kind == "fixed" else None

    def data_received(self) -> None:
        c = self.conn
        buf, pos, end = c.buf, c.head, c.tail
        field = self._field
        if field is not None:
            length = self._framing.length_at(buf, pos, end)
            if length != NEED_MORE and 0 < length <= self._max:
                run = (end - pos) // length
                if run >= FAST_PATH_MIN_FRAMES:
                    offset, size = field
                    stop = pos + run * length
                    for j in range(pos + offset, pos + offset + size):
                        # Every frame's j-th header byte, in one C-level slice.
                        if buf[j:stop:length] != buf[j:j + 1] * run:
                            break
                    else:
                        self.msgs += run
                        pos = stop
        try:
            ends, consumed, c.pending = c.decoder.split(buf, pos, end)
        except Exception as exc:  # RemoteBadHeader, RemoteFrameTooBig: this stream is broken, the others go on
            self.error = f"{getattr(exc, 'code', type(exc).__name__)}: {getattr(exc, 'message', exc)}"
            c.close(reason=f"bad stream: {self.error}")
            return
        self.msgs += len(ends)
        if self.echo and consumed > c.head:
            c.send(c.view[c.head:consumed])
        c.head = consumed

    def eof_received(self) -> None:
        pass

    def connection_lost(self, reason: str) -> None:
        pass


# -- recording (the integration tests' server) ---------------------------------------------------------


class Recording:
    """Every whole frame to ``record(conn, frame)``; echoed when ``echo(frame)`` says so."""

    __slots__ = ("conn", "record", "echo", "lost")

    def __init__(self, conn: Conn, record: Callable[[Conn, bytes], None],
                 echo: Callable[[bytes], bool] | None = None,
                 lost: Callable[[Conn, str], None] | None = None) -> None:
        self.conn = conn
        self.record = record
        self.echo = echo
        self.lost = lost

    def data_received(self) -> None:
        c = self.conn
        for frame in c.frames():
            self.record(c, frame)
            if self.echo is not None and self.echo(frame):
                c.send(frame)

    def eof_received(self) -> None:
        pass

    def connection_lost(self, reason: str) -> None:
        if self.lost is not None:
            self.lost(self.conn, reason)


# -- misbehaving on a plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One stretch of a connection's life: ``after`` frames handled normally, then ``action``."""

    action: str
    after: int
    hold: float = 0.0
    count: int = 0
    every: int = 1


#: A plan that never strikes.
CALM = Plan("none", 1 << 62)


class _Planned:
    """A connection's plans and where it is in the current one (shared by echo and sink)."""

    def __init__(self, conn: Conn, plans: Iterator[Plan], rng: random.Random) -> None:
        self.conn = conn
        self._plans = plans
        #: Bytes for trickles and the like (a plan's draws stay independent of it).
        self.rng = rng
        self.plan = CALM
        self.handled = 0  # frames seen under this plan
        self.struck = False
        self.done = 0  # trickled answers / unasked frames sent under this plan
        self._timer: Any = None
        self.next_plan()

    def next_plan(self) -> None:
        self.plan = next(self._plans, CALM)
        self.handled = 0
        self.struck = False
        self.done = 0

    def due(self) -> bool:
        """Count one frame; True if the plan's fault strikes now (a ``none`` plan, or any plan
        once :meth:`calm`, gives way to the next)."""
        self.handled += 1
        if self.struck or self.handled <= self.plan.after:
            return False
        if self.plan.action == "none" or self.calm():
            self.next_plan()
            self.handled = 1
            return False
        self.struck = True
        self.fault(self.plan)
        return True

    def after_hold(self, fn: Callable[[], None]) -> None:
        self._timer = self.conn.loop.call_later(self.plan.hold, lambda: self.conn.open and fn())

    def frames(self) -> list[bytes]:
        """The connection's whole frames; a stream that breaks the framing ends it (:meth:`bad_stream`)."""
        frames = self.conn.frames()
        if self.conn.parse_error is not None and self.conn.open:
            self.bad_stream(self.conn.parse_error)
        return frames

    # -- what a subclass records or decides ------------------------------------------------------

    def calm(self) -> bool:
        """True once faults should stop: a plan not yet struck gives way to the next one."""
        return False

    def bad_stream(self, error: str) -> None:
        """The stream broke the framing (nothing after it can be cut into frames): close."""
        self.conn.close(reason="bad_stream")

    def record(self, frame: bytes) -> bool:
        """A whole frame arrived: record it; False if it is torn (then it is neither answered nor counted)."""
        return True

    def fault(self, plan: Plan) -> None:
        """``plan``'s fault strikes now."""

    def closed(self, reason: str) -> None:
        """The connection ended (its plans with it)."""

    def connection_lost(self, reason: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.closed(reason)


class FaultyEcho(_Planned):
    """An echo server that misbehaves on its plans (module docstring)."""

    def __init__(self, conn: Conn, plans: Iterator[Plan], rng: random.Random) -> None:
        #: ``late``: the answers held back.
        self.held: list[bytes] = []
        super().__init__(conn, plans, rng)

    def reply(self, frame: bytes) -> bytes:
        """The answer to a frame (the frame itself by default)."""
        return frame

    def replied(self, frame: bytes, end: int) -> None:
        """An answer to ``frame`` is about to be queued (called first: its peer may see it before the
        loop runs again); it is written once ``conn.sent_total >= end``."""

    def stray(self, k: int) -> bytes:
        """The ``k``-th unasked frame (``unmatched`` plans)."""
        raise NotImplementedError("this echo has no unasked frames to send")

    def strayed(self, end: int) -> None:
        """An unasked frame is about to be queued, ending at ``end``."""

    def answer(self, frame: bytes, trickle: bool = False) -> None:
        conn = self.conn
        if conn.closing:
            return
        data = self.reply(frame)
        self.replied(frame, conn.out_total + len(data))
        if trickle:
            chunk = max(self.rng.randint(*TRICKLE_CHUNK), len(data) // TRICKLE_MAX_WRITES + 1)
            conn.send(data, trickle=(chunk, TRICKLE_PAUSE))
        else:
            conn.send(data)

    def data_received(self) -> None:
        conn = self.conn
        # Every whole frame read is recorded first, before any fault it may trigger: the
        # peer wrote them all (and what it writes until it sees our close, too).
        frames = [f for f in self.frames() if self.record(f)]
        for frame in frames:
            if conn.closing:
                return
            if self.due():
                action = self.plan.action
                if action in ("fin", "fin_mid", "rst", "rst_mid"):
                    if action.endswith("_mid"):
                        half = self.reply(frame)
                        conn.send(half[: len(half) // 2])
                    how = "fin" if action.startswith("fin") else "rst"
                    conn.close(how, after_flush=True, reason=f"{how}_by_us")
                    return
                if action == "stall":
                    self.after_hold(lambda: conn.close("fin", reason="fin_by_us"))
                elif action == "late":
                    self.after_hold(self._send_held)
            if self.struck:
                plan = self.plan
                if plan.action == "stall":
                    continue
                if plan.action == "late":
                    self.held.append(frame)
                    continue
                if plan.action == "trickle":
                    self.answer(frame, trickle=True)
                    self.done += 1
                    if self.done >= plan.count:
                        self.next_plan()
                    continue
                if plan.action == "unmatched" and self.handled % plan.every == 0:
                    self.done += 1
                    stray = self.stray(self.done)
                    self.strayed(conn.out_total + len(stray))
                    conn.send(stray)
                    if self.done >= plan.count:
                        self.next_plan()
            self.answer(frame)

    def _send_held(self) -> None:
        for frame in self.held:  # (answer() sends nothing once the connection is closing)
            self.answer(frame)
        self.held = []
        self.next_plan()

    def eof_received(self) -> None:
        # The peer closed (a drain): answer what is held, as a server would.
        if self.struck and self.plan.action == "late":
            for frame in self.held:
                self.answer(frame)
            self.held = []


class FaultySink(_Planned):
    """A sink (reads and records, answers nothing) that misbehaves on its plans (module docstring)."""

    def data_received(self) -> None:
        conn = self.conn
        frames = [f for f in self.frames() if self.record(f)]  # all recorded first (FaultyEcho says why)
        for frame in frames:
            if conn.closing:
                return
            if self.due():
                action = self.plan.action
                if action == "fin":
                    conn.close("fin", reason="fin_by_us")
                    return
                if action == "stall":  # push-back: read nothing for a while
                    conn.pause_reading(self.plan.hold)
                    self.after_hold(self.next_plan)
                elif action == "trickle":  # a few bytes at a time for a while
                    conn.read_pause = TRICKLE_PAUSE
                    self.after_hold(self._end_trickle)
        if self.struck and self.plan.action == "trickle":
            conn.read_limit = self.rng.randint(*TRICKLE_CHUNK)

    def _end_trickle(self) -> None:
        self.conn.read_limit = 0
        self.conn.read_pause = 0.0
        self.next_plan()

    def eof_received(self) -> None:
        pass
