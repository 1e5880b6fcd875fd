"""Request/response correlation for ``steering = "id"`` and ``"fifo"``, with no I/O.

Theory of operation
-------------------
Every DATA message a client hands over in these modes is a *request*, and
gets a :class:`Request` record when it is accepted into an outbox. The
record follows its bytes:

1. **pending**: in an outbox (``outbox.requests``, one record per message,
   in message order). If the connection dies first, the bytes are re-sent
   elsewhere with the outbox (KCM's retry from byte 0) and the record goes
   with them.
2. **written**: the bytes reached the kernel on a connection; the record is
   in that connection's ``inflight`` deque (written order). If that
   connection dies, the request cannot be retried safely: its client gets
   one ``connection_lost`` notice naming it.
3. **done**: answered, failed or timed out, exactly one of them, and the
   client was told (a response, or one notice).

Matching a response:

* ``id``: the id at ``response_offset`` is looked up in the group's
  :class:`IdTable`. With ``rewrite``, each outgoing id was replaced by one
  unique among the group's requests in flight and the client's own id is
  put back into the response; without it, a second request with an id
  already in flight is refused (``id_in_use``), never cross-delivered.
  A timed-out request keeps its id until its late response arrives (then
  discarded) or its connection dies, so a late answer can never reach a
  newer request that reused the id.
* ``fifo``: the oldest request on that connection that is not done:
  written ones first, then those still pending in its outbox (a server
  cannot answer a request before it has read it, so that order is the
  stream's order).

Invariants: a response is delivered only to the client whose request it
matched; every request ends in exactly one outcome. Nothing here imports
``socket`` or ``trio``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from kmux.errors import BadFrame, IdInUse, IdsExhausted

__all__ = ["Request", "IdTable", "PENDING", "WRITTEN", "DONE", "fifo_match"]

PENDING, WRITTEN, DONE = 0, 1, 2


class Request:
    __slots__ = ("owner", "seq", "orig_id", "wire_id", "t0", "state", "timed_out", "conn")

    def __init__(self, owner: Any, seq: int, t0: float, orig_id: bytes | None = None, wire_id: bytes | None = None):
        self.owner = owner
        self.seq = seq
        self.t0 = t0
        self.orig_id = orig_id  # the client's id (id mode)
        self.wire_id = wire_id  # the id on the wire (== orig_id without rewrite)
        self.state = PENDING
        self.timed_out = False  # told already; its late response is discarded
        self.conn: Any = None  # the connection it was written on

    def id_value(self) -> int | None:
        """The client's original id as an integer, for notices."""
        return None if self.orig_id is None else int.from_bytes(self.orig_id, "big")

    def __repr__(self) -> str:
        return f"Request(seq={self.seq}, state={self.state}, id={self.orig_id!r})"


class IdTable:
    """Group-wide ids in flight, keyed by the id bytes on the wire."""

    __slots__ = ("request_offset", "response_offset", "size", "rewrite", "_by_wire", "_next", "_space")

    def __init__(self, request_offset: int, response_offset: int, size: int, rewrite: bool) -> None:
        self.request_offset = request_offset
        self.response_offset = response_offset
        self.size = size
        self.rewrite = rewrite
        self._by_wire: dict[bytes, Request] = {}
        self._next = 0
        self._space = 1 << (8 * size)

    def __len__(self) -> int:
        return len(self._by_wire)

    def add(self, owner: Any, seq: int, t0: float, buf: Any, start: int, length: int) -> Request:
        """Register the request at ``buf[start:start+length]``; rewrites its id in place.

        Raises BadFrame (too short for its id), IdInUse or IdsExhausted; the
        message must then be refused and not written.
        """
        off = start + self.request_offset
        size = self.size
        if self.request_offset + size > length:
            raise BadFrame(f"a {length}-byte request cannot hold its {size}-byte id at offset {self.request_offset}")
        orig = bytes(buf[off : off + size])
        table = self._by_wire
        if not self.rewrite:
            if orig in table:
                raise IdInUse(f"id {int.from_bytes(orig, 'big')} is already in flight")
            req = Request(owner, seq, t0, orig, orig)
            table[orig] = req
            return req
        if len(table) >= self._space:
            raise IdsExhausted(f"all {self._space} ids are in flight")
        # Next free id after the last one handed out: ids are reused as late
        # as possible, which keeps a stray late answer from matching.
        n = self._next
        while True:
            wire = n.to_bytes(size, "big")
            n = (n + 1) % self._space
            if wire not in table:
                break
        self._next = n
        buf[off : off + size] = wire
        req = Request(owner, seq, t0, orig, wire)
        table[wire] = req
        return req

    def match(self, buf: Any, start: int, length: int) -> Request | None:
        """The request a response at ``buf[start:start+length]`` answers (it stays registered)."""
        off = self.response_offset
        if off + self.size > length:
            return None
        return self._by_wire.get(bytes(buf[start + off : start + off + self.size]))

    def restore(self, req: Request, buf: Any, start: int) -> None:
        """Put the client's own id back into its response (rewrite only)."""
        if self.rewrite:
            off = start + self.response_offset
            buf[off : off + self.size] = req.orig_id

    def unrestore(self, req: Request, buf: Any, start: int) -> None:
        """Undo :meth:`restore` when the response could not be handed over yet."""
        if self.rewrite:
            off = start + self.response_offset
            buf[off : off + self.size] = req.wire_id

    def remove(self, req: Request) -> None:
        if self._by_wire.get(req.wire_id) is req:
            del self._by_wire[req.wire_id]


def fifo_match(inflight: deque, pending: deque) -> Request | None:
    """The oldest request on a connection that is not done (fifo mode).

    Done records at the front of ``inflight`` are dropped on the way;
    ``pending`` (the outbox's records) is only read: its records leave it
    when written.
    """
    while inflight:
        req = inflight[0]
        if req.state != DONE:
            return req
        inflight.popleft()
    for req in pending:
        if req.state != DONE:
            return req
    return None
