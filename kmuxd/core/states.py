"""Lifecycles as data: the states of a connection slot, of a TCP connection and of a client.

Each machine is a table ``{(state, event): next_state}``. Anything missing
from the table is a bug in the caller and raises IllegalTransition, so an
impossible sequence (writing on a connection that is backing off, a client
that sends data before its handshake) fails loudly instead of limping on.
Everything that decides what a connection may do lives in its machine
(:class:`ConnMachine`), not in flags beside it (h11's rule 1): a new step
in a connection's life (a TLS handshake, an authentication exchange) is a
row in a table, never a flag.

A connection *slot* outlives its TCP connections: it dials, carries traffic
on one live connection, backs off and dials again, keeping its number
(``conn 0..N-1``) so operators can follow it. Recycling is make-before-break:
the live connection retires (takes nothing new, finishes what it holds) while
the slot already dials its replacement.

    slot:  IDLE -dial-> CONNECTING -connected-> UP
           CONNECTING -secure-> TLS_HANDSHAKE       ([groups.NAME.tls]: TCP is up)
           CONNECTING/TLS_HANDSHAKE -authenticate-> AUTHENTICATING
                                                    ([[groups.NAME.handshake]] steps)
           TLS_HANDSHAKE/AUTHENTICATING -connected-> UP
           CONNECTING/TLS_HANDSHAKE/AUTHENTICATING -dial_failed-> BACKOFF
                                 (a failed TLS handshake or step is a failed dial)
           CONNECTING -no_endpoint-> BACKOFF -retry-> CONNECTING
           UP -lost-> BACKOFF             (the live connection failed or closed)
           UP -recycle-> CONNECTING       (it retires; its replacement dials now)
           IDLE -attach-> UP              (an attached connection: an app dialled it and
                                           passed it on; never dialled, so never redialled)
           any -close-> CLOSED            (an attached slot closes when its connection ends)

A TCP connection has two sides, each its own table in :class:`ConnMachine`.
What we write (its lifecycle)::

    conn:  READY <-> BUSY                 (BUSY: the kernel refused part of a batch)
           READY/BUSY -retire-> DRAINING  (recycle, drain, or the server's FIN:
                                           nothing new; flush, collect answers)
           DRAINING -resume-> READY       (an operator's drain timed out: back in service)
           DRAINING -shut_write-> WRITE_SHUT   (balance: all written, we sent our
                                           FIN; read until the server closes its side)
           READY/BUSY/DRAINING/WRITE_SHUT -fail-> CLOSED (outbox salvaged, requests settled)
           any -close-> CLOSED

What the server sends (balance steering only ever leaves READING)::

    rx:    READING -pause-> PAUSED        (no ready receiver: not read, TCP pushes back)
           PAUSED -hang_up-> SUSPENDED    (it hung up meanwhile: out of the epoll,
                                           which would report the hang-up every pass)
           PAUSED/SUSPENDED -unpause-> READING

The *server's* FIN is no state of ours: a read of 0 bytes ends the connection
(:attr:`EndReason.FIN`), and one seen while paused retires it.
"""

from __future__ import annotations

import enum
from typing import Any

from kmux.errors import IllegalTransition

__all__ = [
    "SlotState", "SlotEvent", "ConnState", "ConnEvent", "RxState", "RxEvent", "ConnMachine",
    "EndReason", "RetireReason", "ClientState", "ClientEvent", "CloseReason", "StateMachine",
    "SLOT_TRANSITIONS", "CONN_TRANSITIONS", "RX_TRANSITIONS", "CLIENT_TRANSITIONS",
    "TAKING_STATES", "OPEN_STATES", "OPEN_STATE_NAMES", "VISIBLE_SLOT_STATES",
]


class SlotState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    #: TCP is up; the TLS handshake runs (no traffic yet).
    TLS_HANDSHAKE = "tls_handshake"
    #: The per-connection credential handshake's steps run (no traffic yet).
    AUTHENTICATING = "authenticating"
    UP = "up"
    BACKOFF = "backoff"
    CLOSED = "closed"


class SlotEvent(enum.Enum):
    DIAL = "dial"
    SECURE = "secure"
    AUTHENTICATE = "authenticate"
    CONNECTED = "connected"
    DIAL_FAILED = "dial_failed"
    NO_ENDPOINT = "no_endpoint"
    LOST = "lost"
    RECYCLE = "recycle"
    RETRY = "retry"
    ATTACH = "attach"
    CLOSE = "close"


_L, _LE = SlotState, SlotEvent
SLOT_TRANSITIONS: dict[tuple[SlotState, SlotEvent], SlotState] = {
    (_L.IDLE, _LE.DIAL): _L.CONNECTING,
    (_L.CONNECTING, _LE.CONNECTED): _L.UP,
    (_L.CONNECTING, _LE.DIAL_FAILED): _L.BACKOFF,
    (_L.CONNECTING, _LE.NO_ENDPOINT): _L.BACKOFF,
    (_L.UP, _LE.LOST): _L.BACKOFF,
    (_L.UP, _LE.RECYCLE): _L.CONNECTING,
    (_L.BACKOFF, _LE.RETRY): _L.CONNECTING,
    # Between dialled and up: TLS, then the credential steps (issue 18).
    (_L.CONNECTING, _LE.SECURE): _L.TLS_HANDSHAKE,
    (_L.CONNECTING, _LE.AUTHENTICATE): _L.AUTHENTICATING,
    (_L.TLS_HANDSHAKE, _LE.AUTHENTICATE): _L.AUTHENTICATING,
    (_L.TLS_HANDSHAKE, _LE.CONNECTED): _L.UP,
    (_L.AUTHENTICATING, _LE.CONNECTED): _L.UP,
    (_L.TLS_HANDSHAKE, _LE.DIAL_FAILED): _L.BACKOFF,
    (_L.AUTHENTICATING, _LE.DIAL_FAILED): _L.BACKOFF,
    # Attached (issue 19): an app made the connection; the slot carries it until it ends.
    (_L.IDLE, _LE.ATTACH): _L.UP,
}
SLOT_TRANSITIONS.update({(state, _LE.CLOSE): _L.CLOSED for state in SlotState})


class ConnState(enum.Enum):
    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"
    WRITE_SHUT = "write_shut"
    CLOSED = "closed"


class ConnEvent(enum.Enum):
    WRITE_BLOCKED = "write_blocked"
    WRITE_DONE = "write_done"
    RETIRE = "retire"
    RESUME = "resume"
    SHUT_WRITE = "shut_write"
    FAIL = "fail"
    CLOSE = "close"


_C, _E = ConnState, ConnEvent
CONN_TRANSITIONS: dict[tuple[ConnState, ConnEvent], ConnState] = {
    (_C.READY, _E.WRITE_BLOCKED): _C.BUSY,
    (_C.BUSY, _E.WRITE_BLOCKED): _C.BUSY,
    (_C.BUSY, _E.WRITE_DONE): _C.READY,
    (_C.READY, _E.WRITE_DONE): _C.READY,
    (_C.READY, _E.RETIRE): _C.DRAINING,
    (_C.BUSY, _E.RETIRE): _C.DRAINING,
    (_C.DRAINING, _E.WRITE_BLOCKED): _C.DRAINING,
    (_C.DRAINING, _E.WRITE_DONE): _C.DRAINING,
    (_C.DRAINING, _E.RESUME): _C.READY,
    (_C.DRAINING, _E.SHUT_WRITE): _C.WRITE_SHUT,
    (_C.WRITE_SHUT, _E.WRITE_DONE): _C.WRITE_SHUT,
    (_C.READY, _E.FAIL): _C.CLOSED,
    (_C.BUSY, _E.FAIL): _C.CLOSED,
    (_C.DRAINING, _E.FAIL): _C.CLOSED,
    (_C.WRITE_SHUT, _E.FAIL): _C.CLOSED,
}
CONN_TRANSITIONS.update({(state, _E.CLOSE): _C.CLOSED for state in ConnState})

#: States in which a TCP connection takes new messages.
TAKING_STATES = frozenset({_C.READY, _C.BUSY})
#: States in which a TCP connection is open.
OPEN_STATES = frozenset({_C.READY, _C.BUSY, _C.DRAINING, _C.WRITE_SHUT})
#: States in which a connection finishes what it holds and takes nothing new.
RETIRING_STATES = frozenset({_C.DRAINING, _C.WRITE_SHUT})
#: How statistics name a connection's state where it is not the state's own name:
#: a connection that shut its writing side is still draining, to an operator.
_SHOWN_AS = {_C.WRITE_SHUT: _C.DRAINING.value}
#: What statistics show (``state``) for a slot whose live connection is open:
#: kmux-cli counts such a slot as up.
OPEN_STATE_NAMES = frozenset(_SHOWN_AS.get(state, state.value) for state in OPEN_STATES)


class RxState(enum.Enum):
    READING = "reading"
    PAUSED = "paused"
    SUSPENDED = "suspended"


class RxEvent(enum.Enum):
    PAUSE = "pause"
    HANG_UP = "hang_up"
    UNPAUSE = "unpause"


RX_TRANSITIONS: dict[tuple[RxState, RxEvent], RxState] = {
    (RxState.READING, RxEvent.PAUSE): RxState.PAUSED,
    (RxState.PAUSED, RxEvent.HANG_UP): RxState.SUSPENDED,
    (RxState.PAUSED, RxEvent.UNPAUSE): RxState.READING,
    (RxState.SUSPENDED, RxEvent.UNPAUSE): RxState.READING,
}

#: What a slot's statistics show as its ``state``: its live connection's
#: state when it has one, else the slot's own (every row of both tables).
VISIBLE_SLOT_STATES = tuple(dict.fromkeys(
    [s.value for s in SlotState if s is not SlotState.UP]
    + [_SHOWN_AS.get(s, s.value) for s in ConnState if s is not ConnState.CLOSED]
))


class EndReason(enum.Enum):
    """Why a TCP connection ended (:meth:`kmuxd.io.conn.Conn.end`)."""

    #: The server sent its FIN and everything it sent has been read.
    FIN = "fin"
    #: The stream failed: a socket error, bad framing from the server, a timeout, a crash.
    ERROR = "error"
    #: We closed it: an operator, a finished drain or recycle, a stopping group.
    REQUESTED = "requested"

    @property
    def text(self) -> str:
        """How it ended, for the notices of the requests it carried."""
        return _END_TEXT[self]


_END_TEXT = {EndReason.FIN: "was closed by its server", EndReason.ERROR: "failed", EndReason.REQUESTED: "was closed"}


class RetireReason(enum.Enum):
    """Why a connection retired: took nothing new and finished what it held (the value is logged)."""

    MAX_REQUESTS = "max_requests_per_connection"
    MAX_AGE = "max_connection_age"
    SERVER_CLOSED = "the server closed its side"
    ENDPOINT_EJECTED = "endpoint ejected: request timeouts"
    DRAIN = "drain"
    TLS_RENEWED = "TLS settings or files changed (reload)"
    #: An attached connection handed back: answers owed are awaited, then the daemon's copy closes.
    UNATTACH = "unattach"
    #: Not a retirement: an operator's reconnect closes the connection at once.
    RECONNECT = "reconnect requested by an operator"


def _step(table: dict, state: Any, event: enum.Enum, what: str) -> Any:
    """The state ``table`` goes to from ``state`` on ``event``; a missing row is a bug."""
    try:
        return table[(state, event)]
    except KeyError:
        raise IllegalTransition(f"{what}: no transition from {state.value!r} on {event.value!r}") from None


class ConnMachine:
    """All of one TCP connection's state: its lifecycle (what we write) and its receive side.

    ``closed``, ``taking`` and ``reading`` are read on every pass, so the
    transitions keep them as plain attributes; they follow ``state`` and
    ``rx`` and nothing else sets them.
    """

    __slots__ = ("state", "rx", "closed", "taking", "reading", "_what")

    def __init__(self, what: str) -> None:
        self.state = ConnState.READY
        self.rx = RxState.READING
        #: ``state`` is CLOSED.
        self.closed = False
        #: ``state`` takes new messages (READY or BUSY).
        self.taking = True
        #: ``rx`` is READING.
        self.reading = True
        self._what = what

    def fire(self, event: ConnEvent) -> ConnState:
        state: ConnState = _step(CONN_TRANSITIONS, self.state, event, self._what)
        self.state = state
        self.closed = state is ConnState.CLOSED
        self.taking = state in TAKING_STATES
        return state

    def fire_rx(self, event: RxEvent) -> RxState:
        rx: RxState = _step(RX_TRANSITIONS, self.rx, event, f"{self._what} (receive side)")
        self.rx = rx
        self.reading = rx is RxState.READING
        return rx

    @property
    def retiring(self) -> bool:
        """It takes nothing new and finishes what it holds (DRAINING or WRITE_SHUT)."""
        return self.state in RETIRING_STATES

    @property
    def shown(self) -> str:
        """The state's name for statistics and kmux-cli."""
        return _SHOWN_AS.get(self.state, self.state.value)


class ClientState(enum.Enum):
    HANDSHAKING = "handshaking"
    RECEIVING = "receiving"
    NOT_RECEIVING = "not_receiving"
    CLOSED = "closed"


class ClientEvent(enum.Enum):
    ACCEPT_RECEIVING = "accept_receiving"
    ACCEPT_NOT_RECEIVING = "accept_not_receiving"
    REFUSE = "refuse"
    RECEIVE_ON = "receive_on"
    RECEIVE_OFF = "receive_off"
    CLOSE = "close"


_S, _V = ClientState, ClientEvent
CLIENT_TRANSITIONS: dict[tuple[ClientState, ClientEvent], ClientState] = {
    (_S.HANDSHAKING, _V.ACCEPT_RECEIVING): _S.RECEIVING,
    (_S.HANDSHAKING, _V.ACCEPT_NOT_RECEIVING): _S.NOT_RECEIVING,
    (_S.HANDSHAKING, _V.REFUSE): _S.CLOSED,
    (_S.RECEIVING, _V.RECEIVE_OFF): _S.NOT_RECEIVING,
    (_S.RECEIVING, _V.RECEIVE_ON): _S.RECEIVING,
    (_S.NOT_RECEIVING, _V.RECEIVE_ON): _S.RECEIVING,
    (_S.NOT_RECEIVING, _V.RECEIVE_OFF): _S.NOT_RECEIVING,
}
CLIENT_TRANSITIONS.update({(state, _V.CLOSE): _S.CLOSED for state in ClientState})


class CloseReason(enum.Enum):
    """Why a client's session ended (the value is the ``client_detached`` line's reason)."""

    #: It closed its socket (EOF), or hung up (while read, or pushed back).
    CLOSED = "closed"
    HUNG_UP = "hung up"
    HUNG_UP_PUSHED_BACK = "hung up while pushed back"
    #: A receive or a send on its socket failed (the errno follows).
    RECEIVE_FAILED = "receive failed"
    SEND_FAILED = "send failed"
    #: The daemon detached it: responses left unread, idleness, a reload's access policy.
    SLOW_CONSUMER = "slow consumer"
    IDLE = "idle"
    ACCESS_REVOKED = "access revoked by a reload"
    #: Its group or the daemon stopped.
    GROUP_STOPPED = "group stopped"
    DAEMON_STOPPING = "daemon stopping"
    #: A bug in its path (the exception follows).
    INTERNAL_ERROR = "internal error"


class StateMachine:
    """A current state plus a transition table; illegal inputs raise."""

    __slots__ = ("state", "_table", "_what")

    def __init__(self, table: dict, initial: Any, what: str) -> None:
        #: The current state: a member of the table's state enum.
        self.state: Any
        self._table = table
        self.state = initial
        self._what = what

    def fire(self, event: enum.Enum) -> Any:
        self.state = _step(self._table, self.state, event, self._what)
        return self.state

    def can(self, event: enum.Enum) -> bool:
        return (self.state, event) in self._table
