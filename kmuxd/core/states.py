"""Lifecycles as data: the states of a TCP connection slot and of a client.

Each machine is a table ``{(state, event): next_state}``. Anything missing
from the table is a bug in the caller and raises IllegalTransition, so an
impossible sequence (writing on a connection that is backing off, a client
that sends data before its handshake) fails loudly instead of limping on.

A connection *slot* outlives its TCP connections: it dials, carries traffic,
fails, backs off and dials again, keeping its number (``conn 0..N-1``) so
operators can follow it.

    IDLE -dial-> CONNECTING -connected-> READY <-> BUSY
    CONNECTING -dial_failed/no_endpoint-> BACKOFF -retry-> CONNECTING
    READY/BUSY -failed-> BACKOFF          (outbox rehomed, then back-off)
    READY/BUSY -drain-> DRAINING -drained/failed-> BACKOFF (then redial or retire)
    DRAINING -drain_aborted-> READY       (queue did not empty in time)
    any -close-> CLOSED

READY means connected with nothing to write (available); BUSY means the
kernel has refused part of a batch and the slot waits for writability.
"""

from __future__ import annotations

import enum

from kmux.errors import IllegalTransition

__all__ = ["ConnState", "ConnEvent", "ClientState", "ClientEvent", "StateMachine"]


class ConnState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"
    BACKOFF = "backoff"
    CLOSED = "closed"


class ConnEvent(enum.Enum):
    DIAL = "dial"
    CONNECTED = "connected"
    DIAL_FAILED = "dial_failed"
    NO_ENDPOINT = "no_endpoint"
    WRITE_BLOCKED = "write_blocked"
    WRITE_DONE = "write_done"
    DRAIN = "drain"
    DRAIN_ABORTED = "drain_aborted"
    DRAINED = "drained"
    FAILED = "failed"
    RETRY = "retry"
    CLOSE = "close"


_C, _E = ConnState, ConnEvent
CONN_TRANSITIONS: dict[tuple[ConnState, ConnEvent], ConnState] = {
    (_C.IDLE, _E.DIAL): _C.CONNECTING,
    (_C.CONNECTING, _E.CONNECTED): _C.READY,
    (_C.CONNECTING, _E.DIAL_FAILED): _C.BACKOFF,
    (_C.CONNECTING, _E.NO_ENDPOINT): _C.BACKOFF,
    (_C.READY, _E.WRITE_BLOCKED): _C.BUSY,
    (_C.BUSY, _E.WRITE_BLOCKED): _C.BUSY,
    (_C.BUSY, _E.WRITE_DONE): _C.READY,
    (_C.READY, _E.WRITE_DONE): _C.READY,
    (_C.READY, _E.FAILED): _C.BACKOFF,
    (_C.BUSY, _E.FAILED): _C.BACKOFF,
    (_C.READY, _E.DRAIN): _C.DRAINING,
    (_C.BUSY, _E.DRAIN): _C.DRAINING,
    (_C.DRAINING, _E.WRITE_BLOCKED): _C.DRAINING,
    (_C.DRAINING, _E.WRITE_DONE): _C.DRAINING,
    (_C.DRAINING, _E.DRAINED): _C.BACKOFF,
    (_C.DRAINING, _E.DRAIN_ABORTED): _C.READY,
    (_C.DRAINING, _E.FAILED): _C.BACKOFF,
    (_C.BACKOFF, _E.RETRY): _C.CONNECTING,
    (_C.BACKOFF, _E.FAILED): _C.BACKOFF,
}
for _s in ConnState:
    CONN_TRANSITIONS[(_s, _E.CLOSE)] = _C.CLOSED

#: States in which the slot holds a live TCP connection.
CONNECTED_STATES = frozenset({_C.READY, _C.BUSY, _C.DRAINING})


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
for _s in ClientState:
    CLIENT_TRANSITIONS[(_s, _V.CLOSE)] = _S.CLOSED


class StateMachine:
    """A current state plus a transition table; illegal inputs raise."""

    __slots__ = ("state", "_table", "_what")

    def __init__(self, table: dict, initial: enum.Enum, what: str) -> None:
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
