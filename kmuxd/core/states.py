"""Lifecycles as data: the states of a TCP connection slot and of a client.

Each machine is a table ``{(state, event): next_state}``. Anything missing
from the table is a bug in the caller and raises IllegalTransition, so an
impossible sequence (writing on a connection that is backing off, a client
that sends data before its handshake) fails loudly instead of limping on.

A connection *slot* outlives its TCP connections: it dials, carries traffic
on one live connection, backs off and dials again, keeping its number
(``conn 0..N-1``) so operators can follow it. Recycling is make-before-break:
the live connection retires (takes nothing new, finishes what it holds) while
the slot already dials its replacement.

    slot:  IDLE -dial-> CONNECTING -connected-> UP
           CONNECTING -dial_failed/no_endpoint-> BACKOFF -retry-> CONNECTING
           CONNECTING -secure-> TLS_HANDSHAKE       ([groups.NAME.tls]: TCP is up)
           CONNECTING/TLS_HANDSHAKE -authenticate-> AUTHENTICATING
                                                    ([[groups.NAME.handshake]] steps)
           TLS_HANDSHAKE/AUTHENTICATING -connected-> UP
           TLS_HANDSHAKE/AUTHENTICATING -dial_failed-> BACKOFF
                                 (a failed TLS handshake or step is a failed dial)
           UP -lost-> BACKOFF             (the live connection failed or closed)
           UP -recycle-> CONNECTING       (it retires; its replacement dials now)
           any -close-> CLOSED

    conn:  READY <-> BUSY                 (BUSY: the kernel refused part of a batch)
           READY/BUSY -retire-> DRAINING  (recycle, drain, or the server's FIN:
                                           nothing new; flush, collect answers)
           DRAINING -resume-> READY       (an operator's drain timed out: back in service)
           READY/BUSY/DRAINING -fail-> CLOSED   (outbox salvaged, requests settled)
           any -close-> CLOSED
"""

from __future__ import annotations

import enum
from typing import Any

from kmux.errors import IllegalTransition

__all__ = ["SlotState", "SlotEvent", "ConnState", "ConnEvent", "ClientState", "ClientEvent", "StateMachine"]


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
}
SLOT_TRANSITIONS.update({(state, _LE.CLOSE): _L.CLOSED for state in SlotState})


class ConnState(enum.Enum):
    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"
    CLOSED = "closed"


class ConnEvent(enum.Enum):
    WRITE_BLOCKED = "write_blocked"
    WRITE_DONE = "write_done"
    RETIRE = "retire"
    RESUME = "resume"
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
    (_C.READY, _E.FAIL): _C.CLOSED,
    (_C.BUSY, _E.FAIL): _C.CLOSED,
    (_C.DRAINING, _E.FAIL): _C.CLOSED,
}
CONN_TRANSITIONS.update({(state, _E.CLOSE): _C.CLOSED for state in ConnState})

#: States in which a TCP connection takes new messages.
TAKING_STATES = frozenset({_C.READY, _C.BUSY})
#: States in which a TCP connection is open.
OPEN_STATES = frozenset({_C.READY, _C.BUSY, _C.DRAINING})
#: Kept for kmux-cli and older callers: a connection is "up" in these.
CONNECTED_STATES = OPEN_STATES
#: What a slot's statistics show as its ``state``: its live connection's
#: state when it has one, else the slot's own.
VISIBLE_SLOT_STATES = (
    "idle", "connecting", "tls_handshake", "authenticating", "ready", "busy", "draining", "backoff", "closed",
)


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


class StateMachine:
    """A current state plus a transition table; illegal inputs raise."""

    __slots__ = ("state", "_table", "_what")

    def __init__(self, table: dict, initial: Any, what: str) -> None:
        #: The current state: a member of the table's state enum.
        self.state: Any
        self._table = table
        self.state = initial
        self._what = what

    def fire(self, event: enum.Enum) -> enum.Enum:
        try:
            self.state = self._table[(self.state, event)]
        except KeyError:
            raise IllegalTransition(
                f"{self._what}: no transition from {self.state.value!r} on {event.value!r}"
            ) from None
        return self.state

    def can(self, event: enum.Enum) -> bool:
        return (self.state, event) in self._table
