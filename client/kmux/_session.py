"""The client side of one kmux connection, with no I/O.

Theory of operation
-------------------
:class:`ClientSession` holds everything a client knows about one
connection, including the buffer its packets are received into; the
driver (:mod:`kmux._driver`) asks it what to send and hands it what
arrived.

1. **Handshake.** The hello is :meth:`ClientSession.hello_packet`. The
   daemon's answer is received into :attr:`ClientSession.answer_buffer` and
   taken by :meth:`ClientSession.answered`, which returns the
   :class:`~kmux.protocol.Accepted` answer or raises the refusal as its own
   error class (``UnknownGroup``, ``TooManyClients``...). Accepting
   allocates the receive buffer, once, for the connection's life.
2. **Sending.** :meth:`ClientSession.check_data` refuses a message locally
   (``BadFrame``/``MessageTooBig``) exactly as the daemon would, so the
   mistake surfaces at the call site rather than as a notice later.
   :meth:`ClientSession.packets` cuts a message into the packets that carry
   it: one packet when it fits :attr:`ClientSession.max_packet` (always, for
   messages up to :data:`CONCAT_MAX`), else DATA_MORE pieces and a last
   DATA piece (REQUEUE_MORE/REQUEUE for a hand-back). After the whole
   message has gone out the driver calls :meth:`ClientSession.data_sent`,
   which returns its ``seq``: one per message, however many pieces, as the
   daemon counts. A message refused locally is never sent and never
   counted, or every later notice would name the wrong message.
3. **Receiving.** Every packet is received into :attr:`recv_buffer`, one
   buffer allocated once, with one ``recv_into``: the kind byte first, the
   message after it. The buffer holds one byte more than the largest
   packet the daemon may send (:attr:`recv_bufsize`), so a packet that
   fills it was longer than allowed (the kernel cut it short: SEQPACKET
   drops the rest); no flag or second call is needed to tell. The buffer
   is a view of the connection's packet buffer from the *join cursor* on.
   A DATA_MORE piece moves the cursor to the end of what was joined so
   far, less one byte: the next piece's kind byte lands on the last byte
   joined, which the session keeps aside and puts back once it has read
   the kind. So the pieces of a continued message land one after the other
   and the message is joined without a copy; the DATA piece that ends it
   resets the cursor. :meth:`ClientSession.received` classifies the packet
   and returns the
   message (a memoryview into the buffer, valid until the next receive), a
   :class:`HandBack`, :data:`RECEIVE_OFF` or ``None``, or raises the error
   a NOTICE carries.
4. **Bounds.** A joined message may not grow past ``max_message``: the
   daemon promised that bound in its answer, so a message over it (or a
   packet the buffer truncates) is a :class:`~kmux.errors.BadPacket`; the
   partial message is dropped and the rest of its pieces are skipped.
   Nothing but pieces of the same message may come between its first and
   last piece (docs/protocol.md, "Continuation"); a notice or another kind
   there is a BadPacket too.
5. **Receive off.** After ``{"op": "receive", "on": false}`` the daemon
   answers with a ``receive_off`` marker. Every DATA message that arrives
   before that marker had already been queued for us; the session turns it
   into a :class:`HandBack`, which the driver returns to the daemon as
   REQUEUE packets so another receiver gets it. DATA that arrives while no
   marker is outstanding is delivered: dropping it would lose a message.
6. **End of the session.** The daemon ends a session with a ``shutdown``
   event or with a notice whose code ends it (:data:`SESSION_ENDING`:
   ``slow_consumer``, ``idle_timeout``, ``permission_denied``,
   ``daemon_shutdown``). Either may carry ``accepted`` (the last seq the
   daemon read), which :attr:`shutdown_accepted` keeps for the reconnect
   accounting. After EOF every call raises what ended it.

Nothing here imports ``socket`` or ``trio``; the data path never touches
msgpack.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

from .errors import (
    BadPacket,
    ClientClosed,
    DaemonShutdown,
    DaemonUnavailable,
    IllegalTransition,
    KmuxError,
    VersionUnsupported,
)
from .framing import Framing
from .protocol import (
    CONTROL_MAX,
    DATA_MORE_PREFIX,
    DATA_PREFIX,
    KIND_DATA,
    KIND_DATA_MORE,
    KIND_NOTICE,
    PROTOCOL_VERSION,
    REQUEUE_MORE_PREFIX,
    REQUEUE_PREFIX,
    Accepted,
    Control,
    Hello,
    Refused,
    decode_answer,
    decode_notice,
    encode_control,
    encode_hello,
)

__all__ = [
    "ClientSession",
    "State",
    "HandBack",
    "RECEIVE_OFF",
    "ANSWER_BUFSIZE",
    "CONCAT_MAX",
    "SESSION_ENDING",
]

#: Receive buffer for the handshake answer. The daemon keeps answers within
#: HANDSHAKE_MAX; we accept more so a long refusal text still arrives whole.
ANSWER_BUFSIZE: Final = 65536

#: Up to this size a packet is built by concatenating the kind byte and the
#: message (one buffer for ``send``: a copy is cheaper than ``sendmsg``'s
#: list); above it the kind byte and the message go as two buffers, without
#: copying the message. Every socket takes a packet this large: the kernel's
#: smallest send buffer (SOCK_MIN_SNDBUF) carries about 4.5 KiB.
CONCAT_MAX: Final = 4096

#: Notice codes after which the daemon closes the session.
SESSION_ENDING: Final = frozenset({"slow_consumer", "idle_timeout", "permission_denied", "daemon_shutdown"})


class State(enum.Enum):
    HELLO = "hello"  # built; the hello has not been sent
    AWAIT_ANSWER = "await_answer"  # hello sent, waiting for the daemon's answer
    READY = "ready"  # accepted; data flows
    CLOSED = "closed"  # closed by us, refused, or the daemon went away


_READY: Final = State.READY  # a module global: the data path tests it per packet
#: The kind of a one-packet message, as a Final of this module: compiled (kmux._compiled), a native
#: constant; KIND_DATA itself is read from kmux.protocol's dictionary.
_KIND_DATA: Final[int] = KIND_DATA


# (state, input) -> next state. Anything missing is an IllegalTransition,
# except in CLOSED, where every input raises what closed the session.
_TRANSITIONS: dict[tuple[State, str], State] = {
    (State.HELLO, "send_hello"): State.AWAIT_ANSWER,
    (State.AWAIT_ANSWER, "accepted"): State.READY,
    (State.AWAIT_ANSWER, "refused"): State.CLOSED,
    (State.AWAIT_ANSWER, "eof"): State.CLOSED,
    (State.READY, "eof"): State.CLOSED,
}


class _ReceiveOff:
    """Sentinel type of :data:`RECEIVE_OFF`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "RECEIVE_OFF"


#: Returned by :meth:`ClientSession.received` when the last outstanding
#: ``receive_off`` marker arrives: every message queued for us is accounted for.
RECEIVE_OFF: Final = _ReceiveOff()


@dataclass(frozen=True, slots=True)
class HandBack:
    """A message queued for us before receiving was switched off.

    Send it back with ``session.packets(message, requeue=True)``: the daemon
    moves it to another receiver.
    """

    message: Any  # a view into the session's receive buffer


class ClientSession:
    """Sans-IO state of one client connection: handshake, seq, receive buffer, receive on/off.

    ``validate=False`` skips the local framing check, for apps that already
    produce well-framed messages and want to save its cost; the daemon still
    checks every message and reports a bad one with a notice.
    """

    def __init__(self, group: str, *, receive: bool = True, name: str = "", validate: bool = True) -> None:
        # Hello validates itself, so a bad group name fails here, before any I/O.
        self.hello = Hello(group=group, receive=receive, name=name)
        self.validate = validate
        self.state = State.HELLO
        self.accepted: Accepted | None = None
        #: The seq of the last message sent (0 before the first).
        self.seq = 0
        #: What we last asked the daemon for.
        self.receiving = receive
        #: The largest packet the socket takes, kind byte included; the
        #: driver sets it after sizing the socket's send buffer.
        self.max_packet = 0
        #: receive_off requests whose marker has not arrived yet.
        self.markers_pending = 0
        # Set on READY, copied out of `accepted` for the data path.
        self._framing: Framing | None = None
        self._max_message = 0
        self._most = 0  # the largest one-packet message, kind byte included
        # The fixed length field (unpack_from, offset, header_end, adjust) and max_message, for the inline check.
        self._fixed: tuple[Any, int, int, int, int] | None = None
        self._own_responses = False
        self.recv_bufsize = ANSWER_BUFSIZE
        self.answer_buffer = bytearray(0)
        # The packet buffer (allocated on READY: recv_bufsize and a spare
        # byte) and its join cursor: the message bytes joined so far.
        self._packet = bytearray(0)
        self._whole = memoryview(self._packet)
        self.join_cursor = 0
        self._kept = 0  # the joined byte the next piece's kind byte lands on
        self._skipping = False  # dropping the rest of an oversized continued message
        #: Messages received in pieces and joined (counted when the last piece is in).
        self.continued_received = 0
        #: Where the next packet is received (one ``recv_into``): kind byte, then the message.
        self.recv_buffer: Any = self._whole
        self._room = 0  # len(recv_buffer): a packet this long was cut short
        #: ``accepted`` of the notice that ended the session (the ``shutdown``
        #: event, or a SESSION_ENDING code): DATA messages up to this seq
        #: were read, the later ones never were.
        self.shutdown_accepted: int | None = None
        #: The SESSION_ENDING error the daemon sent, if any.
        self.ended_by: KmuxError | None = None
        # What to raise once CLOSED.
        self._closed_because: tuple[type[KmuxError], str] = (ClientClosed, "the kmux client is closed")

    # -- state -------------------------------------------------------------

    def closed_error(self) -> KmuxError:
        """What a call on the closed session raises (a fresh instance each time:
        re-raising one object piles up tracebacks)."""
        cls, message = self._closed_because
        return cls(message)

    def _transition(self, event: str) -> None:
        if self.state is State.CLOSED:
            raise self.closed_error()
        try:
            self.state = _TRANSITIONS[self.state, event]
        except KeyError:
            raise IllegalTransition(f"{event!r} is not allowed in state {self.state.value!r}") from None

    def require_ready(self) -> None:
        """Raise unless the handshake is done and the connection is open."""
        if self.state is not State.READY:
            if self.state is State.CLOSED:
                raise self.closed_error()
            raise IllegalTransition(f"the handshake is not complete (state {self.state.value!r})")

    @property
    def joining(self) -> bool:
        """True between the first and the last piece of a continued message."""
        return self.join_cursor > 0

    @property
    def draining(self) -> bool:
        """True while a ``receive_off`` marker is outstanding and receiving is off."""
        return self.markers_pending > 0 and not self.receiving

    def close(self, cls: type[KmuxError] = ClientClosed, message: str = "the kmux client is closed") -> None:
        """Forget the connection; every later call raises ``cls(message)``."""
        self.state = State.CLOSED
        self._closed_because = (cls, message)

    # -- handshake ---------------------------------------------------------

    def hello_packet(self) -> bytes:
        """The first packet to send."""
        self._transition("send_hello")
        self.answer_buffer = bytearray(ANSWER_BUFSIZE + 1)  # a spare byte: see "Receiving"
        return encode_hello(self.hello)

    def answered(self, nbytes: int) -> Accepted:
        """The daemon's first packet (``nbytes``) is in :attr:`answer_buffer`. Raises the refusal's error class."""
        if nbytes == 0:
            raise self.eof()
        if nbytes > ANSWER_BUFSIZE:
            self.close(BadPacket, "the daemon's handshake answer was cut short")
            raise BadPacket(f"handshake answer longer than {ANSWER_BUFSIZE} bytes")
        return self.receive_answer(memoryview(self.answer_buffer)[:nbytes])

    def receive_answer(self, packet: Any) -> Accepted:
        """Consume the daemon's first packet (as bytes). Raises the refusal's error class."""
        if self.state is not State.AWAIT_ANSWER:
            self._transition("accepted")  # raises IllegalTransition or the closed error
        try:
            answer = decode_answer(bytes(packet))
            if isinstance(answer, Accepted) and answer.version != PROTOCOL_VERSION:
                raise VersionUnsupported(
                    f"daemon answered with protocol version {answer.version}, this library speaks {PROTOCOL_VERSION}"
                )
        except KmuxError:
            self.state = State.CLOSED
            raise
        if isinstance(answer, Refused):
            self._transition("refused")
            raise answer.error
        self._transition("accepted")
        self.accepted = answer
        self._framing = answer.framing
        self._max_message = answer.max_message
        self._most = answer.max_message + 1
        # id/fifo steering: every DATA packet is the answer to this client's
        # own request, so it is never handed back (receiving off or not).
        self._own_responses = answer.steering in ("id", "fifo")
        fixed = answer.framing.fixed_field
        # With validate=False nothing is checked: no inline check either.
        self._fixed = (fixed[0], fixed[1], fixed[2], fixed[3], answer.max_message) \
            if fixed is not None and self.validate else None
        # A notice can outgrow a tiny max_message; one kind byte precedes both.
        self.recv_bufsize = 1 + max(answer.max_message, CONTROL_MAX)
        self._packet = bytearray(self.recv_bufsize + 1)  # the spare byte: see "Receiving"
        self.recv_buffer = self._whole = memoryview(self._packet)
        self._room = len(self._packet)
        self.answer_buffer = bytearray(0)
        return answer

    def eof(self) -> KmuxError:
        """The peer closed the socket: the error the driver should raise.

        Every later call raises the same kind of error, not ClientClosed:
        the app did nothing wrong, the daemon went away (or ended the session).
        """
        if self.state is State.CLOSED:
            return self.closed_error()
        if self.state is State.AWAIT_ANSWER:
            self._closed_because = (DaemonUnavailable, "the daemon closed the connection without answering the hello")
        elif self.ended_by is not None:
            self._closed_because = (type(self.ended_by), f"the daemon ended the session: {self.ended_by.message}")
        elif self.shutdown_accepted is not None:
            self._closed_because = (
                DaemonShutdown,
                f"daemon shut down; it accepted this connection's messages up to seq {self.shutdown_accepted}",
            )
        else:
            self._closed_because = (DaemonShutdown, "daemon closed the connection")
        self._transition("eof")
        return self.closed_error()

    # -- sending -----------------------------------------------------------

    def check_data(self, message: Any) -> None:
        """Refuse a message the daemon would refuse (unless ``validate=False``).

        Raises BadFrame or MessageTooBig; nothing is counted.
        """
        if self.state is not _READY:
            self.require_ready()
        fixed = self._fixed
        if fixed is not None:
            # The common case inline (it runs per message); anything
            # else goes to check_message, which also explains the refusal.
            unpack_from, offset, header_end, adjust, most = fixed
            n = len(message)
            if header_end <= n <= most:
                length: int = unpack_from(message, offset)[0]  # typed: compiled, a native int from here
                if length + adjust == n:
                    return
        if self.validate:
            self._framing.check_message(message, self._max_message)  # type: ignore[union-attr]

    def packets(self, message: Any, requeue: bool = False) -> list[tuple[Any, ...]]:
        """The packets that carry ``message``, each as buffers for one ``sendmsg``.

        One packet if it fits :attr:`max_packet`, else pieces of
        ``max_packet - 1`` bytes with the continuation bit and a last piece
        without it. The pieces are views: the message is not copied.
        """
        last, more = (REQUEUE_PREFIX, REQUEUE_MORE_PREFIX) if requeue else (DATA_PREFIX, DATA_MORE_PREFIX)
        n = len(message)
        room = self.max_packet - 1
        if n <= room:
            return [(last + message,) if n <= CONCAT_MAX else (last, message)]
        view = memoryview(message)
        return [(more if start + room < n else last, view[start : start + room]) for start in range(0, n, room)]

    def data_sent(self) -> int:
        """Count one message that went out, all its pieces; returns its ``seq``.

        Call it only after the send succeeded: the daemon counts messages it
        received, so a message refused locally or never sent has no seq.
        """
        self.seq += 1
        return self.seq

    def receive_control(self, on: bool) -> bytes:
        """The CONTROL packet that switches receiving; turning it off starts draining."""
        self.require_ready()
        if not isinstance(on, bool):
            raise TypeError("on must be a bool")
        self.receiving = on
        if not on and not self._own_responses:
            # Balance: DATA before the daemon's marker is handed back. In
            # id/fifo modes nothing is, so there is nothing to drain.
            self.markers_pending += 1
        return encode_control(Control("receive", {"on": on}))

    # -- receiving ---------------------------------------------------------

    def received(self, nbytes: int) -> Any:
        """Classify the packet of ``nbytes`` (> 0, kind byte included) just received into :attr:`recv_buffer`.

        Returns the message (a view into the buffer, header included) to
        deliver, a :class:`HandBack` to requeue, :data:`RECEIVE_OFF`, or
        ``None`` for a packet that means nothing to the app yet (a piece of
        a continued message, an event this library does not know). Raises
        the error a NOTICE carries, or BadPacket for a packet the protocol
        does not allow (one that filled the buffer was cut short).
        """
        if self.state is not _READY:
            self.require_ready()
        packet = self._packet
        at = self.join_cursor
        if at:
            kind = packet[at]
            packet[at] = self._kept
        else:
            kind = packet[0]
            # The common case: one packet, one message (_most is under the buffer's size: not cut short).
            if kind == _KIND_DATA and nbytes <= self._most and not self._skipping:
                message = self._whole[1:nbytes]
                if self.markers_pending and not self.receiving and not self._own_responses:
                    return HandBack(message)
                return message
        message = self._unusual(kind, at, nbytes - 1, nbytes >= self._room)
        if type(message) is not memoryview:
            return message
        if self.markers_pending and not self.receiving and not self._own_responses:
            return HandBack(message)
        return message

    def _unusual(self, kind: int, at: int, size: int, truncated: bool) -> Any:
        """Pieces, notices and everything the protocol does not allow (``at``: the join cursor)."""
        if kind not in (KIND_DATA, KIND_DATA_MORE):
            self._reset_join()
            if at:
                raise BadPacket(f"daemon sent a packet of kind {kind:#04x} inside a continued message; it is dropped")
            if kind == KIND_NOTICE and not truncated:
                return self._notice(self._whole[1 : 1 + size])
            if kind == KIND_NOTICE:
                raise BadPacket(f"daemon sent a notice longer than {self.recv_bufsize - 1} bytes")
            raise BadPacket(f"daemon sent a packet of unknown kind {kind:#04x}")
        more = kind == KIND_DATA_MORE
        if self._skipping:
            self._skipping = more
            return None
        total = at + size
        if truncated or total > self._max_message:
            self._reset_join()
            self._skipping = more
            raise BadPacket(
                f"daemon sent a message over max_message ({self._max_message} bytes)"
                + ("; the rest of its pieces are skipped" if more else "")
                if more or at
                else f"daemon sent a packet over max_message ({self._max_message} bytes)"
            )
        if more:
            if total:  # an empty piece moves nothing
                self.join_cursor = total
                self._kept = self._packet[total]
                self.recv_buffer = self._whole[total:]
                self._room = len(self.recv_buffer)
            return None
        self._reset_join()
        if at:
            self.continued_received += 1
        return self._whole[1 : 1 + total]

    def _reset_join(self) -> None:
        self.join_cursor = 0
        self.recv_buffer = self._whole
        self._room = len(self._whole)

    def receive_packet(self, packet: Any) -> Any:
        """:meth:`received` for a packet already in memory (kind byte included),
        as if the socket had put it into :attr:`recv_buffer`."""
        if self.state is not State.READY:
            self.require_ready()
        if not len(packet):
            raise BadPacket("daemon sent an empty packet")
        buffer = self.recv_buffer
        n = min(len(packet), len(buffer))
        buffer[:n] = packet[:n]
        return self.received(n)

    def _notice(self, body: memoryview) -> Any:
        notice = decode_notice(body)
        if notice.code is not None:
            error = notice.error
            if notice.code in SESSION_ENDING:
                self.ended_by = error
                self._record_accepted(notice.details)
            raise error  # type: ignore[misc]
        if notice.event == "receive_off":
            if self.markers_pending:
                self.markers_pending -= 1
                if self.markers_pending == 0 and not self.receiving:
                    return RECEIVE_OFF
            return None
        if notice.event == "shutdown":
            self._record_accepted(notice.details)
            return None
        return None  # an event from a newer daemon: nothing to do

    def _record_accepted(self, details: dict[str, Any]) -> None:
        accepted = details.get("accepted")
        if isinstance(accepted, int) and not isinstance(accepted, bool):
            self.shutdown_accepted = accepted
