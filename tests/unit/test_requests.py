"""Request/response correlation with no sockets: id extraction, rewrite, restore, fifo, outbox hand-off.

(The request lifecycle and its random-schedule property test are in test_router.py.)"""

from __future__ import annotations

import struct
from collections import deque

import pytest

from kmux.errors import BadFrame, IdInUse, IdsExhausted
from kmux.framing import PRESETS
from kmuxd.core.router import DONE, PENDING, WRITTEN, FifoFlight, IdTable, Request, ResponseRouter
from kmuxd.core.sendq import Outbox, TxScheduler

LENGTH_AT = PRESETS["u32be"]._length_at


def msg(ident: int, body: bytes = b"xy") -> bytearray:
    payload = struct.pack(">H", ident) + body
    return bytearray(struct.pack(">I", len(payload)) + payload)


def test_rewrite_gives_unique_wire_ids_and_restores_the_clients_own():
    table = IdTable(request_offset=4, response_offset=4, size=2, rewrite=True)
    a, b = msg(7), msg(7)  # two clients, the same id
    ra = table.add("A", 1, 0.0, a, 0, len(a))
    rb = table.add("B", 1, 0.0, b, 0, len(b))
    assert ra.wire_id != rb.wire_id and ra.orig_id == rb.orig_id == b"\x00\x07"
    assert a[4:6] == ra.wire_id and b[4:6] == rb.wire_id  # rewritten in place
    # The server echoes: each response matches its own request.
    assert table.match(b, 0, len(b)) is rb and table.match(a, 0, len(a)) is ra
    table.restore(rb, b, 0)
    assert b[4:6] == b"\x00\x07"
    table.remove(ra)
    assert table.match(a, 0, len(a)) is None and len(table) == 1


def test_without_rewrite_a_second_request_with_an_id_in_flight_is_refused():
    table = IdTable(4, 4, 2, rewrite=False)
    first = table.add("A", 1, 0.0, msg(9), 0, 8)
    with pytest.raises(IdInUse) as e:
        table.add("B", 1, 0.0, msg(9), 0, 8)
    assert e.value.code == "id_in_use"
    table.remove(first)
    assert table.add("B", 2, 0.0, msg(9), 0, 8).owner == "B"


def test_id_space_exhaustion_and_short_messages_are_refused():
    table = IdTable(0, 0, 1, rewrite=True)
    for i in range(256):
        table.add("A", i, 0.0, bytearray(b"\x00\x00"), 0, 2)
    with pytest.raises(IdsExhausted):
        table.add("A", 999, 0.0, bytearray(b"\x00\x00"), 0, 2)
    with pytest.raises(BadFrame):
        IdTable(4, 4, 4, True).add("A", 1, 0.0, bytearray(6), 0, 6)


def test_rewritten_ids_are_reused_as_late_as_possible():
    table = IdTable(0, 0, 1, rewrite=True)
    first = table.add("A", 1, 0.0, bytearray(b"\x05"), 0, 1)
    table.remove(first)
    second = table.add("A", 2, 0.0, bytearray(b"\x05"), 0, 1)
    assert second.wire_id != first.wire_id


def test_fifo_matches_written_first_then_pending_and_skips_done():
    flight = FifoFlight("c0")
    flight.reqs.extend([Request("A", 1, 0.0), Request("B", 1, 0.0)])
    pending = deque([Request("C", 1, 0.0)])
    flight.reqs[0].state = DONE
    assert flight.oldest(pending).owner == "B" and len(flight.reqs) == 1
    flight.reqs[0].state = DONE
    assert flight.oldest(pending).owner == "C"


class Conn:
    """A connection as the send core sees it (kmuxd.core.sendq.Carrier)."""

    def count_accepted(self, msgs, nbytes):
        pass

    def count_written(self, msgs):
        pass

    def flush_soon(self):
        pass


class Owner:
    """A client as the send core sees it (kmuxd.core.sendq.Owner)."""

    gone = False

    def wake(self):
        pass

    def count_accepted(self, msgs, nbytes):
        pass

    def count_written(self, msgs, nbytes):
        pass

    def count_given_back(self, msgs):
        pass


def test_request_records_follow_their_bytes_through_writes_and_salvage():
    tx = TxScheduler()
    router = ResponseRouter("fifo", None)
    c0, c1 = Conn(), Conn()
    for c in (c0, c1):
        tx.add(c, Outbox(256, 64, LENGTH_AT))
        tx.connected(c)
    owner = Owner()
    conn = tx.route(owner)
    flight = router.flight(conn)
    ob = tx.outbox_of(conn)
    tail = ob.tail
    reqs = []
    for i in range(3):
        m = msg(i, b"z" * 10)
        ob.buf[tail : tail + len(m)] = m
        tail += len(m)
        reqs.append(router.accept(owner, i + 1, 0.0, ob.buf, tail - len(m), len(m)))
        ob.add_request(reqs[-1])
    tx.commit(owner, ob, tail, 3)
    tx.written(conn, 16 + 3)  # first message whole, second cut after 3 bytes
    # The run is not complete, so nothing is counted as written yet ...
    assert ob.take_written() == [] and [r.state for r in reqs] == [PENDING] * 3
    salvage = tx.failed(conn)
    # ... until the salvage: the first was written (its client will be told),
    # the cut one and the last go again with the outbox.
    assert salvage.written_msgs == 1 and salvage.resend_msgs == 2
    for req in ob.take_written():
        router.written(req, flight)
    assert list(flight.reqs) == [reqs[0]]
    assert reqs[0].state == WRITTEN and reqs[1].state == reqs[2].state == PENDING
    assert list(ob.requests) == reqs[1:]  # they travel with the outbox
