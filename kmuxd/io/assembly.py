"""One client message arriving in pieces (continuation), assembled in place in its outbox.

Theory of operation
-------------------
A message larger than one SEQPACKET packet comes as DATA_MORE pieces and a
last DATA piece (``docs/protocol.md``, "Continuation"). Its first piece
lands in an outbox like any message, at ``tail``; the outbox is then its
sender's alone (:meth:`~kmuxd.core.sendq.Outbox.open`) and each next piece is
received straight after the last, with the same kind-byte trick as single
packets (the byte the kind overwrites is saved and put back). Only when the
last piece arrives is the whole message checked (the framing's one rule,
the router's id rules) and committed: a half-received message is never
written.

A message that grows past ``max_message``, or whose pieces are interrupted
by another packet, or that does not complete within ``assembly_timeout``,
is refused with its seq; its outbox is released at once and its remaining
pieces are read into a scratch byte and dropped. A message whose outbox's
connection died travels with the outbox (the scheduler's salvage moves the
open bytes too) and goes on assembling wherever the outbox is adopted.

Invariant: while an :class:`Assembly` has an outbox, that outbox's
``open_owner`` is its session and nothing else lands in it.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Final

from kmux.errors import AncillaryRefused, BadPacket, KmuxError, MessageTooBig
from kmux.protocol import KIND_DATA, KIND_DATA_MORE, KIND_MORE, KIND_REQUEUE, KIND_REQUEUE_MORE

if TYPE_CHECKING:
    from kmuxd.core.sendq import Outbox

    from .intake import Intake

__all__ = ["Assembly", "EMPTY", "FULL", "TURN", "EOF"]

_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
#: Why a read of a client stopped (shared with the intake's pull).
EMPTY: Final = 0
FULL: Final = 1
TURN: Final = 2
EOF: Final = 3
#: Where a dropped piece is read to (MSG_TRUNC gives its real length).
_SCRATCH = bytearray(1)
_PIECE_KINDS = (KIND_DATA_MORE, KIND_DATA, KIND_REQUEUE_MORE, KIND_REQUEUE)
#: What a packet that carried descriptors or credentials is told.
ANCILLARY_TEXT = "packets may not carry file descriptors or credentials; it was dropped unread"


class Assembly:
    """The message ``seq`` of ``intake``, assembling at ``start`` in ``outbox``."""

    __slots__ = ("intake", "outbox", "seq", "start", "refused", "since")

    def __init__(self, intake: "Intake", outbox: "Outbox | None", seq: int, start: int, since: float) -> None:
        self.intake = intake
        #: None once refused: the remaining pieces are dropped.
        self.outbox = outbox
        self.seq = seq
        self.start = start
        self.refused: KmuxError | None = None
        self.since = since

    @classmethod
    def begin(cls, intake: "Intake", outbox: "Outbox", tail: int, size: int, truncated: bool,
              now: float) -> "Assembly":
        """The first piece of message ``intake.seq`` landed at ``tail``."""
        asm = cls(intake, outbox, intake.seq, tail, now)
        if truncated or size > intake.group.cfg.max_message:
            asm.refuse(MessageTooBig(asm._too_big_text(size)))
            return asm
        conn = outbox.conn
        assert conn is not None  # the first piece was received after route() named it
        intake.group.sched.open(intake.session, conn)
        outbox.grow_open(size)
        return asm

    @classmethod
    def refused_unread(cls, intake: "Intake", err: KmuxError) -> "Assembly":
        """A message whose first piece was refused unread (queue_timeout): drop its pieces."""
        asm = cls(intake, None, intake.seq, 0, intake.clock())
        asm.refused = err
        return asm

    def _too_big_text(self, size: int) -> str:
        return (f"message is over the group's max_message of {self.intake.group.cfg.max_message} bytes "
                f"({size}+ so far)")

    def read(self) -> int:
        """Read the next pieces; returns a pull status (TURN once the message ended)."""
        intake = self.intake
        cfg = intake.group.cfg
        max_message = cfg.max_message
        recvmsg_into = intake.sock.recvmsg_into
        for _ in range(cfg.client_turn):
            outbox = self.outbox
            if outbox is None:
                try:
                    n, _, flags, _ = recvmsg_into((_SCRATCH,), 0, _MSG_TRUNC)
                except BlockingIOError:
                    return EMPTY
                except OSError as exc:
                    return intake.recv_failed(exc)
                if n == 0:
                    return EOF
                kind = _SCRATCH[0]
                if kind not in _PIECE_KINDS:
                    self.interloper(kind)
                    continue
                if not kind & KIND_MORE:
                    intake.ended_open(self)  # the last piece of the refused message
                    return TURN
                continue
            end = outbox.open_end
            buf, view = outbox.buf, outbox.view
            saved = buf[end - 1]
            try:
                n, _, flags, _ = recvmsg_into((view[end - 1 :],), 0, _MSG_TRUNC)
            except BlockingIOError:
                return EMPTY
            except OSError as exc:
                return intake.recv_failed(exc)
            kind = buf[end - 1]
            buf[end - 1] = saved
            if n == 0:
                return EOF
            size = n - 1
            if kind not in (KIND_DATA_MORE, KIND_DATA):
                self.interloper(kind, ctrunc=bool(flags & _MSG_CTRUNC))
                continue
            total = end + size - self.start
            if flags & (_MSG_TRUNC | _MSG_CTRUNC) or total > max_message:
                # One of its own pieces carried descriptors, or it grew too big:
                # the whole message is refused, its remaining pieces dropped.
                self.refuse(AncillaryRefused(ANCILLARY_TEXT) if flags & _MSG_CTRUNC
                            else MessageTooBig(self._too_big_text(total)))
                if not kind & KIND_MORE:
                    intake.ended_open(self)
                    return TURN
                continue
            outbox.grow_open(size)
            if kind == KIND_DATA:
                self.finish(outbox, total)
                return TURN
        return TURN

    def finish(self, outbox: "Outbox", size: int) -> None:
        """The last piece arrived: check the whole message, then commit or refuse it."""
        intake = self.intake
        intake.ended_open(self)
        group = intake.group
        start = self.start
        err = group.check_message(outbox.buf, start, size)
        req = None
        router = group.router
        if err is None and router is not None:
            try:
                req = router.accept(intake.session, self.seq, intake.clock(), outbox.buf, start, size)
            except KmuxError as exc:
                err = exc
        if err is not None:
            group.sched.drop_open(intake.session, outbox)
            intake.refuse(err, seq_value=self.seq)
            return
        if req is not None:
            outbox.add_request(req)
        group.sched.commit(intake.session, outbox, outbox.open_end, 1, self.seq)

    def release(self) -> None:
        """Give the outbox back to the others (what was assembled is dropped)."""
        outbox = self.outbox
        intake = self.intake
        if outbox is not None:
            intake.group.sched.drop_open(intake.session, outbox)
        self.outbox = None

    def refuse(self, err: KmuxError) -> None:
        """Refuse the message now; its remaining pieces are read and dropped."""
        self.release()
        self.refused = err
        self.intake.refuse(err, seq_value=self.seq)

    def abort(self, err: KmuxError | None) -> None:
        """It will never complete (orphan expired, session ending): refuse it, or just drop it."""
        if self.refused is not None:
            return
        if err is None:
            self.release()
            self.intake.ended_open(self)
        else:
            self.refuse(err)

    def interloper(self, kind: int, ctrunc: bool = False) -> None:
        """A packet that is not the next piece: both it and the open message are refused."""
        intake = self.intake
        if self.refused is None:
            self.refuse(BadPacket(
                f"a packet of kind 0x{kind:02x} came between the pieces of message seq {self.seq}; "
                "the pieces of one message must be consecutive"
            ))
        if kind & ~KIND_MORE == KIND_DATA:
            intake.refuse(BadPacket("sent inside another message's pieces"), seq_value=intake.next_seq())
        elif ctrunc:
            intake.refuse(AncillaryRefused(ANCILLARY_TEXT), seq=False)

    def expire(self, now: float) -> None:
        """assembly_timeout for clients: a message whose pieces stopped coming is refused."""
        timeout = self.intake.group.cfg.assembly_timeout
        if self.refused is None and now - self.since >= timeout:
            self.refuse(BadPacket(f"message seq {self.seq} did not complete within assembly_timeout={timeout}s"))
