"""Turns when the connections are the bottleneck: a pinned client yields to waiting ones.

The scheduler keeps a client's messages on the stream it already uses
(pinning, for per-client order). Without a turn rule, a pinned client that
keeps refilling an outbox its connection cannot drain holds that
connection for as long as it keeps sending: the outbox never empties, so
it never comes free for the clients waiting for one. These tests pin down
the rule: while anyone waits for a connection, a pinned client takes no
more room; the connection, once drained, goes to the longest waiter, and
the pinned client waits behind it.
"""

from __future__ import annotations

import random
import struct
from itertools import groupby

import pytest

from .test_sendq import Owner, frame, make, put, write


def test_a_pinned_client_takes_no_more_room_while_another_waits():
    tx, (c,) = make(1, capacity=256)
    a, b = Owner(1), Owner(2)
    assert tx.route(a) is c
    put(tx, a, c, frame(1, 1), frame(1, 2))
    tx.blocked(c)  # the kernel refused part of the write: the connection is the bottleneck
    assert tx.route(b) is None  # b waits
    assert tx.route(a) is None  # a is pinned to c, but b waits: a parks, it does not refill
    woken = write(tx, c)  # written out: the connection goes to the longest waiter, then a
    assert b in woken and a in woken
    assert tx.route(b) is c
    put(tx, b, c, frame(2, 1))
    assert tx.route(a) is c  # nobody waits any more: a shares the batch again
    put(tx, a, c, frame(1, 3))
    write(tx, c)
    assert bytes(c.wire) == frame(1, 1) + frame(1, 2) + frame(2, 1) + frame(1, 3)


def test_without_waiters_a_pinned_client_keeps_filling_its_outbox():
    tx, (c, d) = make(2, capacity=256)
    a = Owner(1)
    assert tx.route(a) is c
    put(tx, a, c, frame(1, 1))
    write(tx, c, limit=8)  # part of the message written: a stays pinned
    assert tx.route(a) is c  # nobody waits: batching goes on, order kept
    put(tx, a, c, frame(1, 2))
    write(tx, c)
    assert bytes(c.wire) == frame(1, 1) + frame(1, 2)


def test_a_pinned_client_does_not_take_the_room_just_handed_to_a_waiter():
    # Found by the turns test (tests/integration/test_isolation.py): a write
    # freed room, the connection was handed to the waiter w and the parked
    # clients were woken too. The pinned b, read first in the pass, saw nobody
    # waiting (w held the connection, the parked list was emptied by the
    # wake-up) and refilled the room, so w found it full and queued again:
    # two clients shared the connection while the third never got it.
    tx, (c,) = make(1, capacity=64)
    a, b, w = Owner(1), Owner(2), Owner(3)
    assert tx.route(a) is c
    put(tx, a, c, frame(1, 1), frame(1, 2))
    assert tx.route(b) is c
    put(tx, b, c, frame(2, 1), frame(2, 2))  # the outbox is full
    tx.blocked(c)
    assert tx.route(w) is None  # w waits for the connection
    assert tx.route(a) is None and tx.route(b) is None  # both park: w waits
    assert write(tx, c, limit=32) == [a, b, w]  # a's bytes went: room for w, and the parked woken
    assert tx.route(b) is None  # b still has bytes there, but the room is w's
    assert tx.route(w) is c
    put(tx, w, c, frame(3, 1))
    write(tx, c)
    assert bytes(c.wire) == frame(1, 1) + frame(1, 2) + frame(2, 1) + frame(2, 2) + frame(3, 1)


@pytest.mark.parametrize("seed", range(20))
def test_busy_clients_on_a_bottleneck_connection_all_get_turns(seed):
    """Three clients that always have messages, one connection whose kernel takes
    a random part of the outbox at a time (a send refused part-way): in wake-up
    order each routes and fills up to its turn. Nobody waits more than a few
    turns of the others, and the shares stay close."""
    rng = random.Random(seed)
    size, turn = 16, 4
    tx, (c,) = make(1, capacity=8 * size, reserve=size + 1)
    owners = [Owner(i) for i in range(3)]
    seq = dict.fromkeys(owners, 0)
    ready = list(owners)  # whom the next pass reads (woken, or readable)
    for _ in range(400):
        for owner in ready:
            if tx.route(owner) is not c:
                continue  # parked or waiting: woken later
            # What the intake does: receive packet after packet at tail, while there is room.
            ob = c.outbox
            tail, msgs, first = ob.tail, 0, seq[owner] + 1
            while msgs < turn and tail - ob.head < ob.capacity and len(ob.buf) - tail >= ob.reserve:
                seq[owner] += 1
                ob.buf[tail : tail + size] = frame(owner.name, seq[owner], size)
                tail += size
                msgs += 1
            tx.commit(owner, ob, tail, msgs, first)
        # The pass ends: the kernel takes part of the outbox, then refuses the rest.
        limit = rng.randrange(0, c.outbox.pending + 1) if c.outbox.pending else 0
        woke = write(tx, c, limit=limit)
        if c.outbox.pending:
            tx.blocked(c)
        # Level-triggered: whoever was not pushed back is readable again; the woken come after.
        pushed = {o for o in owners if o in tx._waiters or o in c.outbox.parked}
        ready = [o for o in owners if o not in pushed and o not in woke] + [o for o in woke if o in owners]
    write(tx, c)
    order = [struct.unpack(">I", c.wire[i + 4 : i + 8])[0] for i in range(0, len(c.wire), size)]
    runs = [(who, len(list(run))) for who, run in groupby(order)]
    assert max(n for _, n in runs) <= 3 * turn, runs
    shares = [order.count(o.name) for o in owners]
    assert min(shares) >= 0.8 * max(shares), shares

