"""The per-connection credential handshake (``[[groups.NAME.handshake]]``), sans-IO.

Theory of operation
-------------------
Some services want every connection to authenticate before its first
request (memcached SASL, Redis AUTH, a vendor's login message). The daemon
holds the secret; apps never see it. Each *step* is a whole message that
the daemon sends as it is, and a check on the reply: the reply, cut with the
group's framing, must carry ``expect`` at ``expect_offset``.

:class:`BackendHandshake` is the steps' state machine, h11 style: the shell
asks :meth:`~BackendHandshake.message_to_send` what to write, feeds every
byte it reads to :meth:`~BackendHandshake.receive_data`, and reports a
close or a time-out (:meth:`~BackendHandshake.closed`,
:meth:`~BackendHandshake.timed_out`). Each failure is a
:class:`~kmux.errors.ConnectFailed` whose message names the step (counted
from 1) and the bytes, e.g. ``handshake step 1: bytes 6..7 are 0020,
expected 0000``: the slot treats it as a failed dial.

::

    SEND -sent-> AWAIT -matched-> SEND (next step) | DONE (last step)
    SEND/AWAIT -failed-> FAILED

Invariants:

1. A reply is checked only once it is whole (the group's framing says so);
   bytes beyond it are a failure, not the start of the next message: the
   server must not speak before it is asked, and nothing it says during the
   handshake may ever reach an app.
2. A close or a time-out before DONE is a failure, never a "recycle".
3. Bounded: at most one message per step is buffered (the framing refuses a
   reply longer than ``max_message``).

No I/O here; nothing imports ``socket`` or ``trio``.
"""

from __future__ import annotations

import enum
from typing import Any, Sequence

from kmux.errors import ConnectFailed, KmuxError
from kmux.framing import FrameDecoder, Framing

from .states import StateMachine

__all__ = ["BackendHandshake", "StepState", "StepEvent", "STEP_TRANSITIONS", "reply_mismatch"]


class StepState(enum.Enum):
    SEND = "send"
    AWAIT = "await"
    DONE = "done"
    FAILED = "failed"


class StepEvent(enum.Enum):
    SENT = "sent"
    MATCHED = "matched"
    MATCHED_LAST = "matched_last"
    FAILED = "failed"


_S, _E = StepState, StepEvent
STEP_TRANSITIONS: dict[tuple[StepState, StepEvent], StepState] = {
    (_S.SEND, _E.SENT): _S.AWAIT,
    (_S.AWAIT, _E.MATCHED): _S.SEND,
    (_S.AWAIT, _E.MATCHED_LAST): _S.DONE,
    (_S.SEND, _E.FAILED): _S.FAILED,
    (_S.AWAIT, _E.FAILED): _S.FAILED,
}


def reply_mismatch(reply: bytes, offset: int, expect: bytes) -> str | None:
    """Why ``reply`` lacks ``expect`` at ``offset`` (None: it has it)."""
    last = offset + len(expect) - 1
    if len(reply) <= last:
        return f"the {len(reply)}-byte reply is too short for bytes {offset}..{last} (expected {expect.hex()})"
    got = reply[offset : last + 1]
    if got != expect:
        return f"bytes {offset}..{last} are {bytes(got).hex()}, expected {expect.hex()}"
    return None


class BackendHandshake:
    """The steps of one connection's handshake (see the module docstring).

    ``steps``: objects with ``message`` (bytes), ``expect_offset`` (int) and
    ``expect`` (bytes; empty accepts any reply), e.g.
    :class:`kmuxd.system.config.HandshakeStep`.
    """

    __slots__ = ("steps", "index", "sm", "decoder", "buf")

    def __init__(self, steps: Sequence[Any], framing: Framing, max_message: int) -> None:
        if not steps:
            raise ValueError("a handshake needs at least one step")
        self.steps = tuple(steps)
        #: The step under way, counted from 0.
        self.index = 0
        self.sm = StateMachine(STEP_TRANSITIONS, StepState.SEND, "backend handshake")
        self.decoder = FrameDecoder(framing, max_message)
        self.buf = bytearray()

    @property
    def state(self) -> StepState:
        return self.sm.state

    @property
    def done(self) -> bool:
        return self.sm.state is StepState.DONE

    @property
    def step(self) -> int:
        """The step under way, counted from 1 (as messages name it)."""
        return self.index + 1

    def message_to_send(self) -> bytes:
        """The current step's message; from now on its reply is awaited."""
        message = self.steps[self.index].message
        self.sm.fire(StepEvent.SENT)
        return message

    def receive_data(self, data: bytes | memoryview) -> bool:
        """Bytes read from the server. True once the last step's reply matched.

        Raises ConnectFailed on a mismatch, a bad reply or bytes nobody asked for.
        """
        if self.sm.state is not StepState.AWAIT:
            raise self._fail(f"the server sent {len(data)} bytes before it was asked anything")
        buf = self.buf
        buf += data
        try:
            ends, _, _ = self.decoder.split(buf, 0, len(buf), 1)
        except KmuxError as exc:  # RemoteBadHeader / RemoteFrameTooBig
            raise self._fail(f"bad reply: {exc.message}") from None
        if not ends:
            return False
        end = ends[0]
        if end < len(buf):
            raise self._fail(f"the server sent {len(buf) - end} bytes after its {end}-byte reply")
        step = self.steps[self.index]
        why = reply_mismatch(bytes(buf), step.expect_offset, step.expect) if step.expect else None
        if why is not None:
            raise self._fail(why)
        del buf[:]
        if self.index + 1 == len(self.steps):
            self.sm.fire(StepEvent.MATCHED_LAST)
            return True
        self.index += 1
        self.sm.fire(StepEvent.MATCHED)
        return False

    def closed(self) -> ConnectFailed:
        """The server closed the connection before the handshake was done: the failure to raise."""
        have = f" after {len(self.buf)} bytes of its reply" if self.buf else ""
        return self._fail(f"the server closed the connection{have} (a close during the handshake is a failure)")

    def timed_out(self, timeout: float) -> ConnectFailed:
        """No whole reply within ``timeout`` seconds (auth_timeout): the failure to raise."""
        have = f"{len(self.buf)} bytes of a reply" if self.buf else "no reply"
        return self._fail(f"{have} within auth_timeout={timeout}s")

    def _fail(self, why: str) -> ConnectFailed:
        if self.sm.can(StepEvent.FAILED):
            self.sm.fire(StepEvent.FAILED)
        return ConnectFailed(f"handshake step {self.step}: {why}")
