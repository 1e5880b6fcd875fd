"""The client side of one kmux connection, with no I/O.

Theory of operation
-------------------
:class:`ClientSession` holds everything a client knows about its
connection; the shells (:mod:`kmux._sync`, :mod:`kmux.trio`) only move
packets between it and a socket. That keeps the rules in one place and the
shells short enough to check by eye.

1. **Handshake.** The shell sends :meth:`ClientSession.hello_packet`, then
   hands the daemon's first packet to :meth:`ClientSession.receive_answer`,
   which returns the :class:`~kmux.protocol.Accepted` answer or raises the
   refusal as its own error class (``UnknownGroup``, ``TooManyClients``...).
2. **Sending.** :meth:`ClientSession.check_data` refuses a message locally
   (``BadFrame``/``MessageTooBig``) exactly as the daemon would, so the
   mistake surfaces as an exception at the call site rather than as a
   notice later. After the packet has gone out the shell calls
   :meth:`ClientSession.data_sent`, which returns the message's ``seq``.
   A message refused locally is never sent and never counted: the daemon
   numbers only the DATA packets it receives, and our count must stay in
   step with its count, or every later notice would name the wrong message.
3. **Receiving.** :meth:`ClientSession.receive_packet` classifies each
   packet by its kind byte. It returns the message (a memoryview into the
   caller's buffer), a :class:`HandBack`, :data:`RECEIVE_OFF` or ``None``,
   and raises the error a NOTICE carries.
4. **Receive off.** After ``{"op": "receive", "on": false}`` the daemon
   answers with a ``receive_off`` notice. Every DATA packet that arrives
   before that marker had already been queued for us; the session turns it
   into a :class:`HandBack`, which the shell returns to the daemon as a
   REQUEUE packet so another receiver gets it. DATA that arrives while no
   marker is outstanding is delivered: dropping it would lose a message.

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
    KIND_DATA,
    KIND_NOTICE,
    PROTOCOL_VERSION,
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

__all__ = ["ClientSession", "State", "HandBack", "RECEIVE_OFF", "ANSWER_BUFSIZE"]

#: Receive buffer for the handshake answer. The daemon keeps answers within
#: HANDSHAKE_MAX; we accept more so a long refusal text still arrives whole.
ANSWER_BUFSIZE: Final = 65536


class State(enum.Enum):
    HELLO = "hello"  # built; the hello has not been sent
    AWAIT_ANSWER = "await_answer"  # hello sent, waiting for the daemon's answer
    READY = "ready"  # accepted; data flows
    CLOSED = "closed"  # closed by us, refused, or the daemon went away


# (state, input) -> next state. Anything missing is an IllegalTransition,
# except in CLOSED, where every input is ClientClosed.
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


#: Returned by :meth:`ClientSession.receive_packet` when the last outstanding
#: ``receive_off`` marker arrives: every message queued for us is accounted for.
RECEIVE_OFF: Final = _ReceiveOff()


@dataclass(frozen=True, slots=True)
class HandBack:
    """A message queued for us before receiving was switched off.

    Send ``packet_parts`` (one REQUEUE packet) back to the daemon, which
    moves the message to another receiver.
    """

    message: Any  # bytes-like; a view into the shell's buffer

    @property
    def packet_parts(self) -> tuple[bytes, Any]:
        """The REQUEUE packet as buffers for ``sendmsg`` (no copy of the message)."""
        return (REQUEUE_PREFIX, self.message)


class ClientSession:
    """Sans-IO state of one client connection: handshake, seq, receive on/off.

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
        #: The seq of the last DATA packet sent (0 before the first).
        self.seq = 0
        #: What we last asked the daemon for.
        self.receiving = receive
        # receive_off requests whose marker has not arrived yet.
        self._markers_pending = 0
        # Set on READY, copied out of `accepted` for the data path.
        self._framing: Framing | None = None
        self._max_message = 0
        self._fixed: tuple | None = None  # the fixed length field, for the inline check
        self._own_responses = False
        self.recv_bufsize = ANSWER_BUFSIZE
        #: ``accepted`` of the daemon's ``shutdown`` notice, once it arrived:
        #: DATA packets up to this seq were read, the later ones never were.
        self.shutdown_accepted: int | None = None
        # What to raise once CLOSED: ClientClosed, or DaemonShutdown after EOF.
        self._closed_because: tuple[type[KmuxError], str] = (ClientClosed, "the kmux client is closed")

    # -- state -------------------------------------------------------------

    def _closed_error(self) -> KmuxError:
        # A fresh instance each time: re-raising one object piles up tracebacks.
        cls, message = self._closed_because
        return cls(message)

    def _transition(self, event: str) -> None:
        if self.state is State.CLOSED:
            raise self._closed_error()
        try:
            self.state = _TRANSITIONS[self.state, event]
        except KeyError:
            raise IllegalTransition(f"{event!r} is not allowed in state {self.state.value!r}") from None

    def require_ready(self) -> None:
        """Raise unless the handshake is done and the connection is open."""
        if self.state is not State.READY:
            if self.state is State.CLOSED:
                raise self._closed_error()
            raise IllegalTransition(f"the handshake is not complete (state {self.state.value!r})")

    @property
    def draining(self) -> bool:
        """True while a ``receive_off`` marker is outstanding and receiving is off."""
        return self._markers_pending > 0 and not self.receiving

    def close(self) -> None:
        """Forget the connection; every later call raises ClientClosed."""
        self.state = State.CLOSED
        self._closed_because = (ClientClosed, "the kmux client is closed")

    # -- handshake ---------------------------------------------------------

    def hello_packet(self) -> bytes:
        """The first packet to send."""
        self._transition("send_hello")
        return encode_hello(self.hello)

    def receive_answer(self, packet: Any) -> Accepted:
        """Consume the daemon's first packet. Raises the refusal's error class."""
        if self.state is not State.AWAIT_ANSWER:
            self._transition("accepted")  # raises IllegalTransition or ClientClosed
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
        # id/fifo steering: every DATA packet is the answer to this client's
        # own request, so it is never handed back (receiving off or not).
        self._own_responses = answer.steering in ("id", "fifo")
        self._fixed = answer.framing.fixed_field
        # A notice can outgrow a tiny max_message; one kind byte precedes both.
        self.recv_bufsize = 1 + max(answer.max_message, CONTROL_MAX)
        return answer

    def eof(self) -> KmuxError:
        """The peer closed the socket: the error the shell should raise.

        Every later call raises the same kind of error, not ClientClosed:
        the app did nothing wrong, the daemon went away.
        """
        if self.state is State.CLOSED:
            return self._closed_error()
        if self.state is State.AWAIT_ANSWER:
            self._closed_because = (DaemonUnavailable, "the daemon closed the connection without answering the hello")
        elif self.shutdown_accepted is not None:
            self._closed_because = (
                DaemonShutdown,
                f"daemon shut down; it accepted this connection's messages up to seq {self.shutdown_accepted}",
            )
        else:
            self._closed_because = (DaemonShutdown, "daemon closed the connection")
        self._transition("eof")
        return self._closed_error()

    # -- sending -----------------------------------------------------------

    def check_data(self, message: Any) -> None:
        """Refuse a message the daemon would refuse (unless ``validate=False``).

        Raises BadFrame or MessageTooBig; nothing is counted.
        """
        if self.state is not State.READY:
            self.require_ready()
        if self.validate:
            fixed = self._fixed
            if fixed is not None:
                # The common case inline (it runs per message); anything
                # else goes to check_message, which also explains the refusal.
                n = len(message)
                unpack_from, offset, header_end, adjust = fixed
                if header_end <= n <= self._max_message and unpack_from(message, offset)[0] + adjust == n:
                    return
            self._framing.check_message(message, self._max_message)  # type: ignore[union-attr]

    def data_sent(self) -> int:
        """Count one DATA packet that went out; returns its ``seq``.

        Call it only after the send succeeded: the daemon counts packets it
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
            self._markers_pending += 1
        return encode_control(Control("receive", {"on": on}))

    # -- receiving ---------------------------------------------------------

    def receive_packet(self, packet: memoryview) -> Any:
        """Classify one packet (kind byte included) that arrived after the handshake.

        Returns the message (``packet[1:]``, header included) to deliver, a
        :class:`HandBack` to requeue, :data:`RECEIVE_OFF`, or ``None`` for a
        packet that means nothing to the app (an event this library does not
        know, from a newer daemon). Raises the error a NOTICE carries, or
        BadPacket for a packet the protocol does not allow.
        """
        if self.state is not State.READY:
            self.require_ready()
        kind = packet[0] if len(packet) else -1
        if kind == KIND_DATA:
            if self._markers_pending and not self.receiving and not self._own_responses:
                return HandBack(packet[1:])
            return packet[1:]
        if kind == KIND_NOTICE:
            return self._notice(packet[1:])
        raise BadPacket(f"daemon sent a packet of unknown kind {kind:#04x}" if kind >= 0 else "daemon sent an empty packet")

    def _notice(self, body: memoryview) -> Any:
        notice = decode_notice(body)
        if notice.code is not None:
            raise notice.error  # type: ignore[misc]
        if notice.event == "receive_off":
            if self._markers_pending:
                self._markers_pending -= 1
                if self._markers_pending == 0 and not self.receiving:
                    return RECEIVE_OFF
            return None
        if notice.event == "shutdown":
            accepted = notice.details.get("accepted")
            if isinstance(accepted, int) and not isinstance(accepted, bool):
                self.shutdown_accepted = accepted
            return None
        return None  # an event from a newer daemon: nothing to do
